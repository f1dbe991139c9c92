"""Building, saving metadata of and loading the control modules (VCM and the ControlNet baseline).

``vcm.pt`` holds ``method``, ``model_config`` (the constructor arguments), ``model`` (the weights) and
provenance; it loads with ``torch.load(weights_only=True)``. Generation, evaluation and the checks load
models here, never from the training code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcm.errors import StageError
from vcm.models.controlnet import ControlNetControl
from vcm.models.layout import place
from vcm.models.vcm import VCM

__all__ = ["MODEL_FILE", "build_model", "load_model"]

MODEL_FILE = "vcm.pt"


def build_model(
    method: str,
    groups: Sequence[Sequence[tuple[str, int]]],
    backbone: nn.Module,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A fresh control module for ``backbone`` (the current torch seed initialises it).

    Args:
        method: ``vcm`` or ``controlnet``.
        groups: condition groups of ``(name, channels)``.
        backbone: the frozen :class:`~vcm.models.backbone.Backbone`.
        overrides: constructor arguments to change (``training.vcm`` / ``training.controlnet``).
    """
    levels = int(round(math.log2(backbone.downsample_factor)))
    overrides = dict(overrides or {})
    try:
        if method == "vcm":
            kwargs = {
                "spatial_dims": (backbone.definitions or {}).get("autoencoder", {}).get("spatial_dims", 3),
                "latent_channels": backbone.latent_channels,
                "condition_groups": groups,
                "levels": levels,
            }
            return VCM(**{**kwargs, **overrides})
        model = ControlNetControl(backbone.definitions["diffusion"], groups, levels, **overrides)
    except (TypeError, ValueError) as err:
        key = "training.vcm" if method == "vcm" else "training.controlnet"
        raise StageError(f"config key '{key}': cannot build the {method} model ({err})") from None
    model.init_from(backbone.diffusion)
    return model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained control module from ``vcm.pt``.

    Returns:
        the model (eval mode) and the file's metadata (``method``, ``condition_set``, ``condition_groups``,
        ``backbone_sha256``, ``scale_factor``, ``provenance``, ...), without the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj.pop("model")
        if obj["method"] == "vcm":
            model: nn.Module = VCM(**obj["model_config"])
        else:
            model = ControlNetControl(**obj["model_config"])
        model.load_state_dict(state)
    except Exception as err:  # a truncated or foreign file raises many types
        text = str(err).strip().splitlines()
        raise StageError(
            f"{path}: not a vcm model file ({type(err).__name__}: {text[0] if text else ''})"
        ) from None
    return place(model, device).eval(), obj
