"""Where a network's tensors live: its device and, on the CPU, the channels-last layout of its 3-D convolutions.

oneDNN runs 3-D convolutions with few channels much faster on NDHWC tensors than on NCDHW ones: on the demo's
2-core CPU a 4-channel 40 x 56 x 40 convolution's forward and backward take 41 ms instead of 131 ms, a VCM
training step 0.83 s instead of 1.11 s, a decoder-refinement step 0.38 s instead of 0.71 s
(docs/benchmarks.md). CUDA keeps PyTorch's default layout: it has not been measured there.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["place"]


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` moved to ``device``; on the CPU with its 5-D weights channels-last (NDHWC).

    Inputs need no conversion: a convolution with channels-last weights computes in that layout and returns
    channels-last outputs, which every later operation accepts. Values are the same up to the order of float
    sums; files saved by :func:`vcm.io.save_torch` hold the default layout either way.
    """
    device = torch.device(device)
    module = module.to(device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last_3d)
    return module
