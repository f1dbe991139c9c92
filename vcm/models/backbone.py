"""The frozen latent diffusion backbone: BrainLDM (MONAI model zoo) or the project's ``tiny`` demo backbone.

Both kinds are an :class:`~monai.networks.nets.AutoencoderKL` plus a covariate-conditioned
:class:`~monai.networks.nets.DiffusionModelUNet`, stored in the MONAI bundle layout::

    <bundle>/models/autoencoder.pt     autoencoder state dict
    <bundle>/models/model.pt           diffusion U-Net state dict
    <bundle>/configs/network.json      constructor arguments (written by this project; absent in the
                                       model-zoo bundle, whose networks are the BrainLDM definitions below)

Weights in either key format load: the current MONAI names, or the names of the old MONAI GenerativeModels
package that the model-zoo bundle was trained with (converted by the networks' own ``load_old_state_dict``).
The format is detected from the key names.

The backbone predicts noise as ``eps_t = DM(cat[z_t, cov broadcast], t, context=cov)`` with the covariates
``cov`` (B, 1, 4) in the order :data:`COVARIATES`, each min-max scaled to [0, 1]. Latents in diffusion space
are autoencoder latents times ``scale_factor`` (the bundle samples with 1.0; the VCM authors trained with
0.8962649): keep it in config.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from vcm.errors import StageError
from vcm.models.layout import place
from vcm.models.vcm import crop_to_shape, pad_to_multiple

__all__ = [
    "AUTOENCODER_FILE",
    "BRAINLDM_AUTOENCODER",
    "BRAINLDM_DIFFUSION",
    "COVARIATES",
    "DIFFUSION_FILE",
    "LATENT_SAMPLING",
    "NETWORK_FILE",
    "Backbone",
    "brainldm_definitions",
    "build_networks",
    "count_parameters",
    "load_bundle",
    "load_weights",
    "save_bundle",
    "tiny_definitions",
    "to_old_state_dict",
]

logger = logging.getLogger(__name__)

COVARIATES: tuple[str, ...] = ("sex", "age", "lv_volume", "brain_volume")
"""BrainLDM's covariates, in the order the network expects them."""

AUTOENCODER_FILE = "models/autoencoder.pt"
DIFFUSION_FILE = "models/model.pt"
NETWORK_FILE = "configs/network.json"

BRAINLDM_AUTOENCODER: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 3,
    "channels": [64, 128, 128, 128],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
"""BrainLDM's autoencoder (model-zoo bundle ``brain_image_synthesis_latent_diffusion_model``): 13.77 M parameters."""

BRAINLDM_DIFFUSION: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 7,
    "out_channels": 3,
    "channels": [256, 512, 768],
    "num_res_blocks": 2,
    "attention_levels": [False, True, True],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resblock_updown": True,
    "num_head_channels": [0, 512, 768],
    "with_conditioning": True,
    "transformer_num_layers": 1,
    "cross_attention_dim": 4,
    "upcast_attention": True,
}
"""BrainLDM's diffusion U-Net (in = 3 latent + 4 broadcast covariates): 553.17 M parameters."""


LATENT_SAMPLING = ("sample", "mean")
"""How the diffusion U-Net's training latents came from the autoencoder posterior: ``sample`` (``mu + sigma * n``,
BrainLDM and MONAI's recipe) or ``mean`` (``mu`` alone, the tiny backbone). VCM must train on the same kind."""


def brainldm_definitions(scale_factor: float = 1.0) -> dict[str, Any]:
    """Network definitions of the BrainLDM bundle, in the form written to ``configs/network.json``."""
    return {
        "kind": "brainldm",
        "autoencoder": dict(BRAINLDM_AUTOENCODER),
        "diffusion": dict(BRAINLDM_DIFFUSION),
        "scale_factor": float(scale_factor),
        "latent_sampling": "sample",
    }


