"""The core's limits are the one source of every bound: the CLI, node widgets and tool schemas follow them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from internvl_u_core import DEFAULT_LIMITS, Limits

ROOT = Path(__file__).resolve().parents[1]

# Changes bounds in the core, then builds the adapters and reports what they allow.
CHANGED_CORE = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from internvl_u_core.limits import DEFAULT_LIMITS as core
core.min_side, core.max_side, core.max_steps, core.max_seed = 24, 1234, 77, 999
core.max_output_images, core.max_new_tokens, core.max_num_beams, core.max_guidance_scale = 3, 555, 5, 12.5
core.max_images_per_prompt, core.max_prompt_chars = 2, 900

import nodes
from agent_tools import ToolLimits
from agent_tools.schemas import EditImageInput, GenerateImageInput, UnderstandImageInput
from internvl_u_core import validation
from internvl_u_core.cli import build_parser

specs = {spec.node_id: spec for spec in nodes.all_specs()}
bounds = lambda node, name: [specs[node].input(name).min, specs[node].input(name).max]
generate = GenerateImageInput.model_json_schema()["properties"]
edit = EditImageInput.model_json_schema()["properties"]
understand = UnderstandImageInput.model_json_schema()["properties"]
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    build_parser().parse_args(["generate", "--help"])
cli = help_text.getvalue()
try:
    validation.requested_size(None, 20, None)
    cli_refuses = None
except ValueError as error:
    cli_refuses = str(error)
print(json.dumps({
    "node": {name: bounds("InternVLU_Generate", name)
             for name in ("width", "steps", "seed", "batch_size", "all_cfg_scale", "part_cfg_scale")},
    "node_text": {name: bounds("InternVLU_Understand", name) for name in ("max_new_tokens", "num_beams", "seed")},
    "node_tooltip": specs["InternVLU_Edit"].input("width").tooltip,
    "tool_width": generate["width"]["anyOf"][0],
    "tool_steps": generate["steps"]["maximum"],
    "tool_seed": generate["seed"]["anyOf"][0]["maximum"],
    "tool_images": generate["num_images"]["maximum"],
    "tool_guidance": edit["image_guidance_scale"]["anyOf"][0]["maximum"],
    "tool_inputs": [edit["images"]["maxItems"], understand["images"]["maxItems"]],
    "tool_tokens": understand["max_new_tokens"]["maximum"],
    "tool_prompt": generate["prompt"]["maxLength"],
    "tool_limits": ToolLimits().__dict__,
    "cli_help": "24–1234" in cli,
    "cli_refuses": cli_refuses,
}))
"""


def test_changing_a_core_bound_changes_what_nodes_tools_and_cli_allow():
    done = subprocess.run([sys.executable, "-c", CHANGED_CORE, str(ROOT)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["node"] == {"width": [0, 1234], "steps": [1, 77], "seed": [0, 999], "batch_size": [1, 3],
                            "all_cfg_scale": [0.0, 12.5], "part_cfg_scale": [0.0, 12.5]}
    assert seen["node_text"] == {"max_new_tokens": [1, 555], "num_beams": [1, 5], "seed": [0, 999]}
    assert "from 24 to 1234" in seen["node_tooltip"]
    assert (seen["tool_width"]["minimum"], seen["tool_width"]["maximum"]) == (24, 1234)
    assert (seen["tool_steps"], seen["tool_seed"], seen["tool_images"]) == (77, 999, 3)
    assert seen["tool_guidance"] == 12.5 and seen["tool_inputs"] == [2, 2]
    assert (seen["tool_tokens"], seen["tool_prompt"]) == (555, 900)
    # The agents' tighter policy defaults never exceed the core's bounds.
    policy = seen["tool_limits"]
    assert (policy["max_output_side"], policy["max_steps"], policy["max_output_images"]) == (1234, 77, 3)
    assert policy["max_new_tokens"] == 555
    assert seen["cli_help"] and "width = 20 is out of range; allowed 24…1234" in seen["cli_refuses"]


def test_unchanged_defaults_keep_the_agents_tighter_policy():
    from agent_tools import ToolLimits

    policy = ToolLimits()
    assert policy.max_steps < DEFAULT_LIMITS.max_steps and policy.max_output_side < DEFAULT_LIMITS.max_side


@pytest.mark.parametrize("field,value", [("max_steps", DEFAULT_LIMITS.max_steps + 1), ("max_output_side", 0)])
def test_tool_limits_outside_the_core_bounds_are_refused(field, value):
    from agent_tools import ToolLimits

    with pytest.raises(ValueError, match=f"ToolLimits.{field} = {value} must be between 1 and the core's"):
        ToolLimits(**{field: value})


def test_each_pipeline_starts_from_its_own_copy_of_the_core_limits(tiny_pipe):
    assert asdict(tiny_pipe.limits) == asdict(DEFAULT_LIMITS) == asdict(Limits())
    assert tiny_pipe.limits is not DEFAULT_LIMITS  # tightening one pipeline leaves the defaults alone
