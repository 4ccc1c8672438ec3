"""Framework-neutral node declarations.

Each node is declared once as a :class:`NodeSpec`; ``comfy_v3`` turns the specs into ComfyUI V3
nodes, and the tests execute and check the very same specs without ComfyUI installed.
Nothing here imports torch or ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CATEGORY = "InternVL-U"
NODE_ID_PREFIX = "InternVLU_"

MODEL_TYPE = "INTERNVLU_MODEL"
REASONING_TYPE = "INTERNVLU_REASONING"
ANY_TYPE = "*"

LATENT_TYPE = "LATENT"

#: Input types that ComfyUI shows as widgets (unless ``force_input`` is set).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass(frozen=True)
class InputSpec:
    """One node input: a widget (INT/FLOAT/STRING/BOOLEAN/COMBO) or a socket (any other type)."""

    name: str
    type: str
    tooltip: str
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[], list[str]] | None = None
    multiline: bool = False
    control_after_generate: bool | str = False  # a str names the default mode, e.g. "fixed"
    force_input: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def option_list(self) -> list[str]:
        """The current choices of a COMBO input (recomputed on each call for dynamic lists)."""
        if self.options is None:
            return []
        return list(self.options() if callable(self.options) else self.options)


@dataclass(frozen=True)
class OutputSpec:
    """One node output."""

    name: str
    type: str
    tooltip: str
    is_list: bool = False  # a list ComfyUI iterates over downstream (one item per image, file...)


@dataclass(frozen=True)
class NodeResult:
    """What a node's ``run`` returns: the output values and an optional text shown on the node."""

    values: tuple[Any, ...]
    text: str | None = None


@dataclass(frozen=True)
class NodeSpec:
    """A node: identity, inputs, outputs and the adapter function that runs it."""

    node_id: str
    display_name: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    run: Callable[..., NodeResult] = field(compare=False)
    output_node: bool = False
    category: str = CATEGORY
    input_is_list: bool = False  # run() receives every input as a list (ComfyUI's is_input_list)

    def input(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.node_id} has no input {name!r}")

    def widget_inputs(self) -> list[InputSpec]:
        """Widget inputs in the order the frontend stores them (required first, then optional)."""
        ordered = [i for i in self.inputs if not i.optional] + [i for i in self.inputs if i.optional]
        return [i for i in ordered if i.is_widget]


def object_info(spec: NodeSpec) -> dict[str, Any]:
    """The node's description in the shape ComfyUI's ``GET /object_info`` serves."""
    required: dict[str, list[Any]] = {}
    optional: dict[str, list[Any]] = {}
    for inp in spec.inputs:
        options: dict[str, Any] = {"tooltip": inp.tooltip}
        for key in ("default", "min", "max", "step"):
            value = getattr(inp, key)
            if value is not None:
                options[key] = value
        if inp.multiline:
            options["multiline"] = True
        if inp.control_after_generate:
            options["control_after_generate"] = inp.control_after_generate
        if inp.force_input:
            options["forceInput"] = True
        if inp.type == "COMBO":
            options["options"] = inp.option_list()
        (optional if inp.optional else required)[inp.name] = [inp.type, options]
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {
            "required": [i.name for i in spec.inputs if not i.optional],
            "optional": [i.name for i in spec.inputs if i.optional],
        },
        "output": [o.type for o in spec.outputs],
        "output_name": [o.name for o in spec.outputs],
        "output_tooltips": [o.tooltip for o in spec.outputs],
        "output_is_list": [o.is_list for o in spec.outputs],
        "name": spec.node_id,
        "display_name": spec.display_name,
        "description": spec.description,
        "category": spec.category,
        "output_node": spec.output_node,
    }


def list_rows(inputs: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """ComfyUI's pairing of list inputs for one call each: as many rows as the longest list, shorter
    lists repeating their last item (what it does itself for nodes without ``is_input_list``)."""
    lengths = [len(values) for values in inputs.values()]
    count = max(lengths, default=0)
    return [{name: values[min(i, len(values) - 1)] for name, values in inputs.items()} for i in range(count)]
