"""Small JPEG thumbnails for the template browser: the workflow's graph, drawn from its UI file."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

SIZE = (480, 270)
BACKGROUND = (32, 32, 36)
PACK_NODE = (58, 74, 110)
CORE_NODE = (70, 70, 78)
TEXT = (235, 235, 240)
LINK_COLORS = {"IMAGE": (100, 181, 246), "STRING": (129, 199, 132), "LATENT": (255, 157, 245)}
LINK_DEFAULT = (255, 183, 77)


def draw_thumbnail(ui_workflow: dict[str, Any], title: str) -> Image.Image:
    """Boxes for the nodes, coloured lines for the links, and the title on top."""
    nodes = [n for n in ui_workflow["nodes"] if n["type"] != "MarkdownNote"]
    left = min(n["pos"][0] for n in nodes)
    top = min(n["pos"][1] for n in nodes)
    right = max(n["pos"][0] + n["size"][0] for n in nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes)
    margin, header = 16, 34
    scale = min((SIZE[0] - 2 * margin) / (right - left), (SIZE[1] - header - margin) / (bottom - top))

    def to_px(x: float, y: float) -> tuple[int, int]:
        return int(margin + (x - left) * scale), int(header + (y - top) * scale)

    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = {}
    for node in nodes:
        x0, y0 = to_px(*node["pos"])
        x1, y1 = to_px(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        boxes[node["id"]] = (x0, y0, x1, y1)
    for _, source, _, target, _, kind in ui_workflow["links"]:
        sx = boxes[source][2]
        sy = (boxes[source][1] + boxes[source][3]) // 2
        tx = boxes[target][0]
        ty = (boxes[target][1] + boxes[target][3]) // 2
        draw.line([(sx, sy), (tx, ty)], fill=LINK_COLORS.get(kind, LINK_DEFAULT), width=3)
    for node in nodes:
        box = boxes[node["id"]]
        fill = PACK_NODE if node["type"].startswith("InternVLU_") else CORE_NODE
        draw.rounded_rectangle(box, radius=6, fill=fill, outline=(150, 150, 160))
        label = node.get("title") or node["type"].replace("InternVLU_", "")
        draw.text((box[0] + 5, box[1] + 4), label, fill=TEXT)
    draw.text((margin, 10), title, fill=TEXT)
    return image
