"""Writing a workflow declaration in ComfyUI's API format and UI (graph, schema 0.4) format."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from nodes import all_specs
from nodes.schema import NodeSpec

from .core_nodes import CORE_NODES, WIDGET_TYPES
from .definitions import Link, Node, Workflow

COMFY_VERSION = "0.3.64"
FRONTEND_VERSION = "1.27.10"


@dataclass(frozen=True)
class SlotInfo:
    name: str
    type: str
    optional: bool = False
    widget: bool = False
    control: str | None = None  # default mode of a control_after_generate companion
    is_list: bool = False  # an output list (drawn with the grid-shaped socket)


@dataclass(frozen=True)
class NodeInfo:
    inputs: list[SlotInfo]
    outputs: list[SlotInfo]
    ui_widgets: list[str]  # frontend-only widgets (LoadImage's "upload")


def _control_mode(value: bool | str) -> str | None:
    if not value:
        return None
    return value if isinstance(value, str) else "randomize"


def _from_spec(spec: NodeSpec) -> NodeInfo:
    inputs = [
        SlotInfo(i.name, i.type, i.optional, i.is_widget, _control_mode(i.control_after_generate)) for i in spec.inputs
    ]
    return NodeInfo(inputs, [SlotInfo(o.name, o.type, is_list=o.is_list) for o in spec.outputs], [])


def node_info(node_type: str) -> NodeInfo:
    """Inputs and outputs of a pack node or of a core node used by the workflows."""
    specs = {spec.node_id: spec for spec in all_specs()}
    if node_type in specs:
        return _from_spec(specs[node_type])
    core = CORE_NODES[node_type]
    inputs = [SlotInfo(n, t, widget=t in WIDGET_TYPES) for n, t in core["inputs"]]
    outputs = [SlotInfo(n, t) for n, t in core["outputs"]]
    return NodeInfo(inputs, outputs, list(core.get("ui_widgets", [])))


def to_api(workflow: Workflow) -> dict[str, Any]:
    """The ``POST /prompt`` body's ``prompt``: node id -> class_type and inputs."""
    prompt: dict[str, Any] = {}
    for node in workflow.nodes:
        inputs = {
            name: [str(value.node), value.slot] if isinstance(value, Link) else value
            for name, value in node.inputs.items()
        }
        entry: dict[str, Any] = {"class_type": node.type, "inputs": inputs}
        if node.title:
            entry["_meta"] = {"title": node.title}
        prompt[str(node.id)] = entry
    return prompt


def _depths(workflow: Workflow) -> dict[int, int]:
    depth: dict[int, int] = {}

    def visit(node: Node) -> int:
        if node.id not in depth:
            sources = [v.node for v in node.inputs.values() if isinstance(v, Link)]
            by_id = {n.id: n for n in workflow.nodes}
            depth[node.id] = 1 + max((visit(by_id[s]) for s in sources), default=-1)
        return depth[node.id]

    for node in workflow.nodes:
        visit(node)
    return depth


def _size(node: Node, info: NodeInfo) -> list[int]:
    if node.type == "LoadImage":
        return [320, 360]
    if node.type in ("SaveImage", "PreviewImage"):
        return [420, 460]
    sockets = [i for i in info.inputs if not i.widget]
    widgets = [i for i in info.inputs if i.widget]
    height = 40 + 22 * max(len(sockets), len(info.outputs)) + 26 * len(widgets)
    height += sum(70 for i in widgets if i.type == "STRING")
    return [400, height]


def _widget_values(node: Node, info: NodeInfo) -> list[Any]:
    values: list[Any] = []
    ordered = [i for i in info.inputs if not i.optional] + [i for i in info.inputs if i.optional]
    defaults = _spec_defaults(node.type)
    for slot in ordered:
        if not slot.widget:
            continue
        value = node.inputs.get(slot.name, defaults.get(slot.name))
        values.append(defaults.get(slot.name, "") if isinstance(value, Link) else value)
        if slot.control:
            values.append(slot.control)
    if node.type == "LoadImage":
        values.append("image")
    return values


def _spec_defaults(node_type: str) -> dict[str, Any]:
    for spec in all_specs():
        if spec.node_id == node_type:
            return {i.name: i.default for i in spec.inputs if i.default is not None}
    return {}


def to_ui(workflow: Workflow) -> dict[str, Any]:
    """The drag-and-drop workflow (LiteGraph graph, schema version 0.4)."""
    infos = {node.id: node_info(node.type) for node in workflow.nodes}
    depths = _depths(workflow)
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes: list[dict[str, Any]] = []
    column_y: dict[int, int] = {}
    order = sorted(workflow.nodes, key=lambda n: (depths[n.id], n.id))
    for index, node in enumerate(order):
        info = infos[node.id]
        inputs: list[dict[str, Any]] = []
        for slot in info.inputs:
            if slot.widget:
                continue
            entry: dict[str, Any] = {"name": slot.name, "type": slot.type, "link": None}
            if slot.optional:
                entry["shape"] = 7
            inputs.append(entry)
        for slot in info.inputs:
            value = node.inputs.get(slot.name)
            if slot.widget and isinstance(value, Link):
                inputs.append({"name": slot.name, "type": slot.type, "widget": {"name": slot.name}, "link": None})
        for target_slot, entry in enumerate(inputs):
            value = node.inputs.get(entry["name"])
            if isinstance(value, Link):
                link_id = len(links) + 1
                source_type = infos[value.node].outputs[value.slot].type
                links.append([link_id, value.node, value.slot, node.id, target_slot, source_type])
                out_links.setdefault((value.node, value.slot), []).append(link_id)
                entry["link"] = link_id
        depth = depths[node.id]
        size = _size(node, info)
        y = column_y.get(depth, 80)
        column_y[depth] = y + size[1] + 60
        properties: dict[str, Any] = {"Node name for S&R": node.type}
        if node.type in CORE_NODES:
            properties.update({"cnr_id": "comfy-core", "ver": COMFY_VERSION})
        ui_node: dict[str, Any] = {
            "id": node.id,
            "type": node.type,
            "pos": [40 + 460 * depth, y],
            "size": size,
            "flags": {},
            "order": index,
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "properties": properties,
            "widgets_values": _widget_values(node, info),
        }
        if node.title:
            ui_node["title"] = node.title
        ui_nodes.append(ui_node)
    for ui_node in ui_nodes:
        info = infos[ui_node["id"]]
        ui_node["outputs"] = [
            {
                "name": slot.name,
                "type": slot.type,
                "links": out_links.get((ui_node["id"], index)),
                "slot_index": index,
                **({"shape": 6} if slot.is_list else {}),
            }
            for index, slot in enumerate(info.outputs)
        ]
    note_id = max(n.id for n in workflow.nodes) + 1
    ui_nodes.append(_note(note_id, workflow, len(ui_nodes)))
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"internvl-u/{workflow.name}")),
        "revision": 0,
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def _note(node_id: int, workflow: Workflow, order: int) -> dict[str, Any]:
    text = f"## {workflow.title}\n\n{workflow.description}\n\n{workflow.setup}"
    return {
        "id": node_id,
        "type": "MarkdownNote",
        "pos": [40, -220],
        "size": [520, 200],
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "title": "About this workflow",
        "properties": {},
        "widgets_values": [text],
        "color": "#432",
        "bgcolor": "#653",
    }
