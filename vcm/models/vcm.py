"""The Volumetric Conditioning Module (VCM; paper §3.2, appendix B.2, Fig. 16).

VCM sits on top of a frozen latent diffusion model. Given the noisy latent ``z_t``, the frozen model's noise
prediction ``eps_t`` (the *diffusion prior*), the time step ``t`` and volumetric conditions at full image
resolution (masks, one-hot semantics, partial images), it predicts two tensors ``gamma`` and ``beta`` of latent
shape that modulate the prior: ``eps' = eps_t * (1 + gamma) + beta``.

The network has three parts:

1. One **time-free** encoder per condition group, at full image resolution: a 3³ conv-in, then ``levels``
   levels of two residual blocks (GroupNorm -> SiLU -> 3³ conv, twice; the second conv zero-initialised; a 1³
   skip conv where channels change), each level halving the grid with average pooling, so that ``levels =
   log2(autoencoder downsampling factor)`` reaches the latent grid. The branches' outputs are **summed**: the
   latent U-Net's input width does not depend on the number of groups, a dropped or missing group contributes
   exactly zero, and each extra group costs only one small encoder (~0.36 M parameters at the paper's widths).
   Because these encoders do not see ``t``, their features are computed once per sample (:meth:`VCM.encode`)
   and reused at every sampling step (:meth:`VCM.forward_from_features`).
2. A **time-conditioned** U-Net at latent resolution on ``cat[z_t, eps_t, features]`` (MONAI's
   :class:`~monai.networks.nets.DiffusionModelUNet`, channels 16·[4, 8, 16], two residual blocks per level,
   self-attention only at the deepest level, residual-block up/downsampling as in BrainLDM). The latent is
   padded to a multiple of the U-Net's total downsampling and cropped back.
3. A SPADE-like head: a shared 3³ conv with leaky ReLU, then two 3³ convs giving ``gamma`` and ``beta``.

Identity at initialisation: the ``gamma``/``beta`` convs are zero-initialised (weights and biases), so a fresh
VCM returns ``gamma = beta = 0`` and the modulated prediction equals the frozen model's prediction exactly.
The authors' released heads end in an instance norm (a library default the paper does not mention); an
instance-normalised output cannot be zero and would perturb the pretrained model from the first step, so we
leave it out. To avoid two zero layers in series, the U-Net's own output conv (zero-initialised by MONAI) is
re-initialised with PyTorch's default init.

Multimodal conditioning (paper §3.2): *modality latent dropout* zeroes a branch's output features per sample
(:func:`sample_keep_mask`, ``keep=`` argument of :meth:`VCM.encode`); *modality drop*, the ablation
alternative, zeroes the condition input instead (:meth:`VCM.drop_inputs`).

At BrainLDM scale (latent 3 channels, factor 8) this module has 45.02 M parameters with one single-channel
group (paper: 45.19 M) and 45.38 M with two groups (paper: 45.88 M).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "VCM",
    "ConditionEncoder",
    "crop_to_shape",
    "modulate",
    "pad_to_multiple",
    "parse_condition_groups",
    "sample_keep_mask",
    "subset_probabilities",
]

ConditionGroups = Sequence[Sequence[tuple[str, int]] | Mapping[str, int]]


def modulate(
    eps_t: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Apply VCM's modulation to the frozen model's noise prediction: ``eps_t * (1 + gamma) + beta``.

    Args:
        eps_t: the frozen model's noise prediction.
        gamma: VCM's scale, of latent shape.
        beta: VCM's shift, of latent shape.
        scale: the control scale ``s`` (``cohort.control_scale``, sampling only): ``eps_t + s * (eps_t * gamma
            + beta)``, the module's correction of the prior multiplied as classifier-free guidance multiplies
            the conditional direction, at no extra network evaluation. 1 is the trained modulation (computed by
            the paper's formula, bit for bit), 0 the frozen model alone.
    """
    if scale == 1.0:
        return eps_t * (1 + gamma) + beta
    return eps_t + scale * (eps_t * gamma + beta)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial dims of ``x`` (B, C, *spatial) symmetrically up to a multiple of ``multiple``.

    Returns:
        the padded tensor and the pads in :func:`torch.nn.functional.pad` order (last dim first), to be undone
        with :func:`crop_to_shape`.
    """
    pads: list[int] = []
    for size in reversed(x.shape[2:]):
        total = -size % multiple
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x, tuple(pads)
    return F.pad(x, pads), tuple(pads)


def crop_to_shape(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` given the pads it returned."""
    if not any(pads):
        return x
    n = len(pads) // 2
    slices = [slice(None), slice(None)]
    for d in range(n):
        lo, hi = pads[2 * (n - 1 - d)], pads[2 * (n - 1 - d) + 1]
        slices.append(slice(lo, x.shape[2 + d] - hi))
    return x[tuple(slices)]


