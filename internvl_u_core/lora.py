"""LoRA adapters: the file format, checks against the loaded model, and switching adapters on and off.

An adapter file is a PEFT/diffusers LoRA safetensors file: keys ``transformer.<module>.lora_A.weight``
/ ``lora_B.weight`` for the DiT (what diffusers' ``save_lora_weights`` writes) and, optionally,
``language_model.<module>.lora_{A,B}.weight`` for the LLM. Its safetensors metadata carries what
diffusers reads (``lora_adapter_metadata``: the ``LoraConfig`` of each part, prefixed) plus our own
header (:class:`AdapterInfo`): rank, alpha, target modules, the base model and its architecture
signature, and trigger words. Loading checks the header's architecture and every key and shape
against the model before touching it, and names what does not match.

The weights go in through the libraries' PEFT integrations: the DiT is a diffusers ``ModelMixin`` with
``PeftAdapterMixin`` (``load_lora_adapter``, ``set_adapters``, ``delete_adapters``, ``unload_lora``),
the LLM a transformers model (``load_adapter``). Several adapters stay loaded at once; each call of
:meth:`AdapterSet.activate` says which are on and at what scale, so one loaded pipeline can serve
callers that want different adapters (or none: the exact base outputs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError, InvalidInputTypeError, ModelLoadError
from .quantization import DYNAMIC_INT8

logger = logging.getLogger("internvl_u_core")

FORMAT = "internvl-u-lora/1"
DIT_PREFIX = "transformer"
LLM_PREFIX = "language_model"
COMPONENT_PREFIXES = (DIT_PREFIX, LLM_PREFIX)
#: diffusers' metadata key for the LoraConfig of each part (``<prefix>.r``, ``<prefix>.lora_alpha``...).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
#: The DiT's attention and MLP projections of both streams (suffixes of module names, as PEFT matches them).
DIT_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DIT_MLP_TARGETS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
DEFAULT_TARGETS = DIT_ATTENTION_TARGETS + DIT_MLP_TARGETS
_KEY = re.compile(r"^(?P<prefix>[^.]+)\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UNSUPPORTED_OFFLOAD = ("group", "sequential")


@dataclass(frozen=True)
class AdapterInfo:
    """The header of an adapter file: how it was made and for which model."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    architecture: dict[str, Any]  # :func:`architecture_signature` of the model it was trained on
    base_model: str = ""
    trigger_words: tuple[str, ...] = ()
    components: tuple[str, ...] = (DIT_PREFIX,)
    extra: dict[str, str] = field(default_factory=dict)  # anything else a trainer records (steps, data...)

    def to_metadata(self, lora_configs: Mapping[str, dict]) -> dict[str, str]:
        """safetensors metadata: ours under ``internvl_u.*`` and diffusers' ``lora_adapter_metadata``."""
        packed = {f"{prefix}.{key}": value for prefix, config in lora_configs.items() for key, value in config.items()}
        meta = {
            "format": "pt",
            "internvl_u.format": FORMAT,
            "internvl_u.rank": str(self.rank),
            "internvl_u.alpha": repr(float(self.alpha)),
            "internvl_u.target_modules": json.dumps(list(self.target_modules)),
            "internvl_u.architecture": json.dumps(self.architecture, sort_keys=True),
            "internvl_u.base_model": self.base_model,
            "internvl_u.trigger_words": json.dumps(list(self.trigger_words)),
            "internvl_u.components": json.dumps(list(self.components)),
            DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True),
        }
        meta.update({f"internvl_u.extra.{k}": str(v) for k, v in self.extra.items()})
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str) -> AdapterInfo | None:
        """The header of a file we wrote; None for a plain PEFT/diffusers file without it."""
        if meta.get("internvl_u.format") is None:
            return None
        if meta["internvl_u.format"] != FORMAT:
            raise ModelLoadError(f"{source}: adapter format {meta['internvl_u.format']!r} is not {FORMAT!r}")
        try:
            return cls(
                rank=int(meta["internvl_u.rank"]),
                alpha=float(meta["internvl_u.alpha"]),
                target_modules=tuple(json.loads(meta["internvl_u.target_modules"])),
                architecture=json.loads(meta["internvl_u.architecture"]),
                base_model=meta.get("internvl_u.base_model", ""),
                trigger_words=tuple(json.loads(meta.get("internvl_u.trigger_words", "[]"))),
                components=tuple(json.loads(meta.get("internvl_u.components", '["transformer"]'))),
                extra={k.removeprefix("internvl_u.extra."): v for k, v in meta.items()
                       if k.startswith("internvl_u.extra.")},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{source}: the adapter header is damaged ({exc}); re-save the adapter") from exc


def architecture_signature(pipe) -> dict[str, Any]:
    """What an adapter depends on: the DiT's widths and depth (and the LLM's when one is loaded)."""
    signature: dict[str, Any] = {"model": "InternVL-U"}
    if pipe.generation_decoder is not None:
        config = pipe.generation_decoder.decoder.config
        signature["dit"] = {
            "num_layers": int(config.num_layers),
            "num_attention_heads": int(config.num_attention_heads),
            "attention_head_dim": int(config.attention_head_dim),
            "joint_attention_dim": int(config.joint_attention_dim),
            "in_channels": int(config.in_channels),
            "patch_size": int(config.patch_size),
        }
    llm = pipe.vlm.language_model.config
    signature["llm"] = {"num_hidden_layers": int(llm.num_hidden_layers), "hidden_size": int(llm.hidden_size)}
    return signature


def base_model_name(pipe) -> str:
    """The checkpoint's folder name (what the header records as the base model)."""
    return pipe.root.name if getattr(pipe, "root", None) is not None else ""


def save_adapter(
    path: str | os.PathLike, weights: Mapping[str, torch.Tensor], info: AdapterInfo, lora_configs: Mapping[str, dict]
) -> Path:
    """Write ``weights`` (prefixed keys, ``transformer.…lora_A.weight``) with the header; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"{path}: adapters are saved as .safetensors files")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in weights.items()}
    save_file(tensors, str(path), metadata=info.to_metadata(lora_configs))
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of an adapter file (clear errors for missing or non-safetensors files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"{path}: only .safetensors adapters are loaded (pickled weights can run code)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors, meta


def resolve_source(source: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """A local adapter file, or ``owner/repo[/file.safetensors]`` on the Hugging Face hub, downloaded."""
    path = Path(source).expanduser()
    if path.exists() or local_files_only or not is_hub_source(str(source)):
        return path
    from huggingface_hub import hf_hub_download, list_repo_files

    parts = str(source).split("/", 2)
    repo = "/".join(parts[:2])
    try:
        if len(parts) == 3:
            filename = parts[2]
        else:
            files = [f for f in list_repo_files(repo) if f.endswith(".safetensors")]
            if len(files) != 1:
                raise InvalidInputError(
                    f"hub repo {repo} holds {len(files)} .safetensors files; name one as {repo}/FILE.safetensors"
                )
            filename = files[0]
        return Path(hf_hub_download(repo, filename))
    except InvalidInputError:
        raise
    except Exception as exc:  # network and hub errors: say what was tried
        raise ModelLoadError(f"cannot fetch LoRA {source!r} from the hub: {exc}") from exc


def is_hub_source(text: str) -> bool:
    """``owner/repo`` or ``owner/repo/file.safetensors`` (a two-part ``dir/file.safetensors`` is a local path)."""
    parts = text.split("/")
    if len(parts) < 2 or text.startswith((".", "/", "~")) or not all(parts):
        return False
    if len(parts) == 2:
        return not parts[1].endswith(".safetensors") and all(re.fullmatch(r"[\w.-]+", p) for p in parts)
    return text.endswith(".safetensors") and all(re.fullmatch(r"[\w.-]+", p) for p in parts[:2])


def split_components(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Prefixed keys → ``{component prefix: {module key: tensor}}``; unknown layouts are refused."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None or match["prefix"] not in COMPONENT_PREFIXES:
            foreign.append(key)
            continue
        parts.setdefault(match["prefix"], {})[key[len(match["prefix"]) + 1 :]] = value
    if foreign:
        raise ModelLoadError(
            f"{source} is not an InternVL-U LoRA: {len(foreign)} key(s) are not 'transformer.<module>.lora_A/B.weight' "
            f"or 'language_model.<module>.lora_A/B.weight', e.g. {', '.join(sorted(foreign)[:3])} "
            "(adapters for other models, e.g. Kohya/ComfyUI 'lora_unet_…' files, do not fit this model)"
        )
    if not parts:
        raise ModelLoadError(f"{source} holds no LoRA weights")
    return parts


def check_architecture(info: AdapterInfo | None, pipe, source: str) -> None:
    """Refuse an adapter whose header names another architecture (each differing field is listed)."""
    if info is None:
        return
    ours = architecture_signature(pipe)
    if info.architecture.get("model") != ours["model"]:
        raise ModelLoadError(f"{source} was made for {info.architecture.get('model')!r}, not InternVL-U")
    differences = []
    for part in ("dit", "llm"):
        theirs = info.architecture.get(part)
        if not isinstance(theirs, dict) or part not in ours:
            continue
        for key, value in theirs.items():
            if ours[part].get(key) != value:
                differences.append(f"{part}.{key}: adapter {value}, model {ours[part].get(key)}")
    if differences:
        raise ModelLoadError(
            f"{source} was trained on another InternVL-U variant (base {info.base_model or 'unknown'!s}): "
            + "; ".join(differences)
        )
    if info.base_model and info.base_model != base_model_name(pipe):
        logger.info("LoRA %s was trained on %s; loading it into %s (same architecture)", source, info.base_model,
                    base_model_name(pipe))


def check_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], part: str, source: str) -> int:
    """Every LoRA pair names a linear layer of ``module`` with matching shapes; returns the rank."""
    modules = dict(module.named_modules())
    problems: list[str] = []
    ranks = set()
    names = sorted({key.rsplit(".", 2)[0] for key in weights})
    for name in names:
        a, b = weights.get(f"{name}.lora_A.weight"), weights.get(f"{name}.lora_B.weight")
        target = modules.get(name)
        base = getattr(target, "base_layer", target)  # already wrapped by an earlier adapter
        if a is None or b is None:
            problems.append(f"{name}: lora_A and lora_B must both be present")
        elif target is None:
            problems.append(f"{name}: no such layer in the {part}")
        elif not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            problems.append(f"{name}: is a {type(base).__name__}, not a linear layer")
        elif a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a LoRA pair")
        elif a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            problems.append(
                f"{name}: adapter maps {a.shape[1]}→{b.shape[0]}, the layer {base.in_features}→{base.out_features}"
            )
        else:
            ranks.add(int(a.shape[0]))
        if len(problems) >= 4:
            break
    if problems:
        raise ModelLoadError(f"{source} does not fit this model's {part}: " + "; ".join(problems))
    for name, value in weights.items():
        if not torch.is_floating_point(value) or not torch.isfinite(value).all():
            raise ModelLoadError(f"{source}: {name} holds non-finite or non-float values")
    return max(ranks)


def _lora_config(part: str, weights: Mapping[str, torch.Tensor], meta: Mapping[str, str], info: AdapterInfo | None,
                 rank: int) -> dict:
    """The LoraConfig kwargs of one part: the file's diffusers metadata, else the header, else rank = alpha."""
    packed = json.loads(meta.get(DIFFUSERS_METADATA_KEY, "{}") or "{}")
    config = {k.removeprefix(f"{part}."): v for k, v in packed.items() if k.startswith(f"{part}.")}
    if not config:
        targets = sorted({key.rsplit(".", 2)[0] for key in weights})
        config = {"r": rank, "lora_alpha": info.alpha if info else rank, "target_modules": targets}
    config.setdefault("target_modules", sorted({key.rsplit(".", 2)[0] for key in weights}))
    return config


@dataclass
class LoadedAdapter:
    name: str
    source: str
    info: AdapterInfo | None
    components: tuple[str, ...]
    mtime: float = 0.0  # the file's modification time when it was loaded


class AdapterSet:
    """The adapters loaded into one pipeline (``pipe.loras``) and which of them are on, at what scale."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self.loaded: dict[str, LoadedAdapter] = {}
        self.active: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.loaded)

    def describe(self) -> dict[str, float]:
        """The active adapters and their scales."""
        return dict(self.active)

    def check_supported(self) -> None:
        """Adapters need layers PEFT can wrap: refuse offload modes and quantisations that hide them."""
        pipe = self._pipe
        if pipe.offload_mode in _UNSUPPORTED_OFFLOAD:
            raise InvalidInputError(
                f"LoRA adapters cannot be loaded under offload={pipe.offload_mode!r} (its hooks move the layers "
                "that PEFT wraps); use offload='model' or none"
            )
        plan = pipe.quantization
        if plan is not None and plan.backend == DYNAMIC_INT8:
            raise InvalidInputError(
                "LoRA adapters cannot wrap the CPU int8 quantisation (PyTorch dynamic int8 layers); "
                "use quantization='bf16' or none on the CPU"
            )

    def load(self, source: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0,
             *, local_files_only: bool = False) -> str:
        """Check and load an adapter file (or hub id) and switch it on at ``scale``; returns its name."""
        scale = check_scale(scale, "scale")
        require_peft()
        self.check_supported()
        path = resolve_source(source, local_files_only=local_files_only)
        name = adapter_name if adapter_name is not None else default_adapter_name(path, self.loaded)
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise InvalidInputError(f"adapter_name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in self.loaded:
            raise InvalidInputError(f"an adapter named {name!r} is already loaded; remove it first or pick another name")
        tensors, meta = read_adapter(path)
        source_text = str(path)
        info = AdapterInfo.from_metadata(meta, source_text)
        parts = split_components(tensors, source_text)
        pipe = self._pipe
        check_architecture(info, pipe, source_text)
        targets = {DIT_PREFIX: self._dit(source_text) if DIT_PREFIX in parts else None,
                   LLM_PREFIX: pipe.vlm.language_model if LLM_PREFIX in parts else None}
        configs = {}
        for part, weights in parts.items():
            rank = check_weights(targets[part], weights, "DiT" if part == DIT_PREFIX else "LLM", source_text)
            configs[part] = _lora_config(part, weights, meta, info, rank)
        loaded_parts: list[str] = []
        try:
            for part, weights in parts.items():
                self._inject(part, targets[part], name, weights, configs[part])
                loaded_parts.append(part)
        except Exception as exc:
            for part in loaded_parts:
                _delete_adapter(part, targets[part], name)
            if isinstance(exc, (InvalidInputError, ModelLoadError)):
                raise
            raise ModelLoadError(f"cannot load LoRA {source_text}: {exc}") from exc
        self.loaded[name] = LoadedAdapter(name, source_text, info, tuple(parts), path.stat().st_mtime)
        self.active[name] = scale
        self._apply()
        return name

    def set_active(self, scales: Mapping[str, float] | Iterable[tuple[str, float]]) -> None:
        """Exactly these loaded adapters on, at these scales; the others stay loaded but off."""
        pairs = dict(scales.items() if isinstance(scales, Mapping) else scales)
        unknown = [n for n in pairs if n not in self.loaded]
        if unknown:
            raise InvalidInputError(
                f"no adapter named {', '.join(map(repr, unknown))} is loaded (loaded: {', '.join(self.loaded) or 'none'})"
            )
        self.active = {name: check_scale(value, f"scale of {name!r}") for name, value in pairs.items()}
        self._apply()

    def activate_files(self, choices: Iterable[tuple[str | os.PathLike, float]]) -> None:
        """Exactly these adapter files on, at these scales, loading the ones not loaded yet (or changed on disk).

        What a surface that names adapters per job calls (the ComfyUI node's handles, the agent tools,
        the HTTP server); the same file twice adds its scales.
        """
        scales: dict[str, float] = {}
        for source, scale in choices:
            path = Path(source).expanduser().resolve()
            entry = next((e for e in self.loaded.values() if Path(e.source).resolve() == path), None)
            if entry is not None and path.is_file() and path.stat().st_mtime != entry.mtime:
                self.remove(entry.name)  # the file was rewritten (e.g. by a new training run)
                entry = None
            name = entry.name if entry is not None else self.load(path, scale=0.0)
            scales[name] = scales.get(name, 0.0) + check_scale(scale)
        self.set_active(scales)

    def remove(self, adapter_name: str | None = None) -> None:
        """Unload one adapter (or all); with none left the layers are unwrapped: the exact base model."""
        names = list(self.loaded) if adapter_name is None else [adapter_name]
        for name in names:
            if name not in self.loaded:
                raise InvalidInputError(f"no adapter named {name!r} is loaded")
        for name in names:
            entry = self.loaded.pop(name)
            self.active.pop(name, None)
            for part in entry.components:
                _delete_adapter(part, self._component(part), name)
        if not self.loaded:
            self._unwrap()
        self._apply()

    # ------------------------------------------------------------------ internals
    def _dit(self, source: str):
        if self._pipe.generation_decoder is None:
            raise InvalidInputError(f"{source} adapts the DiT, but this pipeline was loaded without the image parts")
        return self._pipe.generation_decoder.decoder

    def _component(self, part: str):
        return self._pipe.generation_decoder.decoder if part == DIT_PREFIX else self._pipe.vlm.language_model

    def _inject(self, part: str, module, name: str, weights: dict, config: dict) -> None:
        if part == DIT_PREFIX:
            with warnings.catch_warnings():  # several adapters in one model is what we want
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                module.load_lora_adapter(dict(weights), prefix=None, adapter_name=name, metadata=config)
        else:
            from peft import LoraConfig

            module.load_adapter(adapter_name=name, peft_config=LoraConfig(**config),
                                adapter_state_dict={f"base_model.model.{k}": v for k, v in weights.items()})

    def _apply(self) -> None:
        """Push :attr:`active` into every wrapped layer (PEFT's per-layer scales and active adapters)."""
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        for part in COMPONENT_PREFIXES:
            names = [n for n in self.active if part in self.loaded[n].components]
            if not any(part in entry.components for entry in self.loaded.values()):
                continue
            module = self._component(part)
            if names:
                if part == DIT_PREFIX:
                    module.set_adapters(names, [self.active[n] for n in names])
                else:
                    set_weights_and_activate_adapters(module, names, [self.active[n] for n in names])
                _enable(module, True)
            else:
                _enable(module, False)

    def _unwrap(self) -> None:
        """No adapters left: take the PEFT wrappers out (the modules are the base model's again)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for part in COMPONENT_PREFIXES:
            if part == DIT_PREFIX and self._pipe.generation_decoder is None:
                continue
            module = self._component(part)
            _replace_wrapped(module, BaseTunerLayer)
            if getattr(module, "_hf_peft_config_loaded", False):
                module._hf_peft_config_loaded = False
            if hasattr(module, "peft_config"):
                del module.peft_config


def named_adapters(choices: Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """An operator's list of adapters an agent may name (``{name: file.safetensors}``), checked: names and files."""
    checked: dict[str, Path] = {}
    for name, source in choices.items():
        path = Path(source).expanduser()
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise InvalidInputError(f"LoRA name {name!r}: use 1-64 letters, digits, '_' or '-'")
        if path.suffix != ".safetensors" or not path.is_file():
            raise InvalidInputError(f"LoRA {name!r}: {path} is not a .safetensors file")
        checked[name] = path.resolve()
    return checked


def pick_named(named: Mapping[str, Path], picks: Iterable[tuple[str, float]]) -> list[tuple[Path, float]]:
    """An agent's ``(name, scale)`` picks → files; a name outside the operator's list is refused."""
    chosen = []
    for name, scale in picks:
        if name not in named:
            offered = ", ".join(sorted(named)) or "none are configured"
            raise InvalidInputError(f"LoRA {name!r} is not available; choose from: {offered}")
        chosen.append((named[name], check_scale(scale)))
    return chosen


@contextlib.contextmanager
def adapters_on(pipe, chosen: list[tuple[Path, float]]):
    """The chosen adapter files on for one job; afterwards the adapters that were on before."""
    if not chosen:
        yield
        return
    before = pipe.loras.describe()
    pipe.loras.activate_files(chosen)
    try:
        yield
    finally:
        pipe.set_loras(before)


def require_peft() -> None:
    """LoRA needs peft; say how to install it instead of failing deep inside diffusers."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise InvalidInputError('LoRA adapters need peft: pip install "peft>=0.17" (the [lora] extra)')


def _enable(module: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def _delete_adapter(part: str, module, name: str) -> None:
    """Forget one adapter's weights in every wrapped layer of ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if part == DIT_PREFIX and name in getattr(module, "peft_config", {}):
        with warnings.catch_warnings():  # peft announces which adapter it makes active next; we set that ourselves
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            module.delete_adapters(name)
        return
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer) and name in layer.lora_A:
            layer.delete_adapter(name)
    getattr(module, "peft_config", {}).pop(name, None)


def _replace_wrapped(module: torch.nn.Module, wrapper_type) -> None:
    """Swap every PEFT wrapper in ``module`` back for the layer it wraps."""
    for name, child in list(module.named_children()):
        if isinstance(child, wrapper_type):
            setattr(module, name, child.get_base_layer())
        else:
            _replace_wrapped(child, wrapper_type)


def default_adapter_name(path: Path, taken: Mapping[str, Any]) -> str:
    """The file's stem made safe, with ``_2``, ``_3``... if that name is taken."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:60] or "lora"
    name, index = stem, 2
    while name in taken:
        name, index = f"{stem}_{index}", index + 1
    return name


def check_scale(value, name: str = "scale") -> float:
    """A finite number in [-10, 10] (strengths beyond that only produce noise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputTypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not -10.0 <= value <= 10.0:
        raise InvalidInputError(f"{name} must be between -10 and 10, got {value}")
    return value


def parse_lora_argument(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) → ``(path, scale)``; a path containing ':' keeps it."""
    path, sep, tail = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", tail):
        return path, check_scale(float(tail), f"--lora {text}: scale")
    return text, 1.0


def adapter_info(path: str | os.PathLike) -> AdapterInfo | None:
    """The header of an adapter file without loading its tensors (None: a file without our header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return AdapterInfo.from_metadata(dict(handle.metadata() or {}), str(path))
