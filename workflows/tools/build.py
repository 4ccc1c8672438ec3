"""Write every workflow in both formats, the template-browser copies and their thumbnails.

Run from the repository root: ``python -m workflows.tools.build``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .definitions import WORKFLOWS
from .formats import to_api, to_ui
from .thumbnails import draw_thumbnail

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "workflows" / "ui"
TEMPLATE_DIR = ROOT / "example_workflows"


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[Path, str]:
    """Every generated JSON file and its content."""
    files: dict[Path, str] = {}
    for workflow in WORKFLOWS:
        ui = dump(to_ui(workflow))
        files[API_DIR / f"{workflow.name}.json"] = dump(to_api(workflow))
        files[UI_DIR / f"{workflow.name}.json"] = ui
        files[TEMPLATE_DIR / f"{workflow.name}.json"] = ui
    return files


def main() -> None:
    for path, content in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    for workflow in WORKFLOWS:
        ui = json.loads((UI_DIR / f"{workflow.name}.json").read_text(encoding="utf-8"))
        thumbnail = draw_thumbnail(ui, workflow.title)
        thumbnail.save(TEMPLATE_DIR / f"{workflow.name}.jpg", quality=85, optimize=True)
    print(f"wrote {len(WORKFLOWS)} workflows")


if __name__ == "__main__":
    main()
