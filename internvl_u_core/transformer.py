"""The InternVL-U generation decoder: a single-sequence MMDiT with two weight sets.

Every row of the batch is one packed sequence ``[target latent | reference latents | text]``.
Image tokens (target and references) go through the image weights (``img_*``, ``to_q/k/v``,
``to_out``), text tokens through the text weights (``txt_*``, ``add_*_proj``, ``to_add_out``);
the two streams only meet inside the joint attention. Here the two streams are kept as two
flat, unpadded token tensors, so each token is computed with its own weight set only, and are
packed per row just for the attention call.

The step-invariant work (packing indices, RoPE tables, and on the first step the text and
reference-latent projections) lives in :class:`DecoderContext`, built once per sampling run by
``prepare_context``; each denoising step then calls the model with ``context=``.

The DiT is a diffusers ``ModelMixin``: attention goes through diffusers' dispatcher (so
``set_attention_backend`` applies), and ``enable_layerwise_casting``, ``enable_group_offload``,
``enable_cache`` and ``compile_repeated_blocks`` work on it, and so do diffusers' PEFT adapter
methods (``load_lora_adapter``, ``set_adapters``, ``fuse_lora``...; see ``internvl_u_core.lora``) and
``enable_gradient_checkpointing`` (LoRA training).

Precision follows the reference for half-precision models: the timestep is rounded to the model
dtype before the sinusoid, LayerNorms and RoPE run in float32 and are cast back, the output
head's modulation runs in float32, everything else in the model dtype.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import nn

from .errors import InvalidInputError, ModelLoadError

__all__ = [
    "DecoderContext",
    "InternVLUGenerationDecoder",
    "InternVLUGenerationDecoderConfig",
    "InternVLUTransformer2DModel",
]

_NORM_EPS = 1e-6
_ROPE_THETA = 10000.0
_TIMESTEP_CHANNELS = 256
_FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------
# Configuration of the wrapper (the DiT's own configuration is its diffusers config)
# --------------------------------------------------------------------------------------------


@dataclass
class InternVLUGenerationDecoderConfig:
    """``generation_decoder/config.json``; only the fields that inference reads are typed.

    ``decoder_config`` holds every init argument of the DiT (defaults filled in, training-only
    keys dropped), with the wrapper's position scales written over the decoder's own.
    """

    decoder_config: dict[str, Any]
    vlm_select_layer: list[int] = field(default_factory=lambda: [-1])
    input_hidden_size: int = 1536
    output_hidden_size: int = 2304
    decoder_projector_type: str = "mlp2x_gelu"
    padding_encoder_hidden_states: bool = True
    pad_to_fix_length: bool = True
    max_sequence_length: int = 512
    gen_image_height: int = 512
    gen_image_width: int = 512
    video_position_scale_factor: float = 1.0
    vlm_cond_position_scale_factor: float = 1.0
    flow_shift: float = 3.0  # stored but unused by sampling (the effective shift is always 3.0)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def projector_output_size(self) -> int:
        return self.output_hidden_size if self.decoder_projector_type == "mlp2x_gelu" else self.input_hidden_size

    @classmethod
    def from_dict(
        cls,
        data: dict,
        source: str = "generation_decoder/config.json",
        config_dir: str | os.PathLike | None = None,
    ) -> InternVLUGenerationDecoderConfig:
        decoder_data = data.get("decoder_config")
        if decoder_data is None:
            raise ModelLoadError(f"{source} has no 'decoder_config'")
        if isinstance(decoder_data, (str, os.PathLike)):
            # The reference also accepts a path to a JSON file here.
            path = Path(decoder_data)
            if not path.is_absolute() and config_dir is not None:
                path = Path(config_dir) / path
            try:
                decoder_data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelLoadError(f"{source}: cannot read decoder_config file {path}: {exc}") from exc
        if not isinstance(decoder_data, dict):
            raise ModelLoadError(f"{source}: 'decoder_config' must be an object or a path to a JSON file")
        decoder_config = _dit_arguments(decoder_data)
        # The wrapper overwrites the decoder's position scales with its own values.
        video_scale = float(data.get("video_position_scale_factor", 1.0))
        vlm_scale = float(data.get("vlm_cond_position_scale_factor", 1.0))
        decoder_config["video_position_scale_factor"] = video_scale
        decoder_config["vlm_cond_position_scale_factor"] = vlm_scale
        _check_decoder_config(decoder_config, f"{source} (decoder_config)")

        select = data.get("vlm_select_layer", [-1])
        if isinstance(select, int):
            select = [select]
        projector = data.get("decoder_projector_type", "mlp2x_gelu")
        if projector not in ("mlp2x_gelu", "identity"):
            raise ModelLoadError(
                f"{source}: decoder_projector_type {projector!r} is not supported (use 'mlp2x_gelu' or 'identity')"
            )
        config = cls(
            decoder_config=decoder_config,
            vlm_select_layer=[int(i) for i in select],
            input_hidden_size=int(data.get("input_hidden_size", 1536)),
            output_hidden_size=int(data.get("output_hidden_size") or 2304),
            decoder_projector_type=projector,
            padding_encoder_hidden_states=bool(data.get("padding_encoder_hidden_states", True)),
            pad_to_fix_length=bool(data.get("pad_to_fix_length", True)),
            max_sequence_length=int(data.get("max_sequence_length", 512)),
            gen_image_height=int(data.get("gen_image_height", 512)),
            gen_image_width=int(data.get("gen_image_width", 512)),
            video_position_scale_factor=video_scale,
            vlm_cond_position_scale_factor=vlm_scale,
            flow_shift=float(data.get("flow_shift", 3.0)),
            raw=dict(data),
        )
        if config.projector_output_size != decoder_config["joint_attention_dim"]:
            raise ModelLoadError(
                f"{source}: the projector outputs {config.projector_output_size} channels but "
                f"decoder_config.joint_attention_dim is {decoder_config['joint_attention_dim']}"
            )
        return config


def _dit_arguments(data: dict) -> dict:
    """The DiT's init arguments: its defaults, overridden by the known keys of ``data`` (others dropped)."""
    params = inspect.signature(InternVLUTransformer2DModel.__init__).parameters
    arguments = {name: p.default for name, p in params.items() if name != "self"}
    arguments.update((k, v) for k, v in data.items() if k in arguments and v is not None)
    return arguments


