"""Flow-matching sampling: DPM-Solver++ steps, three-way guidance, VAE encode/decode, pixel conversion."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

FLOW_SHIFT = 3.0  # the released pipeline forces this at every call, whatever the configs say
RENORM_TIMESTEP = 930  # guidance differences are renormalised above this (integer) timestep
RENORM_EXPONENT = 0.4

StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


def make_scheduler(base_scheduler):
    """A fresh scheduler per run (schedulers keep per-run state) with the forced flow shift."""
    return type(base_scheduler).from_config(base_scheduler.config, flow_shift=FLOW_SHIFT)


def combine_guidance(
    v_full: torch.Tensor,
    v_part: torch.Tensor,
    v_uncond: torch.Tensor,
    timestep: int,
    all_scale: float,
    part_scale: float,
) -> torch.Tensor:
    """``u + part·(p − u) + all·(c − p)``; early steps divide each difference by ``max(‖Δ‖_c, 1)^0.4``."""
    delta_part = v_part - v_uncond
    delta_all = v_full - v_part
    if timestep > RENORM_TIMESTEP:
        delta_part = delta_part / _renorm_factor(delta_part)
        delta_all = delta_all / _renorm_factor(delta_all)
    return v_uncond + part_scale * delta_part + all_scale * delta_all


def _renorm_factor(delta: torch.Tensor) -> torch.Tensor:
    norm = delta.norm(dim=1, keepdim=True)  # L2 over channels at each latent pixel
    return torch.where(norm > 1, norm.pow(RENORM_EXPONENT), torch.ones_like(norm))


class LatentCodec:
    """Normalised VAE latents ↔ pixels for ``AutoencoderKLQwenImage`` (images as 1-frame videos)."""

    def __init__(self, vae):
        self.vae = vae
        config = vae.config
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale_factor = 2 ** len(config.temperal_downsample)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] → normalised latent means [N, C, H/8, W/8] (VAE dtype)."""
        dtype = self.dtype
        x = pixels.to(self.device, dtype).unsqueeze(2)
        moments = self.vae.encode(x).latent_dist.mode()[:, :, 0]
        mean = self.mean.to(moments.device, dtype)
        std = self.std.to(moments.device, dtype)
        return (moments - mean) / std

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised float32 latents → pixels in [-1, 1] (VAE dtype)."""
        dtype = self.dtype
        z = latents.to(self.device, dtype)
        reciprocal = 1.0 / self.std.to(z.device, dtype)
        z = z / reciprocal + self.mean.to(z.device, dtype)
        pixels = self.vae.decode(z.unsqueeze(2)).sample[:, :, 0]
        return pixels.clamp(-1, 1)


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] → PIL RGB, with the released rounding (ops in the pixel dtype, truncation)."""
    y = ((pixels * 127.5 + 128) / 255).clamp(0, 1)
    array = (y.to(torch.float32).cpu() * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


def latents_preview(latents: torch.Tensor) -> Image.Image:
    """A rough RGB look at the first sample's latents (first three channels, min-max scaled), for progress UIs."""
    x = latents[0, :3].detach().to(torch.float32).cpu()
    if x.shape[0] < 3:
        x = x.repeat(3, 1, 1)[:3]
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    array = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