def tiny_definitions(
    channels: Sequence[int] = (8, 16, 32),
    latent_channels: int = 3,
    num_res_blocks: int = 1,
    norm_num_groups: int = 8,
    diffusion_channels: Sequence[int] = (32, 64),
    diffusion_attention_levels: Sequence[bool] = (False, True),
    diffusion_num_head_channels: Sequence[int] = (0, 32),
    diffusion_num_res_blocks: int | Sequence[int] = 1,
    diffusion_norm_num_groups: int = 16,
    spatial_dims: int = 3,
    scale_factor: float = 1.0,
    latent_sampling: str = "mean",
) -> dict[str, Any]:
    """Definitions of the small CPU backbone of the demo (the BrainLDM architecture family, scaled down).

    The autoencoder downsamples by ``2 ** (len(channels) - 1)`` (4 by default: the demo's 40×56×40 grid maps to
    a 10×14×10 latent); the diffusion U-Net takes the latent plus the four broadcast covariates and
    cross-attends to them, like BrainLDM's. Its U-Net trains on posterior means (``latent_sampling``).
    """
    n_cov = len(COVARIATES)
    return {
        "kind": "tiny",
        "autoencoder": {
            "spatial_dims": spatial_dims,
            "in_channels": 1,
            "out_channels": 1,
            "latent_channels": latent_channels,
            "channels": list(channels),
            "num_res_blocks": num_res_blocks,
            "norm_num_groups": norm_num_groups,
            "norm_eps": 1e-6,
            "attention_levels": [False] * len(channels),
            "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False,
        },
        "diffusion": {
            "spatial_dims": spatial_dims,
            "in_channels": latent_channels + n_cov,
            "out_channels": latent_channels,
            "channels": list(diffusion_channels),
            "num_res_blocks": (
                diffusion_num_res_blocks
                if isinstance(diffusion_num_res_blocks, int)
                else [int(n) for n in diffusion_num_res_blocks]
            ),
            "attention_levels": list(diffusion_attention_levels),
            "norm_num_groups": diffusion_norm_num_groups,
            "norm_eps": 1e-6,
            "resblock_updown": True,
            "num_head_channels": list(diffusion_num_head_channels),
            "with_conditioning": True,
            "transformer_num_layers": 1,
            "cross_attention_dim": n_cov,
            "upcast_attention": True,
        },
        "scale_factor": float(scale_factor),
        "latent_sampling": latent_sampling,
    }


def build_networks(definitions: Mapping[str, Any]) -> tuple[AutoencoderKL, DiffusionModelUNet]:
    """Instantiate the autoencoder and diffusion U-Net of a definitions dict (on the current default device;
    wrap in ``with torch.device("meta"):`` to count parameters without allocating)."""
    return AutoencoderKL(**definitions["autoencoder"]), DiffusionModelUNet(**definitions["diffusion"])


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