def _check_decoder_config(config: dict, source: str = "decoder_config") -> None:
    """Shape rules the DiT's init arguments must follow; a ``ModelLoadError`` names the broken one."""
    axes, head_dim = tuple(config["axes_dims_rope"]), config["attention_head_dim"]
    if len(axes) != 3 or any(d % 2 for d in axes):
        raise ModelLoadError(f"{source}: axes_dims_rope must be three even numbers, got {axes}")
    if sum(axes) != head_dim:
        raise ModelLoadError(f"{source}: axes_dims_rope {axes} must sum to attention_head_dim ({head_dim})")
    patch_area = config["patch_size"] ** 2
    if config["in_channels"] % patch_area:
        raise ModelLoadError(
            f"{source}: in_channels ({config['in_channels']}) must be a multiple of patch_size² ({patch_area})"
        )


# --------------------------------------------------------------------------------------------
# Small numerics helpers
# --------------------------------------------------------------------------------------------


def _layer_norm_fp32(x: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm (eps 1e-6) computed in float32, cast back to the input dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=_NORM_EPS).to(x.dtype)


def _per_token(values: torch.Tensor, row_ids: torch.Tensor | None) -> torch.Tensor:
    """Broadcast per-row vectors [B, k] to tokens: [1, k] when every row is equal, else [N, k]."""
    return values[:1] if row_ids is None else values.index_select(0, row_ids)


