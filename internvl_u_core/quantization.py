"""Quantisation modes: smaller weights for the two large parts, the LLM and the DiT.

One option everywhere: ``InternVLUPipeline.from_pretrained(..., quantization=MODE)``, ``--quantize MODE``
on the command line, the ComfyUI loader, the agent toolkit and the servers all take one of
:data:`MODES` (or ``None``: full precision) and validate it with :func:`check_mode` before any weight
is read. The ViT, its projector and the VAE always keep the pipeline's ``torch_dtype``: quantising the
vision tower visibly hurts understanding in peer models.

Which library does the work depends on the device, chosen by measurement (``bench/README.md``,
"Quantisation"). On CUDA the LLM goes through transformers' quantisation configs and the DiT through
diffusers' (torchao for int8 and fp8, bitsandbytes for nf4). On the CPU, torchao's int8 kernels are
slower than float32, while PyTorch's own dynamic int8 (fbgemm/x86: int8 weights per output channel,
activations quantised on the fly) decodes several times faster, so ``int8`` uses that there. It
quantises each Linear while the checkpoint loads (:func:`dynamic_int8_linear`, reading the float32
rows a block at a time), so the float32 LLM and DiT are never resident and int8 peaks below float32.

=========  ==========================================================  ==================================
mode       CUDA                                                        CPU
=========  ==========================================================  ==================================
``int8``   torchao ``Int8WeightOnlyConfig``                            PyTorch dynamic int8 (``torch.ao``)
``fp8``    torchao ``Float8WeightOnlyConfig`` (compute capability 8.9+) refused
``nf4``    bitsandbytes 4-bit NF4, computing in ``torch_dtype``        refused
``bf16``   bfloat16 weights                                            bfloat16 weights
=========  ==========================================================  ==================================

The DiT's input, timestep and output layers (:data:`DIT_FULL_PRECISION`, under 1% of its weights)
are never quantised; only its transformer blocks are. On CUDA the LLM's tied embedding/LM head stays
unquantised (transformers' default); on the CPU the LM head is the largest matrix read per token, so
it is quantised too.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidInputError, InvalidInputTypeError
from .loading import LinearBuilder, StoredTensor
from .offload import move_except
from .options import QUANTIZATION_MODE_HELP, QUANTIZATION_MODES
from .validation import API_NAMES, ArgumentNames, _no_cuda

MODES = QUANTIZATION_MODES  # the names and help texts live in .options (importable without torch)
MODE_HELP = QUANTIZATION_MODE_HELP
#: DiT modules kept in full precision in every mode: everything outside the transformer blocks.
DIT_FULL_PRECISION = ["img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"]
#: What to install for the CUDA modes (the extras of ``pyproject.toml``).
TORCHAO_INSTALL = 'pip install "torchao>=0.15" (the [quant] extra)'
BITSANDBYTES_INSTALL = 'pip install "torchao>=0.15" "bitsandbytes>=0.45" (the [cuda-quant] extra)'
_MIN_TORCHAO = (0, 15)  # diffusers' torchao quantiser needs it
_FP8_CAPABILITY = (8, 9)  # float8 kernels and diffusers' float8 configs need Ada / Hopper or newer
#: Full-precision bytes of one weight read at a time when CPU int8 quantises it on load.
_LOAD_BLOCK_BYTES = 64 * 2**20

# Backends
DYNAMIC_INT8 = "torch.ao dynamic int8"
TORCHAO = "torchao"
BITSANDBYTES = "bitsandbytes"
BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class QuantizationPlan:
    """How one mode runs on one device: the backend and the dtype the LLM and the DiT compute in."""

    mode: str
    device: torch.device
    backend: str
    dtype: torch.dtype  # the LLM's and the generation decoder's unquantised weights and activations

    @property
    def uses_library_quantizer(self) -> bool:
        """transformers'/diffusers' quantisers (torchao, bitsandbytes) own the quantised weights.

        Their weights are read on the CPU first and quantised while they move to ``device``.
        """
        return self.backend in (TORCHAO, BITSANDBYTES)

    @property
    def quantizes_on_load(self) -> bool:
        """Each layer is quantised as it is read (CPU dynamic int8), so the full-precision model never is resident."""
        return self.backend == DYNAMIC_INT8

    def describe(self) -> str:
        return f"{self.mode} ({self.backend}, computing in {str(self.dtype).removeprefix('torch.')})"


# ----------------------------------------------------------------------------------------------
# Validation (before any weight is read)
# ----------------------------------------------------------------------------------------------
def check_mode(value, device: torch.device, names: ArgumentNames = API_NAMES) -> str | None:
    """The mode name, or None for full precision; refuses names and machines that cannot run it.

    Every message is one line that names the option, the value and what is missing.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputTypeError(f"{names.quantization} must be a string or None, got {type(value).__name__}")
    mode = value.strip().lower()
    if mode in ("", "none", "off"):
        return None
    if mode not in MODES:
        raise InvalidInputError(
            f"{names.setting('quantization', value)} is not a quantisation mode; use one of {', '.join(MODES)} "
            "(or none for full precision)"
        )
    setting = names.setting("quantization", mode)
    problem = _missing_for(mode, device)
    if problem:
        raise InvalidInputError(f"{setting} {problem}")
    return mode


