"""InternViT: the vision encoder of the VLM (one 448×448 tile per image for the released model)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    hidden_size: int = 3200
    num_hidden_layers: int = 48
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, data: dict) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class InternRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as InternViT does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _make_norm(config: VisionConfig, width: int) -> nn.Module:
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(width, eps=config.layer_norm_eps)
    if config.norm_type == "rms_norm":
        return InternRMSNorm(width, eps=config.layer_norm_eps)
    raise ValueError(f"vision_config.norm_type must be 'layer_norm' or 'rms_norm', got {config.norm_type!r}")


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, width))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + self.grid**2, width))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        # The table is learned for a square grid; other grids get a float32 bicubic resize.
        table = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return table
        grid = table.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [N, C, h, w]
        n, _, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [N, h·w, C] raster order
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        tokens = torch.cat([cls, patches], dim=1)
        position = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1)
        return tokens + position.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            # Normalises q and k over the whole width (all heads together), not per head.
            self.q_norm = InternRMSNorm(width, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, width).unbind(2)  # each [N, L, C]
        if self.qk_normalization:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k, v = (t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, hd]
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = _make_norm(config, width)
        self.norm2 = _make_norm(config, width)
        self.ls1 = nn.Parameter(torch.empty(width))
        self.ls2 = nn.Parameter(torch.empty(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1
        x = x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2
        return x


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Tokens ``[N, 1 + h·w, C]`` after the layer ``select_layer`` (hidden-state tuple index)."""
        hidden = self.embeddings(pixel_values)
        layers = self.encoder.layers
        # Tuple index i = output of layer i-1 (0 = embeddings); only run the layers needed.
        stop = len(layers) if select_layer == -1 else range(len(layers) + 1)[select_layer]
        for layer in layers[:stop]:
            hidden = layer(hidden)
        return hidden
