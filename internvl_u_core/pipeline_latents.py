"""Latent codecs: the VAE between latents and pictures, and the VAE's own latent space."""

from __future__ import annotations

import torch
from PIL import Image

from . import validation as check
from .sampling import latents_preview, pixels_to_pil
from .tracing import RunTrace


class LatentCodecs:
    """Latents ↔ pictures and latent spaces (a part of :class:`InternVLUPipeline`)."""

    def decode_latents_preview(
        self, latents: torch.Tensor, rgb_factors: torch.Tensor | None = None, rgb_bias: torch.Tensor | None = None
    ) -> Image.Image:
        """A cheap RGB preview of the current latents (no VAE pass); see ``sampling.latents_preview``."""
        return latents_preview(latents, rgb_factors, rgb_bias)

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images from normalised latents ``[N, C, H/8, W/8]``, decoded as ``generate``/``edit`` decode theirs."""
        self._require_generation()
        latents = check.latents(latents, self.codec.mean.shape[1])
        with self._lock:
            self._activate(self.vae)
            return [picture for sample in latents.split(1) for picture in pixels_to_pil(self.codec.decode(sample))]

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's normalised latents in the VAE's own latent space (``z·std + mean``, float32).

        That space is what other tools hold, e.g. ComfyUI's LATENT for the Qwen-Image VAE.
        """
        self._require_generation()
        return self.codec.denormalize(check.latents(latents, self.codec.mean.shape[1]))

    def from_vae_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_vae_latents`: VAE-space latents → the pipeline's normalised latents."""
        self._require_generation()
        return self.codec.normalize(check.latents(vae_latents, self.codec.mean.shape[1]))

    def _to_pictures(self, latents, requested, trace: RunTrace) -> list[Image.Image]:
        self._activate(self.vae)
        pictures = []
        for sample in latents.split(1):
            pixels = self.codec.decode(sample)
            trace.record("diffusion.decoded_pixels", pixels)
            pictures += pixels_to_pil(pixels)
        if (pictures[0].width, pictures[0].height) != tuple(requested):
            pictures = [p.resize(tuple(requested), Image.Resampling.LANCZOS) for p in pictures]
        return pictures
