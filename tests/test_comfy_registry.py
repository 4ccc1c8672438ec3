"""The pack is ready for the ComfyUI Registry: metadata, license, publish workflow, security rules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: What ComfyUI imports and runs: the entry module, the nodes and the core they call.
RUNTIME_FILES = [ROOT / "__init__.py", *sorted((ROOT / "nodes").rglob("*.py")),
                 *sorted((ROOT / "internvl_u_core").rglob("*.py"))]


def test_project_fields_the_registry_reads() -> None:
    project = PYPROJECT["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,99}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"]
    assert project["license"] == {"file": "LICENSE"}
    assert project["urls"]["Repository"].startswith("https://github.com/")
    classifiers = project["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in classifiers)
    assert any(c.startswith("Environment :: GPU :: ") for c in classifiers)
    assert "torch" not in {re.split(r"[<>=!~ ]", d)[0] for d in (ROOT / "requirements.txt").read_text().split("\n")
                           if d and not d.startswith("#")}  # never replace the user's CUDA torch


def test_tool_comfy_fields() -> None:
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] == "internvl-u-community"
    assert comfy["DisplayName"] == "InternVL-U"
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith((".png", ".jpg", ".svg", ".webp"))
    icon = comfy["Icon"].rsplit("/main/", 1)[1]
    assert (ROOT / icon).is_file(), "the icon URL points at a file of this repository"
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    oldest = comfy["requires-comfyui"][2:]
    assert f"ComfyUI {oldest}" in (ROOT / "README.md").read_text(encoding="utf-8"), "README names the oldest version"


def test_license_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert "License :: OSI Approved :: MIT License" in PYPROJECT["project"]["classifiers"]


def test_publish_workflow_uses_the_registry_action() -> None:
    workflow = (ROOT / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8")
    assert "uses: Comfy-Org/publish-node-action@" in workflow
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in workflow
    assert '"pyproject.toml"' in workflow  # publishes when the version changes


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_the_registry_security_scan_forbids(path: Path) -> None:
    """No eval/exec/compile, no subprocess or os.system (so no pip from code), no code downloads."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "compile", "__import__"), f"{path}:{node.lineno}"
        if isinstance(node, ast.Attribute):
            assert (getattr(node.value, "id", None), node.attr) not in (("os", "system"), ("os", "popen")), path
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"subprocess", "pip", "urllib.request", "requests", "runpy"} & set(names), f"{path}:{node.lineno}"
    assert "git clone" not in text and "trust_remote_code=True" not in text
