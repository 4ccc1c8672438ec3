"""Our pipeline against the official reference, case by case, at any dtype: ``python bench/reference_compare.py``.

The official implementation is never part of this repository. Fetch it yourself (its MIT-licensed
``internvlu/`` package) and give its folder with ``--reference``; it runs in its own interpreter
(``--reference-python``, e.g. a venv with its pins: transformers 4.52.3, diffusers 0.35.1). Each
implementation runs every case of a ``cases.json`` (the fixture format) in a child process and
records, per case: generated token ids, the final uint8 images (before the resize to the requested
size), and per denoising step the raw DiT prediction, the guided prediction and the latents, plus
the first DiT call's inputs and the decoded pixels. The parent compares them and writes JSON.

``--stages`` adds a stage-by-stage check in our interpreter: our DiT and VAE on the *reference's*
recorded inputs (so upstream differences do not count), against the reference's outputs, and the
reference's own float32 DiT output on those inputs for scale.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "internvlu-tiny-c"
DIT_INPUTS = (
    "hidden_states", "encoder_hidden_states", "encoder_attention_mask", "encoder_image_token_mask", "timestep",
    "image_grid_thw_gen", "image_fhw_cond", "conditional_input", "image_grid_thw_gen_cond",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Child: run one implementation over the cases and record
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Collects tensors by name; lists of tensors become ``name.0``, ``name.1``, …"""

    def __init__(self):
        self.tensors: dict = {}

    def put(self, name: str, value) -> None:
        import torch

        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if item is not None:
                    self.put(f"{name}.{i}", item)
        elif isinstance(value, torch.Tensor):
            self.tensors[name] = value.detach().cpu().clone()


def _instrument_reference(pipe, rec: Recorder) -> None:
    """Wrap the reference's DiT, scheduler step and VAE decode (instance attributes only)."""
    decoder = pipe.generation_decoder.decoder
    dit_forward, step, decode = decoder.forward, pipe.scheduler.step, pipe.vae.decode
    state = {"step": 0}

    def dit(hidden_states, **kwargs):
        out = dit_forward(hidden_states, **kwargs)
        i = state["step"]
        if i == 0:
            rec.put("dit_in.hidden_states", hidden_states)
            for name in DIT_INPUTS[1:]:
                rec.put(f"dit_in.{name}", kwargs.get(name))
            rec.put("dit_out", out[0] if isinstance(out, tuple) else out.sample)
        rec.put(f"raw.{i}", (out[0] if isinstance(out, tuple) else out.sample).float())
        return out

    def scheduler_step(model_output, timestep, sample, *args, **kwargs):
        i = state["step"]
        rec.put(f"guided.{i}", model_output)
        rec.put(f"latents_before.{i}", sample)
        out = step(model_output, timestep, sample, *args, **kwargs)
        rec.put(f"latents.{i}", out[0])
        state["step"] += 1
        return out

    def vae_decode(z, *args, **kwargs):
        out = decode(z, *args, **kwargs)
        rec.put("decode_in", z[:, :, 0])
        rec.put("decoded", out[0][:, :, 0] if isinstance(out, tuple) else out.sample[:, :, 0])
        return out

    decoder.forward, pipe.scheduler.step, pipe.vae.decode = dit, scheduler_step, vae_decode


def _instrument_ours(pipe, rec: Recorder) -> None:
    names = {"diffusion.raw_noise_pred": "raw", "diffusion.guided_noise_pred": "guided",
             "diffusion.latents_after_step": "latents", "diffusion.latents_before_step": "latents_before"}

    def record(name: str, value) -> None:
        base, _, index = name.rpartition(".")
        if base in names:
            rec.put(f"{names[base]}.{index}", value)
        elif name.startswith("decoder_step0."):
            key = name.removeprefix("decoder_step0.")
            rec.put("dit_out" if key == "output" else f"dit_in.{key}", value)
        elif name == "diffusion.decoded_pixels":
            previous = rec.tensors.get("decoded")
            import torch

            rec.put("decoded", value if previous is None else torch.cat([previous, value.detach().cpu()]))

    pipe.dedupe_guidance_rows = False  # the reference computes every guidance row
    pipe.recorder = record