def parse_condition_groups(groups: ConditionGroups) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Normalise condition groups to a tuple of groups, each a tuple of ``(name, channels)``.

    Args:
        groups: a sequence of groups; each group is a sequence of ``(name, channels)`` pairs or a mapping
            ``name -> channels`` (a binary mask or an image has 1 channel, one-hot semantics one per class).

    Raises:
        ValueError: on an empty group list or group, a repeated name or a non-positive channel count.
    """
    parsed = []
    seen: set[str] = set()
    for group in groups:
        items = tuple(group.items()) if isinstance(group, Mapping) else tuple(tuple(i) for i in group)
        if not items:
            raise ValueError("a condition group must name at least one condition")
        for name, channels in items:
            if name in seen:
                raise ValueError(f"condition '{name}' appears in more than one place")
            if int(channels) < 1:
                raise ValueError(f"condition '{name}' must have at least one channel, got {channels}")
            seen.add(name)
        parsed.append(tuple((str(n), int(c)) for n, c in items))
    if not parsed:
        raise ValueError("VCM needs at least one condition group")
    return tuple(parsed)


def subset_probabilities(n_groups: int, p_all: float = 0.4) -> dict[tuple[int, ...], float]:
    """Default probabilities of the kept-group subsets for modality latent dropout.

    The paper trains with two groups and keeps only A, only B or both with probability 0.3, 0.3, 0.4. This
    generalises it: all groups are kept with probability ``p_all`` and the rest is spread evenly over every
    non-empty proper subset, so that any subset a user may condition on at sampling time is seen in training.
    One group is always kept. The empty subset (no condition) is never drawn.

    Args:
        n_groups: number of condition groups.
        p_all: probability of keeping every group (ignored for one group).

    Returns:
        mapping from a sorted tuple of kept group indices to its probability; the values sum to 1.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    full = tuple(range(n_groups))
    if n_groups == 1:
        return {full: 1.0}
    if not 0.0 <= p_all <= 1.0:
        raise ValueError(f"p_all must lie in [0, 1], got {p_all}")
    proper = [s for k in range(1, n_groups) for s in itertools.combinations(full, k)]
    probs = dict.fromkeys(proper, (1.0 - p_all) / len(proper))
    probs[full] = p_all
    return probs


