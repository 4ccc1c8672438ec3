"""The ComfyUI entry module (repo-root ``__init__.py``): cheap to import, clear when broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "diffusers", "transformers")

# Loads the entry module the way ComfyUI does (a package named after its path) and reports
# which heavy modules it pulled in.
IMPORT_PROBE = """
import importlib.util, json, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location(root, root + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[root] = module
spec.loader.exec_module(module)
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "diffusers", "transformers"})
print(json.dumps({"heavy": heavy, "entry": callable(module.comfy_entrypoint), "web": module.WEB_DIRECTORY}))
"""

# Runs comfy_entrypoint with a dependency made unimportable (sys.modules[name] = None).
MISSING_PROBE = """
import asyncio, importlib.util, sys
root = sys.argv[1]
sys.modules["diffusers"] = None
spec = importlib.util.spec_from_file_location(root, root + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[root] = module
spec.loader.exec_module(module)
try:
    asyncio.run(module.comfy_entrypoint())
except Exception as error:
    print(type(error).__name__ + ": " + str(error))
"""


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_entry_module_imports_without_heavy_modules() -> None:
    report = json.loads(_run(IMPORT_PROBE))
    assert report["heavy"] == [], f"entry module imported {report['heavy']}"
    assert report["entry"] is True


def test_web_directory_exists() -> None:
    report = json.loads(_run(IMPORT_PROBE))
    web = ROOT / report["web"]
    assert web.is_dir() and list(web.glob("*.js"))


def test_missing_dependency_gives_one_clear_message() -> None:
    line = _run(MISSING_PROBE)
    assert "\n" not in line
    assert line.startswith("InternVLUUnavailable: InternVL-U nodes disabled")
    assert "diffusers" in line and "pip install" in line


def test_node_package_imports_without_comfyui() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import nodes; "
        "print(len(nodes.all_specs())); "
        "print(any(m.startswith('comfy') for m in sys.modules))"
    )
    assert _run(code).split() == ["10", "False"]


def test_dependency_check_covers_what_the_core_imports() -> None:
    """Every third-party package imported by internvl_u_core is in the entry module's check."""
    import ast

    sys.path.insert(0, str(ROOT))
    from nodes.dependencies import OPTIONAL, REQUIRED

    imported: set[str] = set()
    for path in (ROOT / "internvl_u_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "internvl_u_core"}
    known = set(REQUIRED) | set(OPTIONAL)
    assert third_party <= known, f"add to nodes/dependencies.py: {third_party - known}"