def run_child(args) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    if args.impl == "reference":
        sys.path.insert(0, str(Path(args.reference).resolve()))
        from internvlu import InternVLUPipeline
    else:
        from internvl_u_core import InternVLUPipeline
    dtype = getattr(torch, args.dtype)
    fixture = Path(args.fixture)
    manifest = json.loads((fixture / "cases.json").read_text())
    pipe = InternVLUPipeline.from_pretrained(str(fixture / manifest.get("checkpoint_dir", "checkpoint")),
                                             torch_dtype=dtype)
    if args.device != "cpu":
        pipe.to(args.device)
    if args.impl == "ours" and args.llm_attention:
        pipe.vlm.language_model.config._attn_implementation = args.llm_attention
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.cases.split(",")) if args.cases else None
    for case in manifest["cases"]:
        if case["generation_mode"] not in ("text", "image", "text_image") or (wanted and case["name"] not in wanted):
            continue
        rec = Recorder()
        if args.impl == "reference":
            _instrument_reference(pipe, rec)
        else:
            _instrument_ours(pipe, rec)
        kwargs = dict(case["call_kwargs"])
        if "generator" in kwargs:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(kwargs["generator"]["seed"])
        image = _images(fixture / manifest.get("inputs_dir", "inputs"), case["inputs"].get("image"))
        with torch.no_grad():
            result = pipe(prompt=case["inputs"]["prompt"], image=image, generation_mode=case["generation_mode"],
                          **kwargs)
        if result.generate_output is not None:
            rec.put("tokens", torch.as_tensor(result.generate_output))
        for i, picture in enumerate(result.images or []):
            rec.put(f"image.{i}", torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.uint8).copy()))
        save_file(rec.tensors, str(out / f"{case['name']}.safetensors"))
        log(f"[{args.impl}] {case['name']}: {len(rec.tensors)} tensors")


def _images(folder: Path, value):
    from PIL import Image

    if value is None:
        return None
    if isinstance(value, str):
        return Image.open(folder / value).convert("RGB")
    return [_images(folder, v) for v in value]


# ----------------------------------------------------------------------------------------------
# Parent: run both, compare
# ----------------------------------------------------------------------------------------------
def _run(args, impl: str, out: Path) -> None:
    python = args.reference_python if impl == "reference" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--child", impl, "--out", str(out), "--dtype", args.dtype,
           "--fixture", str(args.fixture), "--threads", str(args.threads), "--device", args.device,
           "--reference", str(args.reference)]
    if args.llm_attention:
        cmd += ["--llm-attention", args.llm_attention]
    if args.cases:
        cmd += ["--cases", args.cases]
    env = dict(os.environ)
    if impl == "ours":
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    else:
        env.pop("PYTHONPATH", None)
    log(f"running {impl} ({python}) ...")
    subprocess.run(cmd, env=env, check=True, cwd=str(REPO if impl == "ours" else args.reference))


