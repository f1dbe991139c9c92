"""What the trained backbone makes: DDIM samples at chosen covariates and the figure that shows them.

``samples.png`` of the bundle (and ``ldm/samples_stepNNNNNN.png`` while the U-Net trains) puts real held-out
images, their reconstructions and samples at young/old × small/large-ventricle covariates side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcm.backbone_training.corpus import Corpus
from vcm.backbone_training.loop import module_device

__all__ = ["covariate_settings", "sample_images", "samples_figure"]


def covariate_settings(covariates: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Young/old × small/large ventricles at the corpus' 10th/90th percentiles; sex 0, median brain volume."""
    q = torch.quantile(covariates.float(), torch.tensor([0.1, 0.5, 0.9]), dim=0)
    out = []
    for age_name, age in (("young", q[0, 1]), ("old", q[2, 1])):
        for lv_name, lv in (("small LV", q[0, 2]), ("large LV", q[2, 2])):
            out.append((f"{age_name}, {lv_name}", torch.stack([torch.tensor(0.0), age, lv, q[1, 3]])))
    return out


@torch.no_grad()
def sample_images(
    backbone: Any, covariates: torch.Tensor, seeds: Sequence[int], ddim_steps: int
) -> torch.Tensor:
    """DDIM samples decoded to images (B, 1, *grid), one per seed, all at ``covariates`` (4,) or (B, 4)."""
    from vcm.diffusion import ddim_scheduler, noise_from_seeds, sample_latents

    factor = backbone.downsample_factor
    grid = backbone.definitions.get("grid") if backbone.definitions else None
    if grid is None:
        raise ValueError("the backbone definitions carry no image grid")
    shape = (backbone.latent_channels, *(s // factor for s in grid))
    device = module_device(backbone)
    cov = covariates.reshape(-1, 1, 4).expand(len(seeds), 1, 4).to(device)
    noise = noise_from_seeds(seeds, shape, device=device)
    z = sample_latents(lambda z, t: backbone.eps(z, t, cov), noise, ddim_scheduler(ddim_steps))
    return backbone.decode(z).clamp(0, 1).cpu()


def samples_figure(
    path: Path,
    backbone: Any,
    corpus: Corpus,
    ddim_steps: int,
    seeds: Sequence[int] = (0, 1),
    title: str = "",
) -> None:
    """Real held-out images, their reconstructions, and DDIM samples at four covariate settings."""
    from vcm.plots import three_plane_montage

    pool = corpus.val if len(corpus.val) else corpus.train
    real_idx = torch.from_numpy(pool[:2])
    real = corpus.images[real_idx].float()
    with torch.no_grad():
        mu, _ = backbone.encode(real.to(module_device(backbone)))
        recon = backbone.autoencoder.decode(mu).clamp(0, 1).cpu()
    panels: list[tuple[str, np.ndarray]] = []
    for i in range(real.shape[0]):
        panels.append((f"real #{int(real_idx[i])}", real[i, 0].numpy()))
        panels.append((f"AE reconstruction #{int(real_idx[i])}", recon[i, 0].numpy()))
    for name, cov in covariate_settings(corpus.covariates[torch.from_numpy(corpus.train)]):
        images = sample_images(backbone, cov, seeds, ddim_steps)
        for s, img in zip(seeds, images, strict=True):
            panels.append((f"sample: {name} (seed {s})", img[0].numpy()))
    three_plane_montage(
        path, panels, title or f"tiny backbone: real, reconstruction, DDIM-{ddim_steps} samples"
    )
