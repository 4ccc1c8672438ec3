"""Flow-matching sampling: DPM-Solver++ steps, three-way guidance, VAE encode/decode, pixel conversion."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("internvl_u_core")

FLOW_SHIFT = 3.0  # the released pipeline forces this at every call, whatever the configs say
RENORM_TIMESTEP = 930  # guidance differences are renormalised above this (integer) timestep
RENORM_EXPONENT = 0.4

StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


def make_scheduler(base_scheduler, flow_shift: float = FLOW_SHIFT):
    """A fresh scheduler per run (schedulers keep per-run state) with the given flow shift (the released 3.0)."""
    return type(base_scheduler).from_config(base_scheduler.config, flow_shift=flow_shift)


def combine_guidance(
    v_full: torch.Tensor,
    v_part: torch.Tensor,
    v_uncond: torch.Tensor,
    timestep: int,
    all_scale: float,
    part_scale: float,
    renorm_above: float = RENORM_TIMESTEP,
) -> torch.Tensor:
    """``u + part·(p − u) + all·(c − p)``; early steps divide each difference by ``max(‖Δ‖_c, 1)^0.4``.

    "Early" means an integer timestep above ``renorm_above``; ``renorm_above <= 0`` switches the
    renormalisation off (as vLLM-Omni's ``timestep_trunc`` does).
    """
    delta_part = v_part - v_uncond
    delta_all = v_full - v_part
    if 0 < renorm_above < timestep:
        delta_part = delta_part / _renorm_factor(delta_part)
        delta_all = delta_all / _renorm_factor(delta_all)
    return v_uncond + part_scale * delta_part + all_scale * delta_all


def _renorm_factor(delta: torch.Tensor) -> torch.Tensor:
    norm = delta.norm(dim=1, keepdim=True)  # L2 over channels at each latent pixel
    return torch.where(norm > 1, norm.pow(RENORM_EXPONENT), torch.ones_like(norm))


class SingleFrameVAE:
    """Encode and decode single images with the Qwen-Image VAE, without its video machinery when it can.

    diffusers runs this VAE as a video model: causal 3-D convolutions over a frame cache that it copies
    at every layer. For one frame with no history only the last temporal tap of each causal conv sees
    data, so a 2-D conv with that tap gives the same numbers with a third of the work, and calling the
    encoder/decoder without a cache skips the copies. That relies on diffusers internals (the causal
    conv's ``_padding`` and ``forward(x, cache_x)``, the encoder/decoder ``feat_cache`` argument);
    :func:`fast_path_problem` checks them when the object is made. When they differ, or with
    ``fast_path = False`` or tiling on, every call goes through ``vae.encode``/``vae.decode``, which
    give the same pixels.
    """

    def __init__(self, vae):
        self.vae = vae
        self.problem = fast_path_problem(vae)
        self.fast_path = self.problem is None  # benchmarks switch it off to compare
        if self.problem is None:
            for module in _causal_convs(vae):
                if "forward" not in vars(module):
                    module.forward = self._single_frame_conv(module, module.forward)
        else:
            logger.info("VAE single-frame path off (diffusers %s): %s", _diffusers_version(), self.problem)

    @property
    def _fast(self) -> bool:
        return self.fast_path and not getattr(self.vae, "use_tiling", False)

    def encode_mode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 1, H, W] → the latent distribution's mode [N, z_dim, H/8, W/8]."""
        if self._fast:
            return self.vae.quant_conv(self.vae.encoder(x))[:, : self.vae.config.z_dim, 0]
        return self.vae.encode(x).latent_dist.mode()[:, :, 0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[N, z_dim, 1, h, w] → pixels [N, 3, H, W] in [-1, 1]."""
        if self._fast:
            pixels = self.vae.decoder(self.vae.post_quant_conv(z))[:, :, 0]
        else:
            pixels = self.vae.decode(z).sample[:, :, 0]
        return pixels.clamp(-1, 1)

    def _single_frame_conv(self, module, original_forward):
        """A causal conv's forward that runs the equivalent 2-D conv on one frame with zero history."""
        import torch.nn.functional as F

        pad_w, _, pad_h, _, _, _ = module._padding

        def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
            history = cache_x is not None and module._padding[4] > 0
            if x.shape[2] != 1 or history or module.stride[0] != 1 or not self.fast_path:
                return original_forward(x, cache_x)
            out = F.conv2d(x[:, :, 0], module.weight[:, :, -1], module.bias, stride=module.stride[1:],
                           padding=(pad_h, pad_w))
            return out.unsqueeze(2)

        return forward


def fast_path_problem(vae) -> str | None:
    """Why :class:`SingleFrameVAE` cannot skip diffusers' video path for ``vae``, or None when it can."""
    import inspect

    for part in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        if not isinstance(getattr(vae, part, None), torch.nn.Module):
            return f"the VAE has no {part} module"
    for part in (vae.encoder, vae.decoder):
        if "feat_cache" not in inspect.signature(part.forward).parameters:
            return f"{type(part).__name__}.forward takes no feat_cache argument"
    convs = _causal_convs(vae)
    if not convs:
        return "no causal 3-D convolutions with a _padding attribute found"
    for module in convs:
        pad = module._padding
        if list(inspect.signature(type(module).forward).parameters)[1:] != ["x", "cache_x"]:
            return f"{type(module).__name__}.forward is not forward(x, cache_x)"
        if not (isinstance(pad, tuple) and len(pad) == 6 and pad[0] == pad[1] and pad[2] == pad[3] and pad[5] == 0):
            return f"{type(module).__name__}._padding {pad!r} is not (w, w, h, h, t, 0)"
        if tuple(module.padding) != (0, 0, 0):
            return f"{type(module).__name__} pads inside the convolution too ({module.padding})"
        if module.stride[0] == 1 and pad[4] != module.kernel_size[0] - 1:
            return f"{type(module).__name__} is not causal in time (kernel {module.kernel_size}, padding {pad})"
    return None


def _causal_convs(vae) -> list[torch.nn.Module]:
    return [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d) and hasattr(m, "_padding")]


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "unknown"


def use_reference_norms(vae) -> None:
    """Compute the VAE's RMS norms in the input dtype, as the reference's diffusers (0.35) does.

    diffusers 0.38 and later normalise bfloat16/float16 inputs in float32 and cast back; in
    bfloat16 that moves decoded pixels by up to about seven grey levels against the reference.
    In float32 both are the same computation.
    """
    import torch.nn.functional as F

    def reference_norm(module):
        dim = 1 if module.channel_first else -1

        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x, dim=dim) * module.scale * module.gamma + module.bias

        return forward

    for module in vae.modules():
        if type(module).__name__ == "QwenImageRMS_norm" and "forward" not in vars(module):
            module.forward = reference_norm(module)


class LatentCodec:
    """Normalised VAE latents ↔ pixels for ``AutoencoderKLQwenImage`` (images as 1-frame videos)."""

    def __init__(self, vae):
        self.frames = SingleFrameVAE(vae)
        config = vae.config
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale_factor = 2 ** len(config.temperal_downsample)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.frames.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.frames.vae.parameters()).device

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
        moments = self.frames.encode_mode(pixels.to(self.device, dtype).unsqueeze(2))
        return self.normalize(moments)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised float32 latents → pixels in [-1, 1] (VAE dtype)."""
        z = self.denormalize(latents.to(self.device), self.dtype)
        return self.frames.decode(z.unsqueeze(2))


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
