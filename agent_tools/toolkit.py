"""`InternVLUToolkit`: the four InternVL-U tools over one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.tools import BaseTool, BaseToolkit
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from agent_tools.session import InternVLUSession, ReturnImages, ToolLimits
from agent_tools.tools import EditImageTool, GenerateImageTool, ReasonTool, UnderstandImageTool
from internvl_u_core import DEFAULT_HUB_ID, InternVLUPipeline
from internvl_u_core.pipeline import check_load_options
from internvl_u_core.remote import is_server_url


class InternVLUToolkit(BaseToolkit):
    """Understand, reason, generate and edit images with one InternVL-U model.

    Example:
        ```python
        toolkit = InternVLUToolkit(
            model="InternVL-U/InternVL-U",  # the default; or a checkpoint folder, a loaded InternVLUPipeline,
                                            # or a server: "http://gpu-box:8091" (internvl-u serve)
            output_dir="outputs",
            allowed_dirs=["uploads"],
        )
        agent = create_agent(chat_model, tools=toolkit.get_tools())
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = Field(
        default=DEFAULT_HUB_ID,
        description="A loaded InternVLUPipeline, a checkpoint path / hub id loaded on first use, or the URL of "
        "an `internvl-u serve` server (http(s)://host:port).",
    )
    api_key: SecretStr | None = Field(
        default=None, description="The server's key when model is a URL (None: $INTERNVL_U_API_KEY if set)."
    )
    timeout: float = Field(default=600.0, gt=0, description="Seconds one job may take on the server (URL models).")
    output_dir: Path = Field(description="Folder for generated and edited images (`<image_id>.png`).")
    allowed_dirs: list[Path] = Field(
        default_factory=list, description="Folders whose image files the agent may read, besides output_dir."
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments for InternVLUPipeline.from_pretrained (device, dtype...)."
    )
    quantization: str | None = Field(
        default=None,
        description="Quantisation of a model loaded from a path: one of internvl_u_core.quantization.MODES "
        "(int8, fp8, nf4, bf16), or None for full precision.",
    )
    offload: str | None = Field(
        default=None,
        description="Offloading of a model loaded from a path: one of internvl_u_core.offload.MODES "
        "(model, group, sequential; needs a GPU), or None.",
    )
    limits: ToolLimits = Field(default_factory=ToolLimits, description="Input, output and run-length bounds.")
    return_images: ReturnImages = Field(
        default="none",
        description="Also show new images to the agent's model: 'none', 'thumbnail' or 'full' (base64 PNG blocks).",
    )
    thumbnail_size: int = Field(default=256, ge=16, le=2048, description="Longest side of thumbnails.")
    loras: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapters the agent may apply to generate_image/edit_image, by name: {name: file.safetensors}. "
        "The agent sees only the names; it cannot give a path.",
    )

    _session: InternVLUSession = PrivateAttr()
    _tools: list[BaseTool] = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        load_kwargs = dict(self.load_kwargs)
        if self.quantization is not None or self.offload is not None:
            if isinstance(self.model, InternVLUPipeline) or is_server_url(self.model):
                msg = ("quantization and offload apply when the toolkit loads the model; pass them to "
                       "InternVLUPipeline.from_pretrained for a pipeline you load yourself, or to "
                       "'internvl-u serve' (--quantize, --offload) for a served model")
                raise ValueError(msg)
            load_kwargs.update(quantization=self.quantization, offload=self.offload)
            # Refuse a choice this machine cannot run now, not at the agent's first tool call.
            check_load_options(load_kwargs.get("device"), load_kwargs.get("torch_dtype", "auto"),
                               self.quantization, self.offload)
        self._session = InternVLUSession(
            self.model,
            self.output_dir,
            self.allowed_dirs,
            load_kwargs=load_kwargs,
            limits=self.limits,
            return_images=self.return_images,
            thumbnail_size=self.thumbnail_size,
            api_key=self.api_key.get_secret_value() if self.api_key is not None else None,
            timeout=self.timeout,
            loras=self.loras,
        )
        tool_classes = (UnderstandImageTool, ReasonTool, GenerateImageTool, EditImageTool)
        self._tools = [tool_class(session=self._session) for tool_class in tool_classes]
        for tool in self._tools:
            if self.loras and tool.name in ("generate_image", "edit_image"):
                tool.description += f" LoRA adapters you may name in 'loras': {', '.join(sorted(self.loras))}."

    @property
    def session(self) -> InternVLUSession:
        """The state the tools share (model runner, image store, reasonings)."""
        return self._session

    def get_tools(self) -> list[BaseTool]:
        """Return understand_image, reason, generate_image and edit_image."""
        return list(self._tools)

    def add_image(self, source: Any) -> str:
        """Register an application-supplied image (PIL image or path); return its image_id for the agent."""
        return self._session.add_image(source)

    def load(self) -> Any:
        """Load the model now instead of on the first tool call; return the pipeline."""
        return self._session.load()
