"""Turning the node declarations into ComfyUI V3 nodes.

The pack uses the versioned ``comfy_api.v0_0_2`` (present from ComfyUI 0.3.48 on; checked on 0.3.64
and 0.33.0) and only names whose meaning is the same in every version checked: ``ComfyExtension``,
``io.Schema``/``ComfyNode``/``NodeOutput``, the Int/Float/String/Boolean/Combo/Image/Latent/AnyType/
Custom socket types and ``ui.PreviewText``.
"""

from __future__ import annotations

from typing import Any

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui
except ImportError:  # a core without the pinned version module: the same names from latest
    from comfy_api.latest import ComfyExtension, io, ui

from . import all_specs
from .comfy_runtime import register_model_folder
from .lora_nodes import register_lora_folder
from .schema import ANY_TYPE, LATENT_TYPE, InputSpec, NodeSpec, OutputSpec

_SIMPLE_TYPES: dict[str, Any] = {"IMAGE": io.Image, LATENT_TYPE: io.Latent, ANY_TYPE: io.AnyType}
_custom_types: dict[str, Any] = {}


def _socket_type(name: str) -> Any:
    if name in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[name]
    if name not in _custom_types:
        _custom_types[name] = io.Custom(name)
    return _custom_types[name]


def _v3_input(spec: InputSpec) -> Any:
    common = {"tooltip": spec.tooltip, "optional": spec.optional}
    if spec.type == "INT":
        return io.Int.Input(
            spec.name,
            default=spec.default,
            min=spec.min,
            max=spec.max,
            step=spec.step,
            control_after_generate=spec.control_after_generate or None,
            **common,
        )
    if spec.type == "FLOAT":
        return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **common)
    if spec.type == "STRING":
        return io.String.Input(
            spec.name,
            default=spec.default,
            multiline=spec.multiline,
            force_input=spec.force_input or None,
            **common,
        )
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.type == "COMBO":
        return io.Combo.Input(spec.name, options=spec.option_list(), default=spec.default, **common)
    return _socket_type(spec.type).Input(spec.name, **common)


def _v3_output(spec: OutputSpec) -> Any:
    return _socket_type(spec.type).Output(
        spec.name, display_name=spec.name, tooltip=spec.tooltip, is_output_list=spec.is_list
    )


def _v3_node(spec: NodeSpec) -> type[io.ComfyNode]:
    def define_schema(cls: type) -> io.Schema:
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=spec.category,
            description=spec.description,
            inputs=[_v3_input(i) for i in spec.inputs],
            outputs=[_v3_output(o) for o in spec.outputs],
            is_output_node=spec.output_node,
            is_input_list=spec.input_is_list,
        )

    def execute(cls: type, **inputs: Any) -> io.NodeOutput:
        result = spec.run(**inputs)
        shown = ui.PreviewText(result.text) if result.text is not None else None
        return io.NodeOutput(*result.values, ui=shown)

    return type(
        spec.node_id,
        (io.ComfyNode,),
        {
            "__doc__": spec.description,
            "define_schema": classmethod(define_schema),
            "execute": classmethod(execute),
        },
    )


class InternVLUExtension(ComfyExtension):
    """The pack as ComfyUI sees it."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [_v3_node(spec) for spec in all_specs()]


def build_extension() -> InternVLUExtension:
    register_model_folder()
    register_lora_folder()
    return InternVLUExtension()