def _apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2m, 2m+1) of x [N, H, hd] by rope [N, hd/2] (complex64).

    The rotation is a complex product in float32, cast back to x's dtype (as the reference).
    """
    if rope.is_complex():
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [N, H, hd/2]
        return torch.view_as_real(pairs * rope.unsqueeze(1)).flatten(-2).type_as(x)
    # Real-valued fallback for devices without complex support: rope = [N, hd/2, 2] (cos, sin).
    cos, sin = rope[..., 0].unsqueeze(1), rope[..., 1].unsqueeze(1)
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


def _patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """[C, h, w] → [(h/p)·(w/p), C·p²]: raster order of p×p blocks, features in (c, dy, dx) order."""
    c, h, w = latent.shape
    x = latent.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
    return x.reshape((h // p) * (w // p), c * p * p)


def _unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`_patchify`: [(h/p)·(w/p), C·p²] → [C, h, w]."""
    c = tokens.shape[-1] // (p * p)
    x = tokens.reshape(h // p, w // p, c, p, p).permute(2, 0, 3, 1, 4)
    return x.reshape(c, h, w)


# --------------------------------------------------------------------------------------------
# 3-axis RoPE positions
# --------------------------------------------------------------------------------------------


def _centered_coords(n: int, scale: float) -> torch.Tensor:
    """Centered indices -(n - n//2) … n//2 - 1, optionally stretched by 1/scale (float32)."""
    lo, hi = -(n - n // 2), n // 2 - 1
    coords = torch.arange(lo, hi + 1, dtype=torch.float32)
    if scale != 1 and n > 1:
        new_lo, new_hi = -int((n - n // 2) / scale), int((n // 2) / scale) - 1
        coords = (coords - lo) / (hi - lo) * (new_hi - new_lo) + new_lo
    return coords


def _grid_positions(frames: int, h: int, w: int, frame_offset: int, scale: float) -> torch.Tensor:
    """(frame, y, x) of a frames×h×w token grid in raster order → [frames·h·w, 3] float32."""
    f = torch.arange(frames, dtype=torch.float32) + frame_offset
    y = _centered_coords(h, scale)
    x = _centered_coords(w, scale)
    grid = torch.stack(torch.meshgrid(f, y, x, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def _next_position(block: torch.Tensor) -> int:
    """The text counter after a block: int(max over all three coordinates) + 1."""
    return int(block.max().item()) + 1


def _text_positions(image_mask: Sequence[bool], fhw: Sequence[Sequence[int]], start: int, scale: float) -> torch.Tensor:
    """Positions of one row's text stream [T, 3] (float32).

    Text tokens get (cur, cur, cur). The j-th run of ``<IMG_CONTEXT>`` tokens gets the grid of
    ``fhw[j]`` at frame ``cur`` with h/w stretched by ``scale`` when the run is complete;
    a run cut short by truncation (or without an ``fhw`` entry) is numbered like text.
    """
    out: list[torch.Tensor] = []
    cur = start
    t, run_index, n = 0, 0, len(image_mask)
    while t < n:
        if not image_mask[t]:
            end = t
            while end < n and not image_mask[end]:
                end += 1
        else:
            end = t
            while end < n and image_mask[end]:
                end += 1
            length = end - t
            grid = fhw[run_index] if run_index < len(fhw) else None
            run_index += 1
            if grid is not None and length == grid[0] * grid[1] * grid[2]:
                block = _grid_positions(grid[0], grid[1], grid[2], cur, scale)
                out.append(block)
                cur = _next_position(block)
                t = end
                continue
        # Text-like numbering: consecutive and equal on all three axes.
        steps = torch.arange(cur, cur + end - t, dtype=torch.float32)
        out.append(steps[:, None].expand(-1, 3))
        cur += end - t
        t = end
    if not out:
        return torch.zeros(0, 3, dtype=torch.float32)
    return torch.cat(out)


class InternVLURotaryEmbedding(nn.Module):
    """3-axis (frame, y, x) RoPE with float positions; no parameters or stored tables.

    The inverse frequencies are recomputed at each call, so the module can be built on the meta
    device and loaded without buffers.
    """

    def __init__(self, axes_dims: Sequence[int], theta: float = _ROPE_THETA):
        super().__init__()
        self.axes_dims = tuple(int(d) for d in axes_dims)
        self.theta = float(theta)

    def forward(self, positions: torch.Tensor, use_complex: bool = True) -> torch.Tensor:
        """positions [N, 3] float32 → complex64 [N, hd/2] (or real [N, hd/2, 2] = cos, sin)."""
        angles = []
        for axis, dim in enumerate(self.axes_dims):
            exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
            inv_freq = 1.0 / torch.pow(self.theta, exponent)  # [dim/2]
            angles.append(positions[:, axis, None] * inv_freq[None, :])
        phi = torch.cat(angles, dim=-1)  # [N, hd/2], frame pairs first, then y, then x
        if use_complex:
            return torch.polar(torch.ones_like(phi), phi)
        return torch.stack((phi.cos(), phi.sin()), dim=-1)


# --------------------------------------------------------------------------------------------
# Step-invariant context
# --------------------------------------------------------------------------------------------


@dataclass
class DecoderContext:
    """Everything about a batch that does not change between the denoising steps of one run.

    Token streams are flat and unpadded. The image stream is ordered
    ``[targets of rows 0..B-1, references of rows 0..B-1]``, the text stream ``[text of rows
    0..B-1]``. ``*_pack_index`` give each token's position in the row-contiguous packed
    sequence ``[row 0: target, refs, text | row 1: …]`` used by the attention.

    ``text_tokens`` and ``reference_tokens`` (the projected text and reference latents) are
    filled in by the model's first step with this context, inside its ``forward``, so that
    hooks on the model (group offloading, layerwise casting) see those projections too.
    """

    batch_size: int
    target_grids: list[tuple[int, int]]  # per row: (h, w) in latent pixels
    num_target_tokens: list[int]
    num_reference_tokens: list[int]
    num_text_tokens: list[int]
    text_states: torch.Tensor  # [N_txt, J] valid conditioning tokens, model dtype
    reference_patches: torch.Tensor | None  # [N_ref, C·p²] patchified reference latents, model dtype
    image_rope: torch.Tensor  # [N_img, hd/2] complex64 (or [N_img, hd/2, 2] cos/sin)
    text_rope: torch.Tensor  # [N_txt, hd/2] complex64 (or [N_txt, hd/2, 2])
    image_row_ids: torch.Tensor  # [N_img] long, row of each image-stream token
    text_row_ids: torch.Tensor  # [N_txt] long
    image_pack_index: torch.Tensor  # [N_img] long, position in the packed sequence
    text_pack_index: torch.Tensor  # [N_txt] long
    row_spans: list[tuple[int, int]]  # [start, end) of each row in the packed sequence
    positions: list[torch.Tensor] = field(default_factory=list, repr=False)  # per row [L_b, 3], for inspection
    text_tokens: torch.Tensor | None = field(default=None, repr=False)  # [N_txt, D] txt_in(txt_norm(text_states))
    reference_tokens: torch.Tensor | None = field(default=None, repr=False)  # [N_ref, D] img_in(reference_patches)
    steps_run: int = 0  # forward calls made with this context (a cache hook resets on the first)

    @property
    def total_target_tokens(self) -> int:
        return sum(self.num_target_tokens)

    @property
    def total_tokens(self) -> int:
        return self.row_spans[-1][1] if self.row_spans else 0

    @property
    def equal_row_lengths(self) -> bool:
        lengths = {end - start for start, end in self.row_spans}
        return len(lengths) <= 1


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _timestep_frequencies() -> torch.Tensor:
    """The float32 sinusoid frequencies f_k = exp(-ln(10000)·k/128), k = 0…127, of the reference.

    The exponent is formed in float32 exactly as diffusers' ``get_timestep_embedding`` does. The
    last bit of f_k then depends on the float32 ``exp`` implementation, and it matters: the
    sinusoid arguments reach 1e6 rad, where one ulp of f_k moves the DiT output by ~1e-3. The
    reference's table (fitted to the float32 fixtures) is exp rounded to nearest, except at the
    near-ties k = 12 and k = 106 (0.48 ulp), which it rounds up. torch.exp of other builds
    differs at other near-ties (e.g. k = 13, 44, 119), so the table is fixed here instead.
    """
    half = _TIMESTEP_CHANNELS // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
    freqs = torch.exp(exponent.double()).float()
    for k in (12, 106):
        freqs[k] = torch.nextafter(freqs[k], torch.tensor(1.0))
    return freqs


class InternVLUTimestepProjEmbeddings(nn.Module):
    """Sinusoid(256, scale 1000, cos first) → ``timestep_embedder`` (Linear → SiLU → Linear)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(_TIMESTEP_CHANNELS, embedding_dim)
        self._freqs: dict[torch.device, torch.Tensor] = {}  # lazily built, never a state-dict entry

    def sinusoid(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """timestep [B] → [B, 256] = [cos | sin] of 1000·(float32(dtype(t))·f_k), in dtype."""
        freqs = self._freqs.get(timestep.device)
        if freqs is None:
            with torch.inference_mode(False):  # a normal tensor, reusable outside inference mode
                freqs = self._freqs[timestep.device] = _timestep_frequencies().to(timestep.device)
        # The reference rounds t to the model dtype first, then forms t·f_k in float32 and only
        # then multiplies by 1000 (the order changes the float32 result).
        args = 1000 * (timestep.to(dtype).float()[:, None] * freqs[None, :])
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.sinusoid(timestep, dtype))  # [B, D]


class InternVLUAttnProcessor:
    """Joint attention of the two streams through diffusers' ``dispatch_attention_fn``.

    The streams are scattered into the row-contiguous packed sequence; rows of equal length go
    through one batched call ``[B, L, H, hd]``, otherwise each row gets its own call (rows never
    attend to each other, so no padding and no mask). ``set_attention_backend`` sets
    ``_attention_backend`` (None = diffusers' active backend, by default torch SDPA).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: InternVLUAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        context: DecoderContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_i, k_i, v_i, g_i = attn.project(hidden_states, context.image_rope, text=False)
        q_t, k_t, v_t, g_t = attn.project(encoder_hidden_states, context.text_rope, text=True)

        def pack(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            packed = image.new_empty(context.total_tokens, attn.heads, attn.head_dim)
            packed.index_copy_(0, context.image_pack_index, image)
            packed.index_copy_(0, context.text_pack_index, text)
            return packed  # [N_tot, H, hd]

        q, k, v = pack(q_i, q_t), pack(k_i, k_t), pack(v_i, v_t)
        if context.equal_row_lengths:
            shape = (context.batch_size, -1, attn.heads, attn.head_dim)
            out = dispatch_attention_fn(q.view(shape), k.view(shape), v.view(shape), backend=self._attention_backend)
        else:
            out = torch.cat([
                dispatch_attention_fn(q[None, s:e], k[None, s:e], v[None, s:e], backend=self._attention_backend)[0]
                for s, e in context.row_spans
            ])
        out = out.reshape(context.total_tokens, -1)  # [N_tot, H·hd]

        out_img = attn.to_out[1](attn.to_out[0](out.index_select(0, context.image_pack_index)))
        out_txt = attn.to_add_out(out.index_select(0, context.text_pack_index))
        return out_img * torch.sigmoid(g_i), out_txt * torch.sigmoid(g_t)


class InternVLUAttention(nn.Module, AttentionModuleMixin):
    """Joint gated attention; image tokens use ``to_*``, text tokens ``add_*`` weights.

    ``to_q``/``add_q_proj`` are 2·D wide: per head ``[query (hd) | gate logits (hd)]``. The gate
    multiplies the output *after* ``to_out``/``to_add_out``, through a sigmoid.
    """

    _default_processor_cls = InternVLUAttnProcessor
    _available_processors = [InternVLUAttnProcessor]
    _supports_qkv_fusion = False  # the gated query projection does not fuse with k and v

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, 2 * inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, 2 * inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps=_NORM_EPS)
        self.norm_k = RMSNorm(head_dim, eps=_NORM_EPS)
        self.norm_added_q = RMSNorm(head_dim, eps=_NORM_EPS)
        self.norm_added_k = RMSNorm(head_dim, eps=_NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)
        self.set_processor(InternVLUAttnProcessor())

    def project(
        self, h: torch.Tensor, rope: torch.Tensor, text: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, D] → q, k, v [N, H, hd] (q/k normed and rotated) and gate logits [N, D]."""
        if text:
            q_proj, k_proj, v_proj = self.add_q_proj, self.add_k_proj, self.add_v_proj
            norm_q, norm_k = self.norm_added_q, self.norm_added_k
        else:
            q_proj, k_proj, v_proj, norm_q, norm_k = self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k
        n = h.shape[0]
        query, gate = q_proj(h).view(n, self.heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
        key = k_proj(h).view(n, self.heads, self.head_dim)
        value = v_proj(h).view(n, self.heads, self.head_dim)
        query = _apply_rope(norm_q(query), rope)
        key = _apply_rope(norm_k(key), rope)
        return query, key, value, gate.reshape(n, self.heads * self.head_dim)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, context: DecoderContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [N_img, D] and text [N_txt, D] streams (modulated) → attention outputs, same shapes."""
        return self.processor(self, hidden_states, encoder_hidden_states, context)


class InternVLUTransformerBlock(nn.Module):
    """AdaLN-modulated block: shared joint attention, per-stream modulation/MLP weights."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = InternVLUAttention(dim, heads, head_dim)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        context: DecoderContext,
        image_rows: torch.Tensor | None = None,
        text_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image stream [N_img, D], text stream [N_txt, D], temb [B, D] (or two equal rows, shared) → both updated.

        ``*_rows`` give each token's row when rows have different timesteps; None = one shared temb.
        """
        img, txt = hidden_states, encoder_hidden_states
        # [shift1, scale1, gate1, shift2, scale2, gate2], each [1 or N, D]
        mod_i = _per_token(self.img_mod(temb), image_rows).chunk(6, dim=-1)
        mod_t = _per_token(self.txt_mod(temb), text_rows).chunk(6, dim=-1)

        h_img = _layer_norm_fp32(img) * (1 + mod_i[1]) + mod_i[0]
        h_txt = _layer_norm_fp32(txt) * (1 + mod_t[1]) + mod_t[0]
        attn_img, attn_txt = self.attn(h_img, h_txt, context)
        img = img + mod_i[2] * attn_img
        txt = txt + mod_t[2] * attn_txt

        h_img = _layer_norm_fp32(img) * (1 + mod_i[4]) + mod_i[3]
        h_txt = _layer_norm_fp32(txt) * (1 + mod_t[4]) + mod_t[3]
        img = img + mod_i[5] * self.img_mlp(h_img)
        txt = txt + mod_t[5] * self.txt_mlp(h_txt)

        if img.dtype == torch.float16:
            img = img.clip(-_FP16_MAX, _FP16_MAX)
            txt = txt.clip(-_FP16_MAX, _FP16_MAX)
        return img, txt


class InternVLUNormOut(nn.Module):
    """Output AdaLN (continuous): LayerNorm(x)·(1 + scale) + shift, all in float32, scale first."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, row_ids: torch.Tensor | None) -> torch.Tensor:
        scale, shift = _per_token(self.linear(F.silu(temb)).float(), row_ids).chunk(2, dim=-1)
        y = F.layer_norm(x.float(), (x.shape[-1],), eps=_NORM_EPS) * (1 + scale) + shift
        return y.to(x.dtype)


def _register_block_for_cache_hooks() -> None:
    """Tell diffusers' cache hooks where a block's two streams are (its argument and output order)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        model_class=InternVLUTransformerBlock,
        metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
    )


class InternVLUTransformer2DModel(ModelMixin, ConfigMixin, CacheMixin, PeftAdapterMixin):
    """The MMDiT (``generation_decoder.decoder``), a diffusers model.

    Inputs of :meth:`forward` (names as the reference): ``hidden_states`` [B, C, H, W] latents;
    ``encoder_hidden_states`` [B, L, J] projected VLM features with bool ``encoder_attention_mask``
    and ``encoder_image_token_mask`` [B, L]; ``timestep`` [B] (already × ``timestep_scale``);
    ``image_grid_thw_gen`` [B, 3] target grids in latent pixels; ``image_fhw_cond`` list of
    [k_b, 3] ViT grids; optional ``conditional_input`` list of [k_b, C, h, w] VAE reference
    latents with ``image_grid_thw_gen_cond`` list of [k_b, 3] grids. Output [B, out_channels, H, W],
    zero outside each row's grid. A sampling loop passes ``context=prepare_context(...)`` instead
    of the conditioning arguments, so the step-invariant work is done once.

    ``timestep_scale`` is not used by the model: it is a config value the *pipeline* multiplies
    the integer timesteps by (a hidden attribute of the reference's config).
    """

    _no_split_modules = ["InternVLUTransformerBlock"]
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["InternVLUTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        video_position_scale_factor: float = 1.0,
        vlm_cond_position_scale_factor: float = 1.0,
        timestep_scale: float = 1.0,
    ):
        super().__init__()
        _check_decoder_config(
            {"axes_dims_rope": axes_dims_rope, "attention_head_dim": attention_head_dim,
             "patch_size": patch_size, "in_channels": in_channels}
        )
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = InternVLURotaryEmbedding(axes_dims_rope)
        self.time_text_embed = InternVLUTimestepProjEmbeddings(dim)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=_NORM_EPS)
        self.txt_in = nn.Linear(joint_attention_dim, dim)
        self.img_in = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            InternVLUTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.norm_out = InternVLUNormOut(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.gradient_checkpointing = False

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels // (self.config.patch_size**2)

    def enable_cache(self, config) -> None:
        """diffusers' cache hooks (e.g. ``FirstBlockCacheConfig``): lossy, opt-in speed-ups.

        The model resets the cache state when a new context starts a sampling run.
        """
        _register_block_for_cache_hooks()
        super().enable_cache(config)

    # ---------------------------------------------------------------- step-invariant part

    def prepare_context(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_image_token_mask: torch.Tensor,
        image_grid_thw_gen: torch.Tensor,
        image_fhw_cond: Sequence[torch.Tensor] | None,
        conditional_input: Sequence[torch.Tensor] | None = None,
        image_grid_thw_gen_cond: Sequence[torch.Tensor] | None = None,
    ) -> DecoderContext:
        """Packing indices, RoPE tables, and the valid text tokens and reference patches of a batch."""
        cfg = self.config
        p = cfg.patch_size
        dtype, device = self.dtype, self.device
        batch = encoder_hidden_states.shape[0]
        if image_grid_thw_gen.shape[0] != batch:
            raise InvalidInputError(
                f"image_grid_thw_gen has {image_grid_thw_gen.shape[0]} rows, encoder_hidden_states {batch}"
            )

        grids = [(int(h), int(w)) for _, h, w in image_grid_thw_gen.tolist()]
        for h, w in grids:
            if h % p or w % p:
                raise InvalidInputError(f"image_grid_thw_gen ({h}, {w}) must be multiples of patch_size {p}")
        num_text = [int(n) for n in encoder_attention_mask.sum(dim=1).tolist()]
        image_mask_rows = encoder_image_token_mask.bool().tolist()
        fhw_rows = [
            [tuple(int(v) for v in g) for g in image_fhw_cond[b].tolist()] if image_fhw_cond is not None else []
            for b in range(batch)
        ]

        # Reference latents: crop each to its grid and patchify.
        ref_tokens, ref_grids = [], []
        for b in range(batch):
            row_tokens, row_grids = [], []
            refs = conditional_input[b] if conditional_input is not None else None
            if refs is not None and refs.shape[0] > 0:
                ref_thw = image_grid_thw_gen_cond[b].tolist() if image_grid_thw_gen_cond is not None else None
                for j in range(refs.shape[0]):
                    h_r, w_r = (int(ref_thw[j][1]), int(ref_thw[j][2])) if ref_thw is not None else refs.shape[-2:]
                    if h_r % p or w_r % p:
                        raise InvalidInputError(
                            f"image_grid_thw_gen_cond ({h_r}, {w_r}) must be multiples of patch_size {p}"
                        )
                    row_tokens.append(_patchify(refs[j, :, :h_r, :w_r].to(device=device, dtype=dtype), p))
                    row_grids.append((h_r // p, w_r // p))
            ref_tokens.append(row_tokens)
            ref_grids.append(row_grids)
        num_ref = [sum(t.shape[0] for t in row) for row in ref_tokens]
        flat_refs = [t for row in ref_tokens for t in row]

        # Text stream: the first mask.sum() tokens of each row.
        enc = encoder_hidden_states.to(device=device, dtype=dtype)
        text = torch.cat([enc[b, : num_text[b]] for b in range(batch)])  # [N_txt, J]

        # Positions: [target | refs] block first, then the text stream continues the counter.
        s_v, s_vlm = cfg.video_position_scale_factor, cfg.vlm_cond_position_scale_factor
        num_target = [(h // p) * (w // p) for h, w in grids]
        tgt_pos, ref_pos, txt_pos, row_positions = [], [], [], []
        for b in range(batch):
            h_t, w_t = grids[b][0] // p, grids[b][1] // p
            block = [_grid_positions(1, h_t, w_t, 0, s_v)]
            block += [_grid_positions(1, h_r, w_r, j + 1, s_v) for j, (h_r, w_r) in enumerate(ref_grids[b])]
            block0 = torch.cat(block)
            text_pos = _text_positions(
                image_mask_rows[b][: num_text[b]], fhw_rows[b], _next_position(block0), s_vlm
            )
            tgt_pos.append(block0[: num_target[b]])
            ref_pos.append(block0[num_target[b] :])
            txt_pos.append(text_pos)
            row_positions.append(torch.cat([block0, text_pos]))
        use_complex = device.type != "mps"
        image_rope = self.pos_embed(torch.cat(tgt_pos + ref_pos).to(device), use_complex)
        text_rope = self.pos_embed(torch.cat(txt_pos).to(device), use_complex)

        # Packed order per row: [target_b, refs_b, text_b]; rows follow each other.
        spans, tgt_idx, ref_idx, txt_idx = [], [], [], []
        start = 0
        for b in range(batch):
            tgt_end = start + num_target[b]
            ref_end = tgt_end + num_ref[b]
            end = ref_end + num_text[b]
            tgt_idx.append(torch.arange(start, tgt_end))
            ref_idx.append(torch.arange(tgt_end, ref_end))
            txt_idx.append(torch.arange(ref_end, end))
            spans.append((start, end))
            start = end
        rows = torch.arange(batch)
        image_row_ids = torch.cat(
            [rows.repeat_interleave(torch.tensor(num_target)), rows.repeat_interleave(torch.tensor(num_ref))]
        )
        text_row_ids = rows.repeat_interleave(torch.tensor(num_text))

        return DecoderContext(
            batch_size=batch,
            target_grids=grids,
            num_target_tokens=num_target,
            num_reference_tokens=num_ref,
            num_text_tokens=num_text,
            text_states=text,
            reference_patches=torch.cat(flat_refs) if flat_refs else None,
            image_rope=image_rope,
            text_rope=text_rope,
            image_row_ids=image_row_ids.to(device),
            text_row_ids=text_row_ids.to(device),
            image_pack_index=torch.cat(tgt_idx + ref_idx).to(device),
            text_pack_index=torch.cat(txt_idx).to(device),
            row_spans=spans,
            positions=row_positions,
        )

    # ---------------------------------------------------------------- per-step part

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_image_token_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        image_grid_thw_gen: torch.Tensor | None = None,
        image_fhw_cond: Sequence[torch.Tensor] | None = None,
        conditional_input: Sequence[torch.Tensor] | None = None,
        image_grid_thw_gen_cond: Sequence[torch.Tensor] | None = None,
        context: DecoderContext | None = None,
    ) -> torch.Tensor:
        """One denoising step: latents [B, C, H, W] + timestep [B] → prediction [B, out, H, W].

        Give either the conditioning arguments or a ``context`` from :meth:`prepare_context`.
        """
        if timestep is None:
            raise InvalidInputError("timestep is required")
        if context is None:
            if encoder_hidden_states is None or image_grid_thw_gen is None:
                raise InvalidInputError("pass context=prepare_context(...) or the conditioning arguments")
            context = self.prepare_context(
                encoder_hidden_states, encoder_attention_mask, encoder_image_token_mask, image_grid_thw_gen,
                image_fhw_cond, conditional_input, image_grid_thw_gen_cond,
            )
        elif encoder_hidden_states is not None:
            raise InvalidInputError("pass either context or the conditioning arguments, not both")
        if self.is_cache_enabled:
            if context.steps_run == 0:  # a new sampling run: forget the previous run's cached residuals
                self._reset_stateful_cache()
            with self.cache_context("denoise"):
                out = self._denoise(hidden_states, timestep, context)
        else:
            out = self._denoise(hidden_states, timestep, context)
        context.steps_run += 1
        return out

    def forward_with_context(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, context: DecoderContext
    ) -> torch.Tensor:
        """One step with a prepared context (``self(hidden_states, timestep=…, context=…)``)."""
        return self(hidden_states, timestep=timestep, context=context)

    def _denoise(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, context: DecoderContext):
        p = self.config.patch_size
        dtype, device = self.dtype, self.device
        batch, _, height, width = hidden_states.shape
        if batch != context.batch_size:
            raise InvalidInputError(f"hidden_states has {batch} rows, the context was built for {context.batch_size}")
        for h, w in context.target_grids:
            if h > height or w > width:
                raise InvalidInputError(f"target grid ({h}, {w}) exceeds the latent size ({height}, {width})")
        if context.text_tokens is None:  # the first step of a run projects the step-invariant streams
            context.text_tokens = self.txt_in(self.txt_norm(context.text_states))  # [N_txt, D]
            if context.reference_patches is not None:
                context.reference_tokens = self.img_in(context.reference_patches)  # [N_ref, D]

        x = hidden_states.to(device=device, dtype=dtype)
        if all(g == (height, width) for g in context.target_grids):
            target = x.reshape(batch, -1, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
            target = target.reshape(batch * (height // p) * (width // p), -1)  # [N_tgt, C·p²]
        else:
            target = torch.cat([_patchify(x[b, :, :h, :w], p) for b, (h, w) in enumerate(context.target_grids)])
        img = self.img_in(target)  # [N_tgt, D]
        if context.reference_tokens is not None:
            img = torch.cat([img, context.reference_tokens])  # [N_img, D]
        txt = context.text_tokens  # [N_txt, D]

        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        # One shared modulation (broadcast) when every row has the same timestep, else per-token gathers.
        t_model = timestep.to(dtype)
        uniform = batch == 1 or torch.equal(t_model, t_model[:1].expand(batch))
        # A shared timestep is embedded on a fixed two-row batch, whatever B is: each row's result then does
        # not depend on how many rows share the pass (small matrix products round differently for different
        # row counts, and one-row products take a BLAS path whose rounding follows the weights' alignment).
        temb = self.time_text_embed(timestep[:1].expand(2) if uniform else timestep, dtype)  # [2 or B, D]
        img_rows = None if uniform else context.image_row_ids
        txt_rows = None if uniform else context.text_row_ids

        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing  # LoRA training (enable_gradient_checkpointing)
        for block in self.transformer_blocks:
            if checkpointing:
                img, txt = self._gradient_checkpointing_func(block, img, txt, temb, context, img_rows, txt_rows)
            else:
                img, txt = block(img, txt, temb, context, img_rows, txt_rows)

        n_tgt = context.total_target_tokens
        tgt_rows = None if uniform else context.image_row_ids[:n_tgt]
        out = self.proj_out(self.norm_out(img[:n_tgt], temb, tgt_rows))  # [N_tgt, p²·out]

        c_out = self.config.out_channels
        if all(g == (height, width) for g in context.target_grids):
            out = out.reshape(batch, height // p, width // p, c_out, p, p).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(batch, c_out, height, width)
        result = out.new_zeros(batch, c_out, height, width)
        start = 0
        for b, (h, w) in enumerate(context.target_grids):
            n = context.num_target_tokens[b]
            result[b, :, :h, :w] = _unpatchify(out[start : start + n], h, w, p)
            start += n
        return result


# --------------------------------------------------------------------------------------------
# The checkpoint's top-level module
# --------------------------------------------------------------------------------------------


class InternVLUGenerationDecoder(nn.Module):
    """``generation_decoder/``: padding token, projector and the MMDiT under ``decoder.``."""

    def __init__(self, config: InternVLUGenerationDecoderConfig):
        super().__init__()
        self.config = config
        if config.padding_encoder_hidden_states:
            self.encoder_padding_token = nn.Parameter(torch.zeros(config.input_hidden_size))
        else:
            self.encoder_padding_token = None
        if config.decoder_projector_type == "mlp2x_gelu":
            # The name says GELU; the reference uses SiLU.
            hidden = 3 * config.output_hidden_size
            self.decoder_projector = nn.Sequential(
                nn.Linear(config.input_hidden_size, hidden), nn.SiLU(), nn.Linear(hidden, config.output_hidden_size)
            )
        else:
            self.decoder_projector = nn.Identity()
        self.decoder = InternVLUTransformer2DModel.from_config(config.decoder_config)

    @classmethod
    def from_config_dict(
        cls, cfg: dict, source: str = "generation_decoder/config.json", config_dir: str | os.PathLike | None = None
    ) -> InternVLUGenerationDecoder:
        """Build from ``config.json`` contents; safe under ``torch.device("meta")``."""
        return cls(InternVLUGenerationDecoderConfig.from_dict(cfg, source=source, config_dir=config_dir))

    def prepare_forward_input(
        self, encoder_hidden_states_list: Sequence[torch.Tensor], image_token_mask_list: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pad/truncate per-image spans [T_k, C_in] into [B, max_len, C] and run the projector.

        Returns ``(encoder_hidden_states [B, max_len, C_out], attention_mask bool [B, max_len],
        image_token_mask bool [B, max_len])``. Truncation keeps the first tokens.
        """
        cfg = self.config
        if len(encoder_hidden_states_list) != len(image_token_mask_list):
            raise InvalidInputError(
                f"{len(encoder_hidden_states_list)} hidden-state spans but {len(image_token_mask_list)} image masks"
            )
        lengths = [int(e.shape[0]) for e in encoder_hidden_states_list]
        max_len = cfg.max_sequence_length
        if not cfg.pad_to_fix_length:
            max_len = max([max_len] + lengths)
        batch, width = len(lengths), cfg.input_hidden_size

        if self.encoder_padding_token is not None:
            pad = self.encoder_padding_token
        else:  # never used by the inference path; zeros keep the shapes
            like = encoder_hidden_states_list[0] if lengths else self.decoder.img_in.weight
            pad = torch.zeros(width, dtype=like.dtype, device=like.device)
        hidden = pad.expand(batch, max_len, width).clone()  # [B, max_len, C_in]
        mask = torch.zeros(batch, max_len, dtype=torch.bool, device=pad.device)
        image_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=pad.device)
        for k, (states, img) in enumerate(zip(encoder_hidden_states_list, image_token_mask_list, strict=True)):
            n = min(lengths[k], max_len)
            hidden[k, :n] = states[:n].to(device=pad.device, dtype=pad.dtype)
            mask[k, :n] = True
            image_mask[k, :n] = img[:n].to(device=pad.device, dtype=torch.bool)
        return self.decoder_projector(hidden), mask, image_mask

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Shortcut to ``self.decoder(...)``."""
        return self.decoder(*args, **kwargs)