def _missing_for(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device`` here, or None."""
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return "needs a GPU with bfloat16 support; use int8 or nf4"
        return None
    if device.type == "cpu":
        if mode == "int8":
            if not _cpu_int8_engines():
                return (f"needs a quantized CPU engine (fbgemm, x86 or qnnpack) and this torch ({torch.__version__}) "
                        "has none; use bf16")
            return None
        needs = "CUDA and bitsandbytes" if mode == "nf4" else "CUDA and torchao"
        return f"needs a CUDA GPU ({needs}), but {_no_cuda()}; on the CPU use int8 or bf16"
    if device.type != "cuda":
        return f"runs on CUDA or the CPU, not on {device.type}; use bf16 there"
    if mode == "nf4":
        if importlib.util.find_spec("bitsandbytes") is None:
            return f"needs bitsandbytes, which is not installed; run: {BITSANDBYTES_INSTALL}"
        return None
    version = _torchao_version()
    if version is None:
        return f"needs torchao, which is not installed; run: {TORCHAO_INSTALL}"
    if version < _MIN_TORCHAO:
        return f"needs torchao >= {'.'.join(map(str, _MIN_TORCHAO))} (found {'.'.join(map(str, version))}); run: {TORCHAO_INSTALL}"
    if mode == "fp8":
        capability = torch.cuda.get_device_capability(device)
        if capability < _FP8_CAPABILITY:
            return (f"needs a GPU of compute capability 8.9 or newer (Ada, Hopper), this one has "
                    f"{capability[0]}.{capability[1]}; use int8 or nf4")
    return None


def _cpu_int8_engines() -> list[str]:
    return [e for e in torch.backends.quantized.supported_engines if e in ("x86", "fbgemm", "qnnpack", "onednn")]


def _torchao_version() -> tuple[int, int] | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("torchao").split(".")
    except PackageNotFoundError:
        return None
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def make_plan(mode: str | None, device: torch.device, dtype: torch.dtype) -> QuantizationPlan | None:
    """The plan for a checked ``mode`` on ``device``; ``dtype`` is the pipeline's ``torch_dtype``."""
    if mode is None:
        return None
    if mode == "bf16":
        return QuantizationPlan(mode, device, BFLOAT16, torch.bfloat16)
    if device.type == "cpu":  # only int8 passes check_mode on the CPU
        return QuantizationPlan(mode, device, DYNAMIC_INT8, torch.float32)
    backend = BITSANDBYTES if mode == "nf4" else TORCHAO
    return QuantizationPlan(mode, device, backend, dtype)


# ----------------------------------------------------------------------------------------------
# Applying a plan to the loaded components
# ----------------------------------------------------------------------------------------------
def language_model_on_load(vlm: nn.Module, plan: QuantizationPlan | None) -> dict[str, LinearBuilder]:
    """What ``load_weights_into`` replaces while it loads the (meta) VLM: the LLM's Linears, head included.

    Empty unless the plan quantises on load.
    """
    if plan is None or not plan.quantizes_on_load:
        return {}
    return dynamic_int8_on_load(vlm.language_model, "language_model.")


def generation_decoder_on_load(decoder: nn.Module, plan: QuantizationPlan | None) -> dict[str, LinearBuilder]:
    """What ``load_weights_into`` replaces while it loads the (meta) generation decoder: the DiT blocks' Linears."""
    if plan is None or not plan.quantizes_on_load:
        return {}
    return dynamic_int8_on_load(decoder.decoder.transformer_blocks, "decoder.transformer_blocks.")


def quantize_language_model(vlm: nn.Module, plan: QuantizationPlan) -> None:
    """Quantise ``vlm.language_model`` in place (the VLM arrives loaded, its LLM in ``plan.dtype``).

    The library backends get the VLM on the CPU: the LLM is quantised on its way to ``plan.device``,
    then the rest of the VLM follows it there. bf16 needs nothing more than the loader's dtype.
    """
    if plan.backend == DYNAMIC_INT8:
        dynamic_int8(vlm.language_model)
    elif plan.uses_library_quantizer:
        vlm.language_model = _transformers_quantized(vlm.language_model, plan)
        move_except(vlm, {id(vlm.language_model)}, plan.device)


def quantize_generation_decoder(decoder: nn.Module, plan: QuantizationPlan) -> None:
    """Quantise the DiT (``decoder.decoder``) in place (the decoder arrives loaded in ``plan.dtype``).

    As for the LLM, the library backends quantise it on its way from the CPU to ``plan.device``.
    """
    if plan.backend == DYNAMIC_INT8:
        dynamic_int8(decoder.decoder.transformer_blocks)
    elif plan.uses_library_quantizer:
        decoder.decoder = _diffusers_quantized(decoder.decoder, plan)
        move_except(decoder, {id(decoder.decoder)}, plan.device)


def dynamic_int8(module: nn.Module) -> None:
    """PyTorch's dynamic int8 on every ``nn.Linear`` of ``module``: int8 weights per output channel."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _torch_ao_quietly():
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def dynamic_int8_on_load(module: nn.Module, prefix: str) -> dict[str, LinearBuilder]:
    """Every ``nn.Linear`` of ``module`` (named from the loaded root, ``prefix`` + its name) → its int8 builder."""
    return {prefix + name: dynamic_int8_linear for name, sub in module.named_modules() if type(sub) is nn.Linear}


def dynamic_int8_linear(weight: StoredTensor, bias: torch.Tensor | None) -> nn.Module:
    """The dynamic int8 Linear of a stored weight, quantised a block of rows at a time.

    The same int8 values and scales as :func:`dynamic_int8` on the loaded Linear (its observer is
    per output row, so blocks of rows do not change it), while at most ``_LOAD_BLOCK_BYTES`` of the
    full-precision weight are in memory at once: the tied head alone is 1.2 GB in float32.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    out_features, in_features = weight.shape
    block = max(1, _LOAD_BLOCK_BYTES // (in_features * 4))
    values = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, dtype=torch.float64)
    with _torch_ao_quietly():
        for start in range(0, out_features, block):
            stop = min(start + block, out_features)
            rows = weight.rows(start, stop).float()
            observer = per_channel_dynamic_qconfig.weight()
            observer(rows)
            scale, zero_point = observer.calculate_qparams()
            values[start:stop] = torch.quantize_per_channel(
                rows, scale.double(), zero_point.long(), 0, torch.qint8
            ).int_repr()
            scales[start:stop] = scale
            del rows
        qweight = torch._make_per_channel_quantized_tensor(
            values, scales, torch.zeros(out_features, dtype=torch.int64), 0
        )
        del values
        # Built at 1x1 and then given the real weight: the constructor packs a placeholder of its
        # size, which for the head would be 300 MB allocated only to be thrown away.
        linear = DynamicLinear(1, 1, dtype=torch.qint8)
        linear.in_features, linear.out_features = in_features, out_features
        linear.set_weight_bias(qweight, None if bias is None else bias.float())
    return linear


@contextmanager
def _torch_ao_quietly():
    """torch.ao's eager quantisation is deprecated in favour of torchao, whose int8 is slower on the
    CPU (bench/README.md); quantised tensors warn the same way. Both still work in torch 2.13."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_channel", category=UserWarning)
        yield


def transformers_config(plan: QuantizationPlan):
    """transformers' quantisation config for the LLM under ``plan``."""
    if plan.backend == BITSANDBYTES:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=plan.dtype
        )
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=torchao_config(plan.mode))


