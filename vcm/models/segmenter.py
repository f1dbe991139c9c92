"""The QC segmenter: a small MONAI U-Net that re-segments synthetic images on the grid, fast and independent.

Independent of the condition masks: it is trained on the *real* training subjects' images and label maps of
``dataset.h5`` (never on synthetic images, never on validation subjects), whereas the atlas backend warps the
same template that the condition masks may have come from. It predicts :data:`QC_CLASSES` (the paper's eight
semantic classes with the lateral ventricles split from the other ventricles, so the LV Dice of the QC is
measured on exactly the condition's structure) and writes FreeSurfer IDs back, left or right by the grid's
world x, so everything that reads a re-segmentation (LV mask, brain volume, semantics) works unchanged.

The file (``segmenter.pt``, ``torch.load(..., weights_only=True)``) holds the network's constructor arguments,
its class scheme and its state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vcm.errors import StageError
from vcm.labels import LATERAL_VENTRICLES, SEMANTIC_CLASSES

FORMAT = "vcm-qc-segmenter-1"
# every ventricle label; the ones not in the LV condition form their own class
_VENTRICLES = (4, 43, 5, 44, 14, 15)


def qc_classes(lv_labels: Sequence[int] = LATERAL_VENTRICLES) -> dict[str, list[int]]:
    """Class name -> FreeSurfer IDs, in class order (1..K; 0 is background)."""
    lv = [int(i) for i in lv_labels]
    classes = {"lateral_ventricles": lv, "other_ventricles": [i for i in _VENTRICLES if i not in lv]}
    for name, ids in SEMANTIC_CLASSES.items():
        if name != "ventricles":
            classes[name] = list(ids)
    return classes


def label_mapping(classes: Mapping[str, Sequence[int]]) -> dict[int, int]:
    """FreeSurfer ID -> class index (1..K), for :class:`vcm.data.RealDataset`'s ``label_map``."""
    return {int(fs): k for k, ids in enumerate(classes.values(), start=1) for fs in ids}


@dataclass
class SegmenterSpec:
    """What it takes to rebuild the network: U-Net shape and class scheme."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    classes: dict[str, list[int]] = field(default_factory=qc_classes)
    mirror: bool = False  # test-time left-right mirroring (:func:`predict`); files before it have none


def build_unet(
    channels: Sequence[int], strides: Sequence[int], num_res_units: int, n_foreground: int
) -> nn.Module:
    """MONAI's 3-D U-Net with background + ``n_foreground`` output channels (QC segmenter and TSTR)."""
    from monai.networks.nets import UNet

    if len(channels) != len(strides) + 1:
        raise StageError(
            f"U-Net: need one stride fewer than channels, got {list(channels)} / {list(strides)}"
        )
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=int(n_foreground) + 1,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
    )


def predict(net: nn.Module, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """Class probabilities (B, K + 1, *grid) of ``net`` for images ``x`` (B, 1, *grid).

    ``mirror``: the mean with the prediction for the left-right mirrored images, mirrored back (nnU-Net's
    test-time mirroring; the networks train with left-right flips, and every class holds both hemispheres).
    On the demo it raises the QC segmenter's LV Dice on the real validation subjects by +0.010 [+0.003,
    +0.019] for twice the time (docs/benchmarks.md).
    """
    prob = net(x).softmax(1)
    if mirror:
        prob = (prob + net(x.flip(2)).softmax(1).flip(2)) / 2
    return prob


def build_segmenter(spec: SegmenterSpec) -> nn.Module:
    return build_unet(spec.channels, spec.strides, spec.num_res_units, len(spec.classes))


class QCSegmenter:
    """``segmenter(image[, path]) -> FreeSurfer label map`` on the image's grid (a :data:`vcm.qc.Segmenter`).

    Args:
        net: the trained network (eval mode).
        spec: its class scheme and shape.
        affine: the grid's voxel-to-world affine (left/right from world x).
    """

    def __init__(self, net: nn.Module, spec: SegmenterSpec, affine: np.ndarray):
        self.net, self.spec, self.affine = net.eval(), spec, np.asarray(affine, dtype=float)
        self.k = int(np.prod(spec.strides))
        # class index -> (left id, right id): the first two IDs of a paired class, else the only one
        self._ids = np.zeros((len(spec.classes) + 1, 2), dtype=np.uint16)
        for c, ids in enumerate(spec.classes.values(), start=1):
            self._ids[c] = (ids[0], ids[1] if len(ids) > 1 else ids[0]) if ids else (0, 0)

    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """Softmax over classes (K + 1, *grid) for one image (*grid)."""
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
        pad = [(-s) % self.k for s in x.shape[2:]]
        x = nn.functional.pad(x, [p for s in reversed(pad) for p in (0, s)])
        with torch.no_grad():
            out = predict(self.net, x, self.spec.mirror)[0]
        return out[:, : image.shape[0], : image.shape[1], : image.shape[2]]

    def classes(self, image: np.ndarray) -> np.ndarray:
        return self.probabilities(image).argmax(0).numpy()

    def __call__(self, image: np.ndarray, path: Path | None = None) -> np.ndarray:
        cls = self.classes(image)
        x_world = self.affine[0, 0] * np.arange(image.shape[0]) + self.affine[0, 3]
        right = np.broadcast_to((x_world >= 0)[:, None, None], cls.shape)
        return self._ids[cls, right.astype(np.int64)]


def save_segmenter(path: str | Path, net: nn.Module, spec: SegmenterSpec, info: Mapping[str, Any]) -> Path:
    """Write ``segmenter.pt`` atomically."""
    from vcm.io import save_torch

    payload = {"format": FORMAT, "spec": asdict(spec), "state_dict": net.state_dict(), "info": dict(info)}
    return save_torch(payload, path)


def load_segmenter(path: str | Path, affine: np.ndarray) -> QCSegmenter:
    """Load a ``segmenter.pt`` for images on the grid of ``affine``."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"QC segmenter not found: {path} (the train_qc_segmenter rule writes it)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise StageError(f"{path}: not a vcm QC segmenter (format {payload.get('format')!r})")
    spec = SegmenterSpec(**payload["spec"])
    net = build_segmenter(spec)
    net.load_state_dict(payload["state_dict"])
    return QCSegmenter(net, spec, affine)