class Backbone(nn.Module):
    """A frozen latent diffusion backbone: autoencoder + covariate-conditioned diffusion U-Net.

    Args:
        autoencoder: the :class:`~monai.networks.nets.AutoencoderKL`.
        diffusion: the :class:`~monai.networks.nets.DiffusionModelUNet` (in = latent + covariate channels,
            cross-attention over the covariates).
        scale_factor: diffusion latent = autoencoder latent × ``scale_factor``.
        definitions: the constructor arguments the networks were built from (kept for saving).
        freeze: put the networks in eval mode and switch off their gradients.
        latent_sampling: ``sample`` or ``mean``: how training latents come from a stored posterior
            (:data:`LATENT_SAMPLING`); default the definitions' value, else ``sample``.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        diffusion: DiffusionModelUNet,
        scale_factor: float = 1.0,
        definitions: Mapping[str, Any] | None = None,
        freeze: bool = True,
        latent_sampling: str | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.diffusion = diffusion
        self.scale_factor = float(scale_factor)
        self.definitions = dict(definitions) if definitions is not None else None
        if latent_sampling is None:
            latent_sampling = (self.definitions or {}).get("latent_sampling", "sample")
        if latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"latent_sampling must be one of {LATENT_SAMPLING}, got {latent_sampling!r}")
        self.latent_sampling = latent_sampling
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode."""
        return super().train(False if self.frozen else mode)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.latent_channels)

    @property
    def downsample_factor(self) -> int:
        """Image grid / latent grid (8 for BrainLDM, 4 for the default tiny backbone)."""
        return 2 ** (len(self.autoencoder.encoder.channels) - 1)

    def latent_shape(self, grid: Sequence[int]) -> tuple[int, ...]:
        """(channels, *spatial) of the latent of images on ``grid``."""
        return (self.latent_channels, *(int(s) // self.downsample_factor for s in grid))

    @property
    def n_covariates(self) -> int:
        return len(COVARIATES)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoencoder posterior ``(mu, sigma)`` of images (B, 1, *grid), in autoencoder units (not scaled)."""
        mu, sigma = self.autoencoder.encode(x)
        return mu, sigma

    def sample_latent(
        self, mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Diffusion latent ``(mu + sigma * n) * scale_factor`` from a stored posterior (``mu * scale_factor``
        when the U-Net was trained on posterior means; ``n`` is drawn either way, so random streams agree)."""
        device = mu.device if generator is None else generator.device
        n = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=device).to(mu.device)
        return (mu + self.posterior_weight * sigma * n) * self.scale_factor

    @property
    def posterior_weight(self) -> float:
        """1.0 when training latents sample the posterior, 0.0 when they are its mean."""
        return 1.0 if self.latent_sampling == "sample" else 0.0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion latents (divided by ``scale_factor`` before the autoencoder's decoder)."""
        return self.autoencoder.decode(z / self.scale_factor)

    def eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cov: torch.Tensor) -> torch.Tensor:
        """Noise prediction ``DM(cat[z_t, cov broadcast], t, context=cov)``.

        Args:
            z_t: noisy diffusion latent (B, latent_channels, *latent grid).
            t: time steps (B,) or a scalar.
            cov: covariates (B, 1, 4) or (B, 4) (a batch of one is broadcast), order :data:`COVARIATES`.
        """
        b, spatial = z_t.shape[0], z_t.shape[2:]
        cov = cov.to(device=z_t.device, dtype=z_t.dtype).reshape(cov.shape[0], 1, -1)
        if cov.shape[-1] != self.n_covariates:
            raise ValueError(f"expected {self.n_covariates} covariates {COVARIATES}, got {cov.shape[-1]}")
        if cov.shape[0] != b:
            cov = cov.expand(b, -1, -1)
        t = torch.as_tensor(t, device=z_t.device)
        t = t.expand(b) if t.dim() == 0 else t
        cov_map = cov.reshape(b, -1, *([1] * len(spatial))).expand(b, cov.shape[-1], *spatial)
        x, pads = pad_to_multiple(
            torch.cat([z_t, cov_map], dim=1), 2 ** (len(self.diffusion.block_out_channels) - 1)
        )
        return crop_to_shape(self.diffusion(x, timesteps=t.long(), context=cov), pads)


# --- key formats -------------------------------------------------------------------------------------------

# current MONAI name -> MONAI GenerativeModels name; the inverse of the networks' ``load_old_state_dict``.
_TO_OLD_KEYS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.(attn[12])\.out_proj\."), r".\1.to_out.0."),  # transformer (cross-)attention output
    (re.compile(r"\.attn\.(to_[qkv])\."), r".\1."),  # self-attention block q/k/v
    (re.compile(r"\.attn\.out_proj\."), r".proj_attn."),  # self-attention block output
    (re.compile(r"\.postconv\."), r".conv."),  # upsampler conv
)