def diffusers_config(plan: QuantizationPlan):
    """diffusers' quantisation config for the DiT under ``plan`` (its blocks only, see DIT_FULL_PRECISION)."""
    if plan.backend == BITSANDBYTES:
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=plan.dtype,
            llm_int8_skip_modules=list(DIT_FULL_PRECISION),
        )
    from diffusers import TorchAoConfig

    # diffusers before 0.36 names torchao's configs with strings; later versions take the config object.
    if hasattr(TorchAoConfig, "_get_torchao_quant_type_to_method"):
        name = {"int8": "int8wo", "fp8": "float8wo_e4m3"}[plan.mode]
        return TorchAoConfig(name, modules_to_not_convert=list(DIT_FULL_PRECISION))
    return TorchAoConfig(torchao_config(plan.mode), modules_to_not_convert=list(DIT_FULL_PRECISION))


def torchao_config(mode: str):
    """torchao's config object for ``int8`` or ``fp8`` (weight-only; what both libraries' TorchAoConfig wrap)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()


def _transformers_quantized(llm: nn.Module, plan: QuantizationPlan) -> nn.Module:
    """The LLM rebuilt by transformers' ``from_pretrained`` from the loaded weights, with its quantiser."""
    import transformers

    # transformers 4.56 renamed torch_dtype to dtype (the old name still works, with a warning).
    version = tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in transformers.__version__.split(".")[:2])
    dtype_argument = "dtype" if version >= (4, 56) else "torch_dtype"
    state = llm.state_dict()
    quantized = type(llm).from_pretrained(
        None, config=llm.config, state_dict=state, quantization_config=transformers_config(plan),
        device_map={"": plan.device}, **{dtype_argument: plan.dtype},
    )
    return quantized.eval()


