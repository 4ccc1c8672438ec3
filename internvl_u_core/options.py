"""Names and help texts of the loading options, importable without torch.

``internvl-u --help`` and the adapters' subcommand registration read these on every call, so this
module (like :mod:`.limits`) imports nothing heavy; :mod:`.quantization`, :mod:`.offload`,
:mod:`.loading` and :mod:`.remote` take their constants from here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The released checkpoint on the Hugging Face hub.
DEFAULT_HUB_ID = "InternVL-U/InternVL-U"

#: The quantisation modes, in the order the surfaces list them (None = full precision).
QUANTIZATION_MODES = ("int8", "fp8", "nf4", "bf16")
#: One line per quantisation mode, for help texts and tooltips.
QUANTIZATION_MODE_HELP = {
    "int8": "8-bit integer weights for the LLM and the DiT (CUDA: torchao; CPU: PyTorch dynamic int8, fastest there)",
    "fp8": "8-bit float weights for the LLM and the DiT (torchao; CUDA GPUs of compute capability 8.9+)",
    "nf4": "4-bit NormalFloat weights for the LLM and the DiT (bitsandbytes; CUDA only)",
    "bf16": "bfloat16 weights for the LLM and the DiT; the ViT and the VAE keep torch_dtype (worth it on the CPU)",
}

#: The offload modes, from the fastest to the least GPU memory (None = everything stays on the device).
OFFLOAD_MODES = ("model", "group", "sequential")
#: One line per offload mode, for help texts and tooltips.
OFFLOAD_MODE_HELP = {
    "model": "each component moves to the GPU whole while it runs (fastest rung)",
    "group": "the ViT, LLM and DiT blocks stream to the GPU one block at a time, prefetched on a CUDA stream",
    "sequential": "every layer moves to the GPU only for its own call (least GPU memory, slowest)",
}

#: The environment variable holding the server's key: ``internvl-u serve`` reads it for ``--api-key``,
#: and a client given no key sends it.
API_KEY_ENV = "INTERNVL_U_API_KEY"


def is_server_url(model) -> bool:
    """Whether a ``model`` argument names a server (``http://…``/``https://…``) rather than a checkpoint."""
    return isinstance(model, str) and model.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class ArgumentNames:
    """How one surface spells the arguments in error messages: Python keywords or CLI flags."""

    width: str = "width"
    height: str = "height"
    steps: str = "steps"
    num_images: str = "num_images"
    all_cfg_scale: str = "all_cfg_scale"
    part_cfg_scale: str = "part_cfg_scale"
    seed: str = "seed"
    device: str = "device"
    max_new_tokens: str = "max_new_tokens"
    min_new_tokens: str = "min_new_tokens"
    do_sample: str = "do_sample"
    temperature: str = "temperature"
    top_p: str = "top_p"
    num_beams: str = "num_beams"
    quantization: str = "quantization"
    offload: str = "offload"
    flags: bool = False  # CLI style: "--device cpu" rather than "device='cpu'"

    def setting(self, argument: str, value) -> str:
        """``argument`` set to ``value`` as this surface writes it."""
        name = getattr(self, argument)
        return f"{name} {value}" if self.flags else f"{name}={value!r}"