def _diff(a, b) -> dict:
    a, b = a.double(), b.double()
    err = (a - b).abs()
    return {"mean_abs": err.mean().item(), "max_abs": err.max().item(),
            "rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item()}


def compare_case(ours: dict, ref: dict) -> dict:
    row: dict = {}
    if "tokens" in ref:
        row["tokens_equal"] = "tokens" in ours and ours["tokens"].shape == ref["tokens"].shape and bool(
            (ours["tokens"] == ref["tokens"]).all())
    images = sorted(k for k in ref if k.startswith("image."))
    if images:
        diffs = [(ours[k].int() - ref[k].int()).abs() for k in images if k in ours and ours[k].shape == ref[k].shape]
        if len(diffs) == len(images):
            row["image_mean_levels"] = sum(d.double().mean().item() for d in diffs) / len(diffs)
            row["image_max_levels"] = max(int(d.max()) for d in diffs)
        else:
            row["image_shape_mismatch"] = True
    for stage in ("dit_out", "decoded"):
        if stage in ours and stage in ref and ours[stage].shape == ref[stage].shape:
            row[stage] = _diff(ours[stage], ref[stage])
    steps = sorted(int(k.split(".")[1]) for k in ref if k.startswith("latents.") and k.count(".") == 1)
    if steps:
        last = steps[-1]
        for name in ("raw", "latents"):
            key = f"{name}.{last}"
            if key in ours and ours[key].shape == ref[key].shape:
                row[f"{name}_last_step"] = _diff(ours[key], ref[key])
        first = f"raw.{steps[0]}"
        if first in ours and ours[first].shape == ref[first].shape:
            row["raw_first_step"] = _diff(ours[first], ref[first])
    return row


def recorded_dit_inputs(record: dict) -> dict:
    """The first DiT call's keyword arguments from a recording (``dit_in.NAME``, lists as ``dit_in.NAME.i``)."""
    inputs = {}
    for name in DIT_INPUTS:
        key = f"dit_in.{name}"
        items = sorted((k for k in record if k.startswith(key + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if key in record:
            inputs[name] = record[key]
        elif items:
            inputs[name] = [record[k] for k in items]
    return inputs


def stage_check(ref: dict, fixture: Path, dtype_name: str) -> dict:
    """Our DiT and VAE decode on the reference's recorded inputs, against the reference's outputs."""
    import torch

    sys.path.insert(0, str(REPO))
    from internvl_u_core.loading import component_folder
    from internvl_u_core.pipeline import load_generation_decoder, load_vae
    from internvl_u_core.sampling import LatentCodec

    dtype = getattr(torch, dtype_name)
    root = fixture / "checkpoint"
    row: dict = {}
    if "dit_out" in ref:
        inputs = recorded_dit_inputs(ref)
        decoder = load_generation_decoder(component_folder(root, "generation_decoder"), dtype, torch.device("cpu"))
        with torch.no_grad():
            out = decoder.decoder(**inputs)
            row["dit_same_inputs"] = _diff(out.float(), ref["dit_out"].float())
            full = load_generation_decoder(component_folder(root, "generation_decoder"), torch.float32,
                                           torch.device("cpu"))
            exact = full.decoder(**{k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                    for k, v in inputs.items()})
            row["dit_reference_bf16_vs_fp32"] = _diff(ref["dit_out"].float(), exact)
            row["dit_ours_vs_fp32"] = _diff(out.float(), exact)
    if "decode_in" in ref:
        vae = load_vae(component_folder(root, "vae"), dtype, torch.device("cpu"))
        with torch.no_grad():  # what LatentCodec.decode does after de-normalising
            pixels = LatentCodec(vae).frames.decode(ref["decode_in"].to(dtype).unsqueeze(2))
        row["vae_same_inputs"] = _diff(pixels.float(), ref["decoded"].float())
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/reference_compare.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="folder holding the official internvlu/ package")
    p.add_argument("--reference-python", default=sys.executable, help="interpreter with the reference's pins")
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="folder with cases.json, checkpoint/, inputs/")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: every pipeline case)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llm-attention", default=None, choices=("sdpa", "eager"),
                   help="our LLM's attention (default: the pipeline's, SDPA); eager rounds the attention "
                        "probabilities to the model dtype as the reference does without flash-attn")
    p.add_argument("--stages", action="store_true", help="also run our DiT/VAE on the reference's recorded inputs")
    p.add_argument("--keep", type=Path, default=None, help="folder for the recorded tensors (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="result file (default bench/results/reference-<time>.json)")
    p.add_argument("--child", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        args.impl = args.child
        run_child(args)
        return 0
    import tempfile

    from safetensors.torch import load_file

    work = args.keep or Path(tempfile.mkdtemp(prefix="internvlu-compare-"))
    for impl in ("reference", "ours"):
        _run(args, impl, work / impl)
    results = {}
    for file in sorted((work / "reference").glob("*.safetensors")):
        ref = load_file(str(file))
        ours_file = work / "ours" / file.name
        row = compare_case(load_file(str(ours_file)), ref) if ours_file.is_file() else {"missing": True}
        if args.stages:
            row["stages"] = stage_check(ref, args.fixture, args.dtype)
        results[file.stem] = row
        log(f"{file.stem}: {json.dumps(row)}")
    doc = {"schema": "internvl-u-reference-compare/1", "created": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python bench/reference_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dtype": args.dtype, "device": args.device, "fixture": str(args.fixture), "cases": results}
    path = args.json or RESULTS / f"reference-{args.dtype}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(markdown(doc))
    log(f"wrote {path}; recorded tensors in {work}")
    return 0


def markdown(doc: dict) -> str:
    lines = ["| case | tokens | image mean / max (levels) | DiT step 0 rel. L2 | last latents max abs |",
             "|---|---|---|---|---|"]
    for name, row in doc["cases"].items():
        tokens = {True: "equal", False: "differ", None: ""}[row.get("tokens_equal")]
        image = f"{row['image_mean_levels']:.2f} / {row['image_max_levels']}" if "image_mean_levels" in row else ""
        dit = f"{row['dit_out']['rel_l2']:.2e}" if "dit_out" in row else ""
        lat = f"{row['latents_last_step']['max_abs']:.3g}" if "latents_last_step" in row else ""
        lines.append(f"| {name} | {tokens} | {image} | {dit} | {lat} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