def _diffusers_quantized(dit: nn.Module, plan: QuantizationPlan) -> nn.Module:
    """The DiT rebuilt through diffusers' quantiser, in the order ``ModelMixin.from_pretrained`` uses it.

    Our checkpoint keeps the DiT inside ``generation_decoder/``, so diffusers' loader cannot read it
    itself; the loaded (memory-mapped) weights go through the same quantiser calls instead.
    """
    from accelerate import init_empty_weights
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer

    quantizer = DiffusersAutoQuantizer.from_config(diffusers_config(plan), pre_quantized=False)
    device_map = None if plan.device.type == "cpu" else {"": plan.device}
    quantizer.validate_environment(torch_dtype=plan.dtype, device_map=device_map)
    state = dit.state_dict()
    with init_empty_weights(include_buffers=False):
        fresh = type(dit).from_config(dit.config)
    quantizer.preprocess_model(model=fresh, device_map=device_map, keep_in_fp32_modules=[])
    load_model_dict_into_meta(
        fresh, state, dtype=plan.dtype, hf_quantizer=quantizer, keep_in_fp32_modules=[], device_map=device_map,
    )
    quantizer.postprocess_model(fresh)
    fresh.hf_quantizer = quantizer
    return fresh.eval()


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantised) tensor really holds: packed data plus scales."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):  # torchao: the inner tensors
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    if tensor.is_quantized:
        size = tensor.numel() * tensor.element_size()
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            size += tensor_bytes(tensor.q_per_channel_scales()) + tensor_bytes(tensor.q_per_channel_zero_points())
        return size
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax per block (+ nested)
    if state is not None:
        for part in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            if isinstance(part, torch.Tensor):
                size += tensor_bytes(part)
    return size


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights and buffers as stored, quantised ones included (shared tensors once)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    seen: set[int] = set()
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():
        if isinstance(sub, DynamicLinear):  # packed weights are neither parameters nor buffers
            tensors += [t for t in (sub.weight(), sub.bias()) if t is not None]
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
