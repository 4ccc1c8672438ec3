"""The InternVL-style VLM: InternViT → pixel shuffle → ``mlp1`` → a transformers causal LLM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelLoadError
from .vision import InternVisionModel, VisionConfig

# Order of the rows of ``special_token_embedding`` (the checkpoint depends on it).
SPECIAL_TOKENS = (
    "</box>", "<box>", "<IMG_CONTEXT>", "</img>", "<img>",
    "</quad>", "<quad>", "</ref>", "<ref>", "<img_uncond>",
)
SUPPORTED_TEMPLATE = "qwen2_5-chat-v3"
_LLM_CLASSES = {
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
}


@dataclass
class VLMConfig:
    vision: VisionConfig
    llm: dict
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str = SUPPORTED_TEMPLATE
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> VLMConfig:
        if "vision_config" not in data or "llm_config" not in data:
            raise ModelLoadError(f"{source} must contain 'vision_config' and 'llm_config'")
        template = data.get("template") or SUPPORTED_TEMPLATE
        if template != SUPPORTED_TEMPLATE:
            raise ModelLoadError(
                f"{source}: template {template!r} is not supported; InternVL-U uses {SUPPORTED_TEMPLATE!r}"
            )
        if data.get("anyres_image_size"):
            raise ModelLoadError(f"{source}: anyres_image_size=true is not supported by InternVL-U inference")
        llm = dict(data["llm_config"])
        tie = llm.get("tie_word_embeddings", data.get("tie_word_embeddings", False))
        return cls(
            vision=VisionConfig.from_dict(data["vision_config"]),
            llm=llm,
            select_layer=int(data.get("select_layer", -1)),
            force_image_size=data.get("force_image_size"),
            downsample_ratio=float(data.get("downsample_ratio", 0.5)),
            template=template,
            tie_word_embeddings=bool(tie),
        )

    @property
    def image_size(self) -> int:
        return int(self.force_image_size or self.vision.image_size)

    @property
    def num_image_token(self) -> int:
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)


def build_llm_config(llm: dict, tie_word_embeddings: bool, source: str):
    import transformers

    architectures = llm.get("architectures") or ["Qwen2ForCausalLM"]
    names = _LLM_CLASSES.get(architectures[0])
    if names is None:
        raise ModelLoadError(
            f"{source}: llm_config.architectures[0] = {architectures[0]!r} is not supported; "
            f"use one of {', '.join(_LLM_CLASSES)}"
        )
    config_cls = getattr(transformers, names[0])
    model_cls = getattr(transformers, names[1])
    kwargs = {k: v for k, v in llm.items() if k not in ("architectures", "model_type", "torch_dtype")}
    kwargs["tie_word_embeddings"] = tie_word_embeddings
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    return config, model_cls


class InternVLUChatModel(nn.Module):
    """Holds ``vision_model``, ``mlp1``, ``special_token_embedding`` and ``language_model``.

    Parameter names match the released ``vlm/`` folder without any prefix.
    """

    def __init__(self, config: VLMConfig, source: str = "vlm/config.json"):
        super().__init__()
        self.config = config
        vit_width = config.vision.hidden_size
        llm_config, model_cls = build_llm_config(config.llm, config.tie_word_embeddings, source)
        llm_width = llm_config.hidden_size
        shuffled = int(vit_width * (1 / config.downsample_ratio) ** 2)
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled, eps=1e-5),
            nn.Linear(shuffled, llm_width),
            nn.GELU(),
            nn.Linear(llm_width, llm_width),
        )
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKENS), llm_width)
        self.language_model = model_cls(llm_config)
        self.special_token_ids: torch.Tensor | None = None  # set by set_special_token_ids
        self.image_context_id: int | None = None

    # -- token ids ---------------------------------------------------------------------------
    def set_special_token_ids(self, ids: list[int], image_context_id: int) -> None:
        self.special_token_ids = torch.tensor(ids, dtype=torch.long)
        self.image_context_id = image_context_id

    @property
    def tied_weight_names(self) -> tuple[str, ...]:
        return ("language_model.lm_head.weight",) if self.config.tie_word_embeddings else ()

    # -- vision ------------------------------------------------------------------------------
    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, W, C] → [N, H/2·W/2, 4C]; token (i, j) concatenates (2i,2j),(2i,2j+1),(2i+1,2j),(2i+1,2j+1)."""
        factor = round(1 / self.config.downsample_ratio)
        n, h, w, c = x.shape
        x = x.reshape(n, h // factor, factor, w // factor, factor, c)
        x = x.permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (h // factor) * (w // factor), factor * factor * c)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT tokens projected into the LLM space: [N_img, tokens_per_image, C_llm]."""
        tokens = self.vision_model(pixel_values, select_layer=self.config.select_layer)[:, 1:]
        n, length, c = tokens.shape
        side = int(length**0.5)
        grid = tokens.reshape(n, side, side, c)
        return self.mlp1(self.pixel_shuffle(grid))

    # -- prompt embeddings -------------------------------------------------------------------
    def embed_prompt(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the special-token table applied and image slots filled.

        ``image_features`` (from :meth:`extract_feature`) may replace ``pixel_values`` when the caller
        already has them, e.g. to encode an image used by several rows only once.
        """
        embed = self.language_model.get_input_embeddings()
        embeds = embed(input_ids)
        table = self.special_token_embedding.weight.to(embeds.dtype)
        if self.special_token_ids is None:
            raise RuntimeError("special token ids were not set; load the model through InternVLUPipeline")
        for row, token_id in enumerate(self.special_token_ids.tolist()):
            if token_id < 0:
                continue
            where = input_ids == token_id
            if where.any():
                embeds[where] = table[row]
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            vit_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
            image_features = self.extract_feature(pixel_values.to(vit_dtype))
        if image_features is not None:
            features = image_features
            slots = input_ids == self.image_context_id
            features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(
                    f"the prompt has {int(slots.sum())} image-context slots but the images give "
                    f"{features.shape[0]} visual tokens"
                )
            embeds[slots] = features
        return embeds

    def hidden_states_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None,
        layers: list[int],
    ) -> torch.Tensor:
        """The LLM hidden states (no LM head) of each row, chosen layers concatenated on channels: [B, L, C·k].

        Like the released pipeline, token ``j`` of a left-padded row sits at position ``j`` (pads counted).
        Each row runs on its attended tokens only, with those positions, so no work goes to padding;
        masked pads never influence attended tokens, so the result is the same. Padded slots are zero.
        """
        rows, length = input_ids.shape
        starts = [length - int(m.sum()) for m in attention_mask]
        contiguous = all(bool(m[s:].all()) for m, s in zip(attention_mask, starts))
        if not contiguous:  # not a left-padded batch: one masked pass
            embeds = self.embed_prompt(input_ids, None, image_features)
            out = self.language_model.model(
                inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
            )
            return torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        per_image = image_features.shape[1] if image_features is not None else 0
        result = None
        image_cursor = 0
        for row, start in enumerate(starts):
            ids = input_ids[row : row + 1, start:]
            images = int((ids == self.image_context_id).sum()) // per_image if per_image else 0
            features = image_features[image_cursor : image_cursor + images] if images else None
            image_cursor += images
            positions = torch.arange(start, length, device=input_ids.device).unsqueeze(0)
            out = self.language_model.model(
                inputs_embeds=self.embed_prompt(ids, None, features), position_ids=positions,
                output_hidden_states=True, use_cache=False,
            )
            states = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
            if result is None:
                result = states.new_zeros(rows, length, states.shape[-1])
            result[row, start:] = states[0]
        return result