def sample_keep_mask(
    batch_size: int,
    n_groups: int,
    probs: Mapping[tuple[int, ...], float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw a per-sample keep mask for modality latent dropout.

    Args:
        batch_size: number of samples.
        n_groups: number of condition groups.
        probs: probability of each kept subset (sorted tuples of group indices, may include the empty tuple);
            defaults to :func:`subset_probabilities` (paper: 0.3 / 0.3 / 0.4 for two groups).
        generator: random generator (CPU) for reproducible draws.
        device: device of the returned mask.

    Returns:
        a float tensor (batch_size, n_groups) of 0s and 1s; multiply a group's features by its column.
    """
    probs = subset_probabilities(n_groups) if probs is None else probs
    subsets = [tuple(sorted(s)) for s in probs]
    weights = torch.tensor([float(probs[s]) for s in probs], dtype=torch.float64)
    if any(i < 0 or i >= n_groups for s in subsets for i in s):
        raise ValueError(f"subset probabilities name a group outside 0..{n_groups - 1}: {subsets}")
    if (weights < 0).any() or not math.isclose(float(weights.sum()), 1.0, abs_tol=1e-6):
        raise ValueError(f"subset probabilities must be non-negative and sum to 1, got {dict(probs)}")
    table = torch.zeros(len(subsets), n_groups)
    for row, subset in enumerate(subsets):
        table[row, list(subset)] = 1.0
    index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    return table[index].to(device)


class ConditionEncoder(nn.Module):
    """Time-free full-resolution encoder of one condition group (the asymmetric part of Fig. 16).

    conv-in (3³) -> ``len(channels)`` levels of two :class:`~monai.networks.nets.autoencoderkl.AEKLResBlock`
    (GroupNorm -> SiLU -> 3³ conv, twice, 1³ skip conv where channels change; second conv zero-initialised),
    each level followed by 2× average pooling.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels (sum over the group's conditions).
        channels: output channels of each level; ``len(channels)`` halvings of the grid.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        num_res_blocks: residual blocks per level (an int for every level, or one entry per level); fewer at
            the full-resolution level make the encoder cheaper (0 leaves conv-in and the pooling).
        norm_eps: GroupNorm epsilon.
        use_checkpointing: recompute each level's activations in the backward pass (saves memory at full
            resolution during training; no effect in eval mode or without grad).
        channels_last: give the first convolution a channels-last input (3-D only): its oneDNN kernels are
            faster on CPU (measured on the demo grid, batch 4: forward + backward 0.62 s -> 0.37 s, outputs
            equal within 2e-6).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 48),
        norm_num_groups: int = 16,
        norm_eps: float = 1e-6,
        use_checkpointing: bool = False,
        channels_last: bool = True,
        num_res_blocks: int | Sequence[int] = 2,
    ) -> None:
        super().__init__()
        blocks_per_level = (
            [int(num_res_blocks)] * len(channels) if isinstance(num_res_blocks, int) else list(num_res_blocks)
        )
        if len(blocks_per_level) != len(channels) or min(blocks_per_level) < 0:
            raise ValueError(
                f"num_res_blocks {num_res_blocks} must be >= 0, one entry per encoder level ({len(channels)})"
            )
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"encoder channels {tuple(channels)} must be multiples of norm_num_groups={norm_num_groups}"
            )
        self.use_checkpointing = use_checkpointing
        self.channels_last = channels_last and spatial_dims == 3
        self.out_channels = channels[-1]
        self.conv_in = Convolution(
            spatial_dims, in_channels, channels[0], strides=1, kernel_size=3, padding=1, conv_only=True
        )
        pool = Pool["avg", spatial_dims]
        levels = []
        prev = channels[0]
        for ch, n_blocks in zip(channels, blocks_per_level, strict=True):
            if n_blocks == 0 and ch != prev:
                raise ValueError(
                    f"an encoder level without residual blocks cannot change {prev} channels to {ch}"
                )
            blocks = []
            for _ in range(n_blocks):
                block = AEKLResBlock(spatial_dims, prev, norm_num_groups, norm_eps, ch)
                nn.init.zeros_(block.conv2.conv.weight)
                nn.init.zeros_(block.conv2.conv.bias)
                blocks.append(block)
                prev = ch
            levels.append(nn.Sequential(*blocks, pool(kernel_size=2, stride=2)))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        h = self.conv_in(x)
        for level in self.levels:
            if self.use_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(level, h, use_reentrant=False)
            else:
                h = level(h)
        return h