def to_old_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a current-MONAI state dict to the key names of MONAI GenerativeModels (the model-zoo format)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _TO_OLD_KEYS:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise StageError(f"backbone weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise StageError(f"{path}: not a readable PyTorch weights file ({_first_line(err)})") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "network", "model_state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StageError(f"{path}: not a state dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def load_weights(net: nn.Module, path: str | Path, label: str = "network") -> str:
    """Load a state dict file into ``net``, in the current MONAI or the old GenerativeModels key format.

    Args:
        net: an AutoencoderKL or DiffusionModelUNet built from the bundle's definitions.
        path: the ``.pt`` file.
        label: how to call the network in error messages.

    Returns:
        ``"monai"`` or ``"generative"``: the key format that was found.

    Raises:
        StageError: (one line, naming the file) when the file is missing, unreadable, or its keys or shapes do
            not fit ``net``.
    """
    path = Path(path)
    state = _read_state_dict(path)
    expected = net.state_dict()
    old_expected = to_old_state_dict(expected)
    if expected.keys() <= state.keys():
        fmt, wanted = "monai", expected
    elif old_expected.keys() <= state.keys():
        fmt, wanted = "generative", old_expected
    else:
        missing_new = [k for k in expected if k not in state]
        missing_old = [k for k in old_expected if k not in state]
        missing = min(missing_new, missing_old, key=len)
        raise StageError(
            f"{path}: keys do not fit the {label} definition in either MONAI or GenerativeModels format "
            f"({len(missing)} of {len(expected)} missing, e.g. '{missing[0]}')"
        )
    extra = sorted(state.keys() - wanted.keys())
    if extra:
        logger.warning("%s: ignoring %d unexpected keys, e.g. %s", path, len(extra), extra[0])
    bad = [k for k, v in wanted.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise StageError(
            f"{path}: {len(bad)} tensors have the wrong shape for the {label} definition, e.g. '{k}' "
            f"{tuple(state[k].shape)} != {tuple(wanted[k].shape)}"
        )
    try:
        if fmt == "monai":
            net.load_state_dict({k: state[k] for k in expected})
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints
                net.load_old_state_dict({k: state[k] for k in old_expected})
    except (KeyError, RuntimeError) as err:
        raise StageError(f"{path}: cannot load into the {label} ({_first_line(err)})") from None
    return fmt


def save_bundle(
    folder: str | Path, backbone: Backbone, old_format: bool = False, dtype: torch.dtype | None = None
) -> Path:
    """Write a backbone in the bundle layout (atomic writes).

    Args:
        folder: the bundle folder (created).
        backbone: the backbone; its ``definitions`` are written to ``configs/network.json``.
        old_format: write GenerativeModels key names (as the model-zoo bundle has) instead of MONAI's.
        dtype: store floating-point tensors in this dtype (e.g. ``torch.float16`` for a small shipped
            bundle); :func:`load_bundle` casts them back to the networks' float32.
    """
    from vcm.io import save_torch, write_json

    folder = Path(folder)
    if backbone.definitions is None:
        raise ValueError("the backbone has no definitions to save")
    for rel, net in ((AUTOENCODER_FILE, backbone.autoencoder), (DIFFUSION_FILE, backbone.diffusion)):
        state = {
            k: v.detach().cpu().to(dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu()
            for k, v in net.state_dict().items()
        }
        save_torch(to_old_state_dict(state) if old_format else state, folder / rel)
    write_json(
        folder / NETWORK_FILE,
        {
            **backbone.definitions,
            "scale_factor": backbone.scale_factor,
            "latent_sampling": backbone.latent_sampling,
        },
    )
    return folder


def load_bundle(
    folder: str | Path,
    scale_factor: float | None = None,
    device: torch.device | str | None = None,
    freeze: bool = True,
) -> Backbone:
    """Load a backbone bundle (``models/autoencoder.pt``, ``models/model.pt``).

    The networks are built from ``configs/network.json`` when present (bundles written by
    :func:`save_bundle`), otherwise from the BrainLDM definitions (the MONAI model-zoo bundle).

    Args:
        folder: the bundle folder.
        scale_factor: diffusion latent scale; overrides the bundle's (default 1.0 when it has none).
        device: where to put the networks.
        freeze: eval mode, no gradients.

    Raises:
        StageError: a missing, truncated or mismatched file (one line naming the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"backbone bundle folder not found: {folder}")
    net_file = folder / NETWORK_FILE
    if net_file.is_file():
        try:
            definitions = json.loads(net_file.read_text())
            ae_def, dm_def = definitions["autoencoder"], definitions["diffusion"]
        except (ValueError, KeyError, TypeError) as err:
            raise StageError(f"{net_file}: not a network definition ({_first_line(err)})") from None
    else:
        definitions = brainldm_definitions()
        ae_def, dm_def = definitions["autoencoder"], definitions["diffusion"]
    try:
        autoencoder, diffusion = AutoencoderKL(**ae_def), DiffusionModelUNet(**dm_def)
    except (TypeError, ValueError) as err:
        raise StageError(f"{net_file}: cannot build the networks ({_first_line(err)})") from None
    kind = definitions.get("kind", "backbone")
    load_weights(autoencoder, folder / AUTOENCODER_FILE, f"{kind} autoencoder")
    load_weights(diffusion, folder / DIFFUSION_FILE, f"{kind} diffusion model")
    scale = scale_factor if scale_factor is not None else definitions.get("scale_factor", 1.0)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise StageError(f"{folder}: scale_factor must be a positive number, got {scale!r}")
    try:  # Backbone validates latent_sampling
        backbone = Backbone(
            autoencoder, diffusion, scale_factor=scale, definitions=definitions, freeze=freeze
        )
    except ValueError as err:
        raise StageError(f"{net_file}: {err}") from None
    return place(backbone, device) if device is not None else backbone
