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


def _single_frame_conv(vae, module, original_forward):
    """Forward of a causal 3-D conv that runs a 2-D conv when it sees one frame with zero history.

    Causal padding puts zeros in the earlier temporal taps, so only the last tap touches data; a
    2-D conv with that tap gives the same result without two thirds of the multiply-adds.
    """
    import torch.nn.functional as F

    pad_w, _, pad_h, _, _, _ = module._padding

    def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        history = cache_x is not None and module._padding[4] > 0
        if x.shape[2] != 1 or history or module.stride[0] != 1 or not vae.single_frame_2d:
            return original_forward(x, cache_x)
        weight = module.weight[:, :, -1]
        out = F.conv2d(x[:, :, 0], weight, module.bias, stride=module.stride[1:], padding=(pad_h, pad_w))
        return out.unsqueeze(2)

    return forward


def use_single_frame_convolutions(vae) -> None:
    """Switch every causal conv of the Qwen-Image VAE to the 2-D path for single-frame inputs.

    ``vae.single_frame_2d = False`` switches back (benchmarks compare both).
    """
    vae.single_frame_2d = True
    for module in vae.modules():
        if hasattr(module, "_padding") and isinstance(module, torch.nn.Conv3d) and "forward" not in vars(module):
            module.forward = _single_frame_conv(vae, module, module.forward)


class LatentCodec:
    """Normalised VAE latents ↔ pixels for ``AutoencoderKLQwenImage`` (images as 1-frame videos)."""

    def __init__(self, vae):
        self.vae = vae
        config = vae.config
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale_factor = 2 ** len(config.temperal_downsample)

    @property
    def _single_pass(self) -> bool:
        return not getattr(self.vae, "use_tiling", False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def normalize(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """VAE-space latents → the normalised latents the transformer works on (in their dtype)."""
        dtype = vae_latents.dtype
        return (vae_latents - self.mean.to(vae_latents.device, dtype)) / self.std.to(vae_latents.device, dtype)

    def denormalize(self, latents: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised latents → the VAE's latent space (``z·std + mean``, computed as the reference does)."""
        z = latents.to(dtype)
        reciprocal = 1.0 / self.std.to(z.device, dtype)
        return z / reciprocal + self.mean.to(z.device, dtype)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] → normalised latent means [N, C, H/8, W/8] (VAE dtype)."""
        dtype = self.dtype
        x = pixels.to(self.device, dtype).unsqueeze(2)
        if self._single_pass:
            # One frame needs no temporal cache: the same result without diffusers' per-conv cache copies.
            moments = self.vae.quant_conv(self.vae.encoder(x))[:, : self.vae.config.z_dim, 0]
        else:
            moments = self.vae.encode(x).latent_dist.mode()[:, :, 0]
        return self.normalize(moments)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised float32 latents → pixels in [-1, 1] (VAE dtype)."""
        z = self.denormalize(latents.to(self.device), self.dtype)
        if self._single_pass:
            pixels = self.vae.decoder(self.vae.post_quant_conv(z.unsqueeze(2)))[:, :, 0]
        else:
            pixels = self.vae.decode(z.unsqueeze(2)).sample[:, :, 0]
        return pixels.clamp(-1, 1)


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] → PIL RGB, with the released rounding (ops in the pixel dtype, truncation)."""
    y = ((pixels * 127.5 + 128) / 255).clamp(0, 1)
    array = (y.to(torch.float32).cpu() * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


# Latent → RGB factors of the Wan 2.1 latent space, which the Qwen-Image VAE shares: one row per
# latent channel (normalised latents), columns R, G, B, plus a bias; the output is in [-1, 1]. These
# numbers are data published with ComfyUI (comfy/latent_formats.py, class Wan21), which uses them for
# its own latent previews of Wan 2.1 and Qwen-Image.
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def latents_preview(
    latents: torch.Tensor, rgb_factors: torch.Tensor | None = None, rgb_bias: torch.Tensor | None = None
) -> Image.Image:
    """An RGB look at the first sample's normalised latents ``[N, C, h, w]`` for progress UIs (no VAE pass).

    16-channel latents (the released Qwen-Image VAE) map through a linear ``C → RGB`` fit of the
    latent space, ``rgb_factors`` ``[C, 3]`` and ``rgb_bias`` ``[3]`` (default: the Wan 2.1 table
    above). Other channel counts (tiny test checkpoints) show their first three channels, min-max
    scaled.
    """
    x = latents[0].detach().to(torch.float32).cpu()
    if rgb_factors is None and x.shape[0] == len(WAN21_RGB_FACTORS):
        rgb_factors, rgb_bias = torch.tensor(WAN21_RGB_FACTORS), torch.tensor(WAN21_RGB_BIAS)
    if rgb_factors is not None:
        factors = torch.as_tensor(rgb_factors, dtype=torch.float32)
        if factors.shape != (x.shape[0], 3):
            raise ValueError(f"rgb_factors must be [{x.shape[0]}, 3] for these latents, got {tuple(factors.shape)}")
        bias = torch.zeros(3) if rgb_bias is None else torch.as_tensor(rgb_bias, dtype=torch.float32)
        rgb = torch.einsum("chw,ck->khw", x, factors) + bias.view(3, 1, 1)
        x = ((rgb + 1) / 2).clamp(0, 1)
    else:
        x = x[:3] if x.shape[0] >= 3 else x.repeat(3, 1, 1)[:3]
        lo = x.amin(dim=(1, 2), keepdim=True)
        hi = x.amax(dim=(1, 2), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
    array = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