class VCM(nn.Module):
    """Volumetric Conditioning Module (Fig. 16): predicts ``(gamma, beta)`` that modulate a frozen LDM.

    Args:
        spatial_dims: number of spatial dimensions.
        latent_channels: channels of the diffusion latent (3 for BrainLDM).
        condition_groups: one encoder branch per group; each group lists ``(name, channels)`` (or maps
            ``name -> channels``); a group's conditions are concatenated along channels in the listed order.
        levels: ``log2`` of the autoencoder's downsampling factor (3 for BrainLDM, 2 for the demo).
        encoder_channels: channels per encoder level; defaults to ``16·[1, 2, ..., levels]``.
        encoder_norm_num_groups: GroupNorm groups in the encoders.
        encoder_num_res_blocks: residual blocks per encoder level (an int or one per level; paper: 2). The
            full-resolution level costs most of a CPU step: ``[0, 2]`` keeps its 3³ conv-in and pooling and
            puts every residual block at half resolution or below.
        unet_channels: latent U-Net channels (paper: 16·[4, 8, 16]).
        unet_num_res_blocks: residual blocks per U-Net level.
        unet_attention_levels: self-attention per U-Net level; defaults to the deepest level only.
        unet_num_head_channels: channels per attention head.
        unet_norm_num_groups: GroupNorm groups in the U-Net.
        unet_out_channels: channels of the U-Net output that feeds the head.
        resblock_updown: residual-block up/downsampling in the U-Net (as in BrainLDM; reproduces the paper's
            parameter count).
        head_channels: hidden channels of the shared head conv.
        use_checkpointing: activation checkpointing in the full-resolution encoders.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        latent_channels: int = 3,
        condition_groups: ConditionGroups = ((("lv", 1),),),
        levels: int = 3,
        encoder_channels: Sequence[int] | None = None,
        encoder_norm_num_groups: int = 16,
        encoder_num_res_blocks: int | Sequence[int] = 2,
        unet_channels: Sequence[int] = (64, 128, 256),
        unet_num_res_blocks: int = 2,
        unet_attention_levels: Sequence[bool] | None = None,
        unet_num_head_channels: int = 32,
        unet_norm_num_groups: int = 32,
        unet_out_channels: int = 64,
        resblock_updown: bool = True,
        head_channels: int = 128,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config: dict = {
            "spatial_dims": spatial_dims,
            "latent_channels": latent_channels,
            "condition_groups": [[[n, c] for n, c in g] for g in parse_condition_groups(condition_groups)],
            "levels": levels,
            "encoder_channels": None if encoder_channels is None else list(encoder_channels),
            "encoder_norm_num_groups": encoder_norm_num_groups,
            "encoder_num_res_blocks": (
                encoder_num_res_blocks
                if isinstance(encoder_num_res_blocks, int)
                else list(encoder_num_res_blocks)
            ),
            "unet_channels": list(unet_channels),
            "unet_num_res_blocks": unet_num_res_blocks,
            "unet_attention_levels": None if unet_attention_levels is None else list(unet_attention_levels),
            "unet_num_head_channels": unet_num_head_channels,
            "unet_norm_num_groups": unet_norm_num_groups,
            "unet_out_channels": unet_out_channels,
            "resblock_updown": resblock_updown,
            "head_channels": head_channels,
            "use_checkpointing": use_checkpointing,
        }
        """JSON-serialisable constructor arguments: ``VCM(**model.config)`` rebuilds the architecture."""
        if levels < 1:
            raise ValueError(
                f"levels must be >= 1 (encoders reduce the image grid to the latent grid), got {levels}"
            )
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.levels = levels
        self.groups = parse_condition_groups(condition_groups)
        encoder_channels = tuple(encoder_channels or [16 * (i + 1) for i in range(levels)])
        if len(encoder_channels) != levels:
            raise ValueError(f"encoder_channels {encoder_channels} must have one entry per level ({levels})")
        self.feature_channels = encoder_channels[-1]
        self.encoders = nn.ModuleList(
            [
                ConditionEncoder(
                    spatial_dims,
                    sum(c for _, c in group),
                    encoder_channels,
                    norm_num_groups=encoder_norm_num_groups,
                    use_checkpointing=use_checkpointing,
                    num_res_blocks=encoder_num_res_blocks,
                )
                for group in self.groups
            ]
        )
        if unet_attention_levels is None:
            unet_attention_levels = [False] * (len(unet_channels) - 1) + [True]
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=2 * latent_channels + self.feature_channels,
            out_channels=unet_out_channels,
            channels=tuple(unet_channels),
            num_res_blocks=unet_num_res_blocks,
            attention_levels=tuple(unet_attention_levels),
            norm_num_groups=unet_norm_num_groups,
            resblock_updown=resblock_updown,
            num_head_channels=unet_num_head_channels,
        )
        # MONAI zero-initialises the U-Net's output conv; the gamma/beta convs below already make VCM the
        # identity, and a second zero layer in series would stall the first updates.
        self.unet.out[-1].conv.reset_parameters()
        self.pad_multiple = 2 ** (len(unet_channels) - 1)
        conv = Convolution
        self.head_shared = nn.Sequential(
            conv(spatial_dims, unet_out_channels, head_channels, kernel_size=3, padding=1, conv_only=True),
            nn.LeakyReLU(0.2),
        )
        self.head_gamma = conv(
            spatial_dims, head_channels, latent_channels, kernel_size=3, padding=1, conv_only=True
        )
        self.head_beta = conv(
            spatial_dims, head_channels, latent_channels, kernel_size=3, padding=1, conv_only=True
        )
        for head in (self.head_gamma, self.head_beta):
            nn.init.zeros_(head.conv.weight)
            nn.init.zeros_(head.conv.bias)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name, _ in group)

    def _group_input(self, index: int, conditions: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        group = self.groups[index]
        present = [name for name, _ in group if conditions.get(name) is not None]
        if not present:
            return None
        if len(present) != len(group):
            missing = [name for name, _ in group if name not in present]
            raise ValueError(
                f"condition group {index} {[n for n, _ in group]} is partly given: missing {missing}"
            )
        tensors = []
        for name, channels in group:
            x = conditions[name]
            if x.dim() == self.spatial_dims + 1:  # no channel dim: a mask or an image
                x = x.unsqueeze(1)
            if not x.is_floating_point():  # uint8 / bool masks
                x = x.float()
            if x.shape[1] != channels:
                raise ValueError(f"condition '{name}' has {x.shape[1]} channels, expected {channels}")
            tensors.append(x)
        return torch.cat(tensors, dim=1)

    def drop_inputs(
        self, conditions: Mapping[str, torch.Tensor], keep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Modality drop (the ablation alternative): zero the *inputs* of dropped groups per sample.

        Args:
            conditions: name -> tensor (B, C, *image spatial).
            keep: (B, n_groups) mask, 1 = keep.

        Returns:
            a new dict; conditions of groups not present are left out.
        """
        out = dict(conditions)
        for g, group in enumerate(self.groups):
            for name, _ in group:
                if conditions.get(name) is not None:
                    x = conditions[name]
                    shape = (-1,) + (1,) * (x.dim() - 1)
                    out[name] = x * keep[:, g].to(x.dtype).reshape(shape)
        return out

    def encode(
        self, conditions: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Time-free condition features at latent resolution, summed over the groups that are present.

        Compute once per sample and pass to :meth:`forward_from_features` at every step.

        Args:
            conditions: name -> tensor (B, C, *image spatial) or (B, *image spatial); a group is present when
                all its conditions are given; absent groups contribute zero features.
            keep: optional (B, n_groups) modality-latent-dropout mask (1 = keep the branch's output).

        Returns:
            (B, feature_channels, *latent spatial), or ``None`` when no group is present (zero features).
        """
        if keep is not None and keep.shape[-1] != self.n_groups:
            raise ValueError(f"keep mask has {keep.shape[-1]} columns, expected {self.n_groups} groups")
        features = None
        for g, encoder in enumerate(self.encoders):
            x = self._group_input(g, conditions)
            if x is None:
                continue
            if any(s % 2**self.levels for s in x.shape[2:]):
                raise ValueError(
                    f"condition grid {tuple(x.shape[2:])} is not divisible by 2**levels={2**self.levels}"
                )
            f = encoder(x)
            if keep is not None:
                f = f * keep[:, g].to(f.dtype).reshape((-1,) + (1,) * (f.dim() - 1))
            features = f if features is None else features + f
        return features

    def forward_from_features(
        self,
        z_t: torch.Tensor,
        eps_t: torch.Tensor,
        t: torch.Tensor,
        features: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict ``(gamma, beta)`` from cached condition features.

        Args:
            z_t: noisy latent (B, latent_channels, *latent spatial).
            eps_t: the frozen model's noise prediction, same shape.
            t: time steps (B,) (a scalar is broadcast).
            features: output of :meth:`encode` (``None`` = zero features).

        Returns:
            ``gamma`` and ``beta``, each shaped like ``eps_t``.
        """
        if features is None:
            features = z_t.new_zeros((z_t.shape[0], self.feature_channels, *z_t.shape[2:]))
        elif features.shape[2:] != z_t.shape[2:]:
            raise ValueError(
                f"features grid {tuple(features.shape[2:])} != latent grid {tuple(z_t.shape[2:])}"
            )
        t = torch.as_tensor(t, device=z_t.device)
        if t.dim() == 0:
            t = t.expand(z_t.shape[0])
        x = torch.cat([z_t, eps_t, features.to(z_t.dtype)], dim=1)
        x, pads = pad_to_multiple(x, self.pad_multiple)
        h = self.unet(x, timesteps=t.long())
        h = self.head_shared(crop_to_shape(h, pads))
        return self.head_gamma(h), self.head_beta(h)

    def forward(
        self,
        z_t: torch.Tensor,
        eps_t: torch.Tensor,
        t: torch.Tensor,
        conditions: Mapping[str, torch.Tensor],
        keep: torch.Tensor | None = None,
        draws: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_from_features(z_t, eps_t, t, encode(conditions, keep))``.

        ``draws`` > 1: the latent inputs hold ``draws`` consecutive rows per condition row (several noise levels
        of one subject), which share its features.
        """
        features = self.encode(conditions, keep)
        if features is not None and draws != 1:
            features = features.repeat_interleave(draws, dim=0)
        return self.forward_from_features(z_t, eps_t, t, features)
