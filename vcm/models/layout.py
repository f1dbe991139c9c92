"""Where a network's tensors live: its device and, on the CPU, the channels-last layout of its 3-D convolutions.

oneDNN runs 3-D convolutions with few channels much faster on NDHWC tensors than on NCDHW ones: on the demo's
2-core CPU a 4-channel 40 x 56 x 40 convolution's forward and backward take 41 ms instead of 131 ms, a VCM
training step 0.83 s instead of 1.11 s, a decoder-refinement step 0.38 s instead of 0.71 s
(docs/benchmarks.md). PyTorch's CPU GroupNorm is the exception: on NDHWC tensors it is 3x slower (forward and
backward of a 4-channel 40 x 56 x 40 batch of 4: 22.5 ms instead of 7.2 ms), so on the CPU it computes in the
default layout between the convolutions. CUDA keeps PyTorch's default layout: it has not been measured there.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["place"]

CHANNELS_LAST = torch.channels_last_3d


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` moved to ``device``; on the CPU with its 5-D weights channels-last (NDHWC).

    Inputs need no conversion: a convolution with channels-last weights computes in that layout and returns
    channels-last outputs, which every later operation accepts; a GroupNorm takes a channels-last input in the
    default layout and returns its output channels-last. Values are the same up to the order of float sums;
    files saved by :func:`vcm.io.save_torch` hold the default layout either way.
    """
    device = torch.device(device)
    module = module.to(device)
    if device.type == "cpu":
        module = module.to(memory_format=CHANNELS_LAST)
        for norm in module.modules():
            # placing twice adds no second pair of hooks
            if isinstance(norm, nn.GroupNorm) and _to_default_layout not in norm._forward_pre_hooks.values():
                norm.register_forward_pre_hook(_to_default_layout)
                norm.register_forward_hook(_to_channels_last)
    return module


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST)


def _to_default_layout(norm: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    norm._vcm_input_channels_last = _channels_last(x)
    return (x.contiguous(), *args[1:]) if norm._vcm_input_channels_last else None


def _to_channels_last(norm: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    return out.contiguous(memory_format=CHANNELS_LAST) if norm._vcm_input_channels_last else None
