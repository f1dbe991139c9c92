"""The networks that the ``sample`` and ``train`` benchmarks time when no trained ones are given.

Random weights of the right architecture are enough to time and size a step: the demo backbone's recipe or
BrainLDM's definitions (:func:`random_backbone`) and a VCM of the paper's or smaller widths
(:func:`random_vcm`) whose heads are not zero (zero heads would make it the identity).
"""

from __future__ import annotations

from vcm.bench.common import REPO

__all__ = ["DEMO_BACKBONE", "SCALES", "VCM_WIDTHS", "random_backbone", "random_vcm", "vcm_widths"]

SCALES = {"demo": (40, 56, 40), "brainldm": (160, 224, 160)}
"""Image grid of each benchmark scale."""

# the shipped demo backbone's recipe (workflow/rules/backbone.smk), for a random stand-in when no bundle exists
DEMO_BACKBONE = {
    "channels": (8, 16, 32),
    "diffusion_channels": (32, 64, 64),
    "diffusion_num_res_blocks": (1, 1, 2),
    "diffusion_attention_levels": (False, False, True),
    "diffusion_num_head_channels": (0, 0, 32),
}
# VCM widths: the paper's (the model's defaults) and smaller ones for the demo's 4.3 M-parameter backbone
VCM_WIDTHS = {
    "paper": {},
    "small": {
        "encoder_channels": [8, 16],
        "encoder_norm_num_groups": 8,
        "unet_channels": [32, 64, 128],
        "unet_out_channels": 32,
        "head_channels": 32,
        "unet_num_res_blocks": 1,
    },
    "tiny": {
        "encoder_channels": [8, 16],
        "encoder_norm_num_groups": 8,
        "unet_channels": [8, 16, 32],
        "unet_num_head_channels": 8,
        "unet_norm_num_groups": 8,
        "unet_out_channels": 8,
        "head_channels": 16,
        "unet_num_res_blocks": 1,
    },
}


def random_backbone(scale: str, device):
    """A random-weight backbone of ``scale``'s architecture: the demo recipe or BrainLDM's definitions."""
    import torch

    from vcm.models.backbone import Backbone, brainldm_definitions, build_networks, tiny_definitions
    from vcm.models.layout import place

    defs = brainldm_definitions() if scale == "brainldm" else tiny_definitions(**DEMO_BACKBONE)
    torch.manual_seed(0)
    ae, dm = build_networks(defs)
    what = "BrainLDM's networks" if scale == "brainldm" else "the demo backbone's architecture"
    return place(Backbone(ae, dm, definitions=defs), device), f"random weights ({what})"


def vcm_widths(name: str) -> dict:
    """VCM constructor widths: ``paper``, ``small``, ``tiny`` or ``config`` (``training.vcm`` of the config)."""
    if name == "config":
        from vcm.config import load_config

        return dict(load_config(REPO / "config" / "config.yaml")["training"].get("vcm") or {})
    return dict(VCM_WIDTHS[name])


def random_vcm(backbone, groups, widths: str, device, checkpointing: bool = False):
    """A random VCM for ``backbone`` with non-zero heads (zero heads would make it the identity)."""
    import math

    import torch

    from vcm.models.layout import place
    from vcm.models.vcm import VCM

    torch.manual_seed(1)
    vcm = VCM(
        latent_channels=backbone.latent_channels,
        condition_groups=groups,
        levels=int(round(math.log2(backbone.downsample_factor))),
        use_checkpointing=checkpointing,
        **vcm_widths(widths),
    )
    with torch.no_grad():
        for head in (vcm.head_gamma, vcm.head_beta):
            head.conv.weight.normal_(std=0.02)
    return place(vcm, device)
