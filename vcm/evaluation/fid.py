"""FID 3D with MedicalNet features: the evaluation's distribution-level metric (paper, Tab. 1).

Only with a local MedicalNet checkpoint (``evaluation.medicalnet_weights``): vcm never downloads one (the
compute nodes it is written for have no internet). :func:`load_medicalnet` builds MONAI's 3-D ResNet (the
network MONAI loads MedicalNet weights into, depth inferred from the checkpoint) without its classifier,
:func:`medicalnet_features` gives its global-average-pool features of images z-scored over their non-zero
voxels, and :func:`fid_3d` the Fréchet distance of two feature sets, exact for few samples and many features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vcm.errors import StageError

__all__ = ["fid_3d", "load_medicalnet", "medicalnet_features"]

_RESNET_LAYERS = {  # blocks per stage -> (depth, block)
    ((1, 1, 1, 1), "basic"): 10,
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
    ((3, 24, 36, 3), "bottleneck"): 200,
}


def load_medicalnet(path: str | Path) -> nn.Module:
    """A MedicalNet feature extractor (MONAI 3-D ResNet, no classifier) from a local checkpoint.

    Accepts the MedicalNet release format (``{"state_dict": {"module.conv1.weight": ...}}``) or a plain state
    dict; the depth (10, 18, 34, 50, ...) is read from the keys.

    Raises:
        StageError: the file is missing or is not a MedicalNet ResNet checkpoint (one line).
    """
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    path = Path(path)
    hint = (
        "MedicalNet weights cannot be downloaded by vcm: fetch e.g. resnet_10_23dataset.pth on a connected "
        "machine and give its path, or remove the key to skip FID 3D"
    )
    if not path.is_file():
        raise StageError(f"config key 'evaluation.medicalnet_weights': file not found: {path} ({hint})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
        if not isinstance(state, Mapping):
            raise ValueError("no state dict")
        state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
        block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        blocks = tuple(
            len({k.split(".")[1] for k in state if k.startswith(f"layer{n}.")}) for n in range(1, 5)
        )
        depth = _RESNET_LAYERS.get((blocks, block))
        if depth is None:
            raise ValueError(f"unknown ResNet layout {blocks} ({block})")
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        net = ResNet(
            block,
            list(blocks),
            [64, 128, 256, 512],
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=2,  # MedicalNet's first conv strides 2 along every axis
            shortcut_type=shortcut,
            bias_downsample=bias_downsample,
            feed_forward=False,
        )
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"missing {missing[0]}")
        net.load_state_dict({k: state[k] for k in own})  # MedicalNet's segmentation head is not needed
    except StageError:
        raise
    except Exception as err:  # torch.load and load_state_dict raise many types for a foreign file
        text = str(err).strip().splitlines()
        raise StageError(
            f"config key 'evaluation.medicalnet_weights': {path} is not a MedicalNet ResNet checkpoint "
            f"({type(err).__name__}: {text[0] if text else ''})"
        ) from None
    net.depth = depth  # type: ignore[attr-defined]
    return net.eval()


@torch.no_grad()
def medicalnet_features(
    net: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 2
) -> torch.Tensor:
    """(N, 512 or 2048) features of (N, *grid) images, each z-scored over its non-zero voxels (MedicalNet's
    input normalisation)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 4:
        x = x[:, None]
    out = []
    for i in range(0, len(x), batch_size):
        b = x[i : i + batch_size].clone()
        for j in range(len(b)):
            voxels = b[j][b[j] > 0]
            if voxels.numel() > 1:
                b[j] = (b[j] - voxels.mean()) / voxels.std().clamp_min(1e-6)
        out.append(net(b).float())
    return torch.cat(out)


def fid_3d(features_synth: torch.Tensor, features_real: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N, F), exact and fast when N ≪ F.

    ``|mu1 - mu2|² + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``, where ``tr sqrt(S1 S2)`` is the sum of the singular
    values of ``A1ᵀ A2 / sqrt((n1 - 1)(n2 - 1))`` (``Ai`` the centred features): the non-zero eigenvalues of
    ``S1 S2`` are those of that small matrix times its transpose. The same value as MONAI's
    :class:`~monai.metrics.FIDMetric` without its F×F matrix square root, which for a few dozen subjects and
    512 features is rank-deficient, slow and prone to complex round-off. NaN with fewer than 2 samples a set.
    """
    x = torch.as_tensor(features_synth, dtype=torch.float64)
    y = torch.as_tensor(features_real, dtype=torch.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    ax, ay = x - x.mean(0), y - y.mean(0)
    nx, ny = len(x) - 1, len(y) - 1
    cross = torch.linalg.svdvals(ax @ ay.T).sum() / math.sqrt(nx * ny)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (ax**2).sum() / nx + (ay**2).sum() / ny - 2 * cross)
