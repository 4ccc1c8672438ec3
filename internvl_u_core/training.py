"""LoRA training of the DiT with the model's own objective (``internvl-u train-lora``).

What is InternVL-U specific lives here; PEFT injects and saves the adapter, accelerate handles the
device and mixed precision. The objective follows the released training (``docs`` training notes):

* flow matching on the VAE's normalised latents: ``x_t = (1 − σ)·x0 + σ·ε``, the DiT predicts the
  velocity ``ε − x0``, mean squared error;
* ``σ``: ``sigmoid(N(0, 1))`` (logit-normal), then the sampler's shift ``s·σ / (1 + (s − 1)·σ)`` with
  the released ``flow_shift`` 3.0; the DiT sees the timestep ``σ·1000`` as at inference;
* the condition is computed by the pipeline exactly as at inference (its three guidance rows: the
  full prompt, the prompt without text, no condition), once per sample, with the VLM and VAE frozen;
* guidance dropout: text-to-image trains 10% of samples on the unconditioned row; edits train 5% on
  the unconditioned row and 5% on the text-dropped row (which keeps the source image).

Data: a folder of images with same-name ``.txt`` captions (what the ComfyUI Save Captions node
writes), or for edits a folder with ``source/`` and ``target/`` images of the same names and the
instruction in ``target/NAME.txt``. Images are cropped to aspect-ratio buckets on the 32-pixel grid.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import lora as adapters
from .errors import InvalidInputError
from .sampling import FLOW_SHIFT

logger = logging.getLogger("internvl_u_core")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_GRID = 32
MAX_ASPECT = 2.0  # the released Stage 2 limits the aspect ratio to 0.5–2.0
TEXT_TO_IMAGE_DROP = 0.10
EDIT_DROP_ALL = 0.05
EDIT_DROP_TEXT = 0.05
TRAINEE = "internvl_u_trainee"  # the adapter's name inside the DiT while it trains
ROW_FULL, ROW_NO_TEXT, ROW_UNCONDITIONED = 0, 1, 2
_MAX_LISTED = 8


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One training example: the image to draw, its caption or instruction, and the edit's source."""

    target: Path
    prompt: str
    source: Path | None = None


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def _read_caption(path: Path, problems: list[str]) -> str:
    if not path.is_file():
        problems.append(f"{path.name}: missing (every image needs a same-name .txt caption)")
        return ""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return ""
    if not text:
        problems.append(f"{path.name}: empty")
    return text


def _check_folder(folder: str | os.PathLike, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"{what} {path} is not a folder")
    return path


def scan_captioned_folder(folder: str | os.PathLike) -> list[Sample]:
    """Images with same-name ``.txt`` captions (``cat.png`` + ``cat.txt``); every problem is listed."""
    root = _check_folder(folder, "--data")
    images = _images_in(root)
    if not images:
        raise InvalidInputError(
            f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put images and same-name .txt captions there"
        )
    problems: list[str] = []
    samples = [Sample(path, _read_caption(path.with_suffix(".txt"), problems)) for path in images.values()]
    _refuse(problems, root)
    check_images([s.target for s in samples])
    return samples


def scan_edit_pairs(folder: str | os.PathLike) -> list[Sample]:
    """``source/NAME.*`` + ``target/NAME.*`` + the instruction in ``target/NAME.txt``, per sample."""
    root = _check_folder(folder, "--edit-pairs")
    source_dir, target_dir = root / "source", root / "target"
    if not source_dir.is_dir() or not target_dir.is_dir():
        raise InvalidInputError(
            f"--edit-pairs {root} must hold a source/ and a target/ folder (source/NAME.png, target/NAME.png and the "
            "instruction in target/NAME.txt)"
        )
    sources, targets = _images_in(source_dir), _images_in(target_dir)
    if not targets:
        raise InvalidInputError(f"--edit-pairs {target_dir} holds no images")
    problems = [f"source/{name}.*: missing (target/{targets[name].name} has no source image)"
                for name in targets if name not in sources]
    problems += [f"target/{name}.*: missing (source/{sources[name].name} has no target image)"
                 for name in sources if name not in targets]
    samples = [
        Sample(path, _read_caption(path.with_suffix(".txt"), problems), sources.get(name))
        for name, path in targets.items()
    ]
    _refuse(problems, root)
    check_images([p for s in samples for p in (s.source, s.target)])
    return samples


def check_images(paths: list[Path]) -> None:
    """Decode every image once (before any model loads): unreadable or tiny files are listed."""
    problems = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                if min(image.size) < 16:
                    problems.append(f"{path.name}: {image.width}×{image.height} is smaller than 16 px")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            problems.append(f"{path.name}: unreadable image ({exc.__class__.__name__}: {exc})")
    _refuse(problems, paths[0].parent if paths else Path("."))


def _refuse(problems: list[str], root: Path) -> None:
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise InvalidInputError(f"training data in {root} has problems: {listed}{more}")


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The ``(width, height)`` bucket: about ``resolution²`` pixels, the image's aspect (0.5–2.0), sides on the 32-px grid."""
    aspect = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
    bucket_h = math.sqrt(resolution * resolution / aspect)
    bucket_w = bucket_h * aspect
    return (max(BUCKET_GRID, round(bucket_w / BUCKET_GRID) * BUCKET_GRID),
            max(BUCKET_GRID, round(bucket_h / BUCKET_GRID) * BUCKET_GRID))


def crop_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` and cut the centre (no stretching)."""
    image = image.convert("RGB")
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_unit_pixels(image: Image.Image) -> torch.Tensor:
    """PIL → ``[1, 3, H, W]`` in [-1, 1], the range the pipeline's VAE decode returns."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything ``train-lora`` takes; the defaults suit a small style or subject set."""

    model: str
    out: str
    data: str | None = None
    edit_pairs: str | None = None
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = adapters.DEFAULT_TARGETS
    learning_rate: float = 1e-4
    steps: int = 1000
    batch_size: int = 1
    seed: int = 0
    resolution: int = 512
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    checkpoint_every: int = 250
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_seed: int = 0
    sample_steps: int = 20
    gradient_checkpointing: bool | None = None  # None: on CUDA only
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 elsewhere; or no / bf16 / fp16
    device: str | None = None
    trigger_words: tuple[str, ...] = ()
    resume: str | None = None
    flow_shift: float = FLOW_SHIFT
    eval_seed: int = 1234  # the fixed noise and timesteps of the before/after loss

    def check(self) -> None:
        """Refuse bad options before anything loads."""
        if (self.data is None) == (self.edit_pairs is None):
            raise InvalidInputError("give exactly one of --data FOLDER (captioned images) or --edit-pairs FOLDER")
        if not str(self.out).endswith(".safetensors"):
            raise InvalidInputError(f"--out {self.out}: the adapter is written as a .safetensors file")
        for name, low in (("rank", 1), ("steps", 1), ("batch_size", 1), ("resolution", BUCKET_GRID),
                          ("sample_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"{name} must be an integer ≥ {low}, got {value!r}")
        for name in ("checkpoint_every", "sample_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be ≥ 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise InvalidInputError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise InvalidInputError(f"alpha must be a positive number, got {self.alpha}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InvalidInputError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if not self.target_modules:
            raise InvalidInputError("target_modules must name at least one layer")

    @property
    def is_edit(self) -> bool:
        return self.edit_pairs is not None

    def scan(self) -> list[Sample]:
        return scan_edit_pairs(self.edit_pairs) if self.is_edit else scan_captioned_folder(self.data)

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run it continues."""
        keys = ("data", "edit_pairs", "rank", "alpha", "target_modules", "learning_rate", "batch_size", "seed",
                "resolution", "warmup_steps", "max_grad_norm", "flow_shift")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}


@dataclass
class TrainResult:
    adapter: Path
    losses: list[float]  # the training loss of every step (0-based steps)
    eval_loss_before: float  # loss of the untrained adapter on the fixed samples and timesteps
    eval_loss_after: float
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# The cache: what the frozen VLM and VAE give for each sample, computed once
# ----------------------------------------------------------------------------------------------
@dataclass
class CachedSample:
    latents: torch.Tensor  # [C, h, w] normalised target latents, float32, CPU
    spans: list[tuple[torch.Tensor, torch.Tensor]]  # per guidance row: VLM features and image-token mask
    image_fhw: list[torch.Tensor]
    references: list[torch.Tensor | None]
    reference_grids: list[torch.Tensor | None]
    target_grid: torch.Tensor  # [3]
    bucket: tuple[int, int]


@torch.inference_mode()
def encode_sample(pipe, sample: Sample, resolution: int) -> CachedSample:
    """The three guidance rows of the prompt exactly as ``generate``/``edit`` build them, and the target latents."""
    from .tracing import RunTrace

    with Image.open(sample.target) as image:
        bucket = bucket_size(image.width, image.height, resolution)
        target = crop_to(image, bucket)
    sources = []
    if sample.source is not None:
        with Image.open(sample.source) as image:
            sources = [image.convert("RGB")]
    width, height = bucket
    batch = pipe.processor([sample.prompt], [sources], "image", None, height=height, width=width)
    cond = pipe._conditioning(batch, batch.input_ids, batch.attention_mask, RunTrace(None))
    pipe._activate(pipe.vae)
    latents = pipe.codec.encode(to_unit_pixels(target))[0].float().cpu()

    def cpu(value):
        return None if value is None else value.detach().cpu()

    return CachedSample(
        latents=latents,
        spans=[(features.float().cpu(), mask.cpu()) for features, mask in cond.spans],
        image_fhw=[cpu(v) for v in cond.image_fhw],
        references=[None if r is None else r.float().cpu() for r in cond.references],
        reference_grids=[cpu(v) for v in cond.reference_grids],
        target_grid=cond.target_grid[0].cpu(),
        bucket=bucket,
    )


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The sampler's timestep shift applied to ``u`` in (0, 1)."""
    return shift * u / (1 + (shift - 1) * u)


def draw_sigmas(count: int, generator: torch.Generator, shift: float) -> torch.Tensor:
    """``logit_normal(0, 1)`` draws, shifted: the released training's timestep distribution."""
    return shifted_sigmas(torch.sigmoid(torch.randn(count, generator=generator)), shift)


def dropout_row(draw: float, is_edit: bool) -> int:
    """Which guidance row a sample trains on, for a uniform draw in [0, 1)."""
    if is_edit:
        if draw < EDIT_DROP_ALL:
            return ROW_UNCONDITIONED
        return ROW_NO_TEXT if draw < EDIT_DROP_ALL + EDIT_DROP_TEXT else ROW_FULL
    return ROW_UNCONDITIONED if draw < TEXT_TO_IMAGE_DROP else ROW_FULL


def flow_matching_loss(pipe, items: list[CachedSample], rows: list[int], sigmas: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the DiT's prediction at ``x_t`` and the velocity ``noise − x0``."""
    decoder = pipe.generation_decoder
    dit = decoder.decoder
    device = next(dit.parameters()).device
    dtype = dit.dtype  # the base weights' dtype (the float32 LoRA weights come later in the parameter order)
    spans = [item.spans[row] for item, row in zip(items, rows)]
    references = [item.references[row] for item, row in zip(items, rows)]
    has_refs = any(r is not None for r in references)
    channels = dit.latent_channels
    with torch.no_grad():
        hidden, text_mask, image_mask = decoder.prepare_forward_input(
            [s[0].to(device, dtype) for s in spans], [s[1].to(device) for s in spans]
        )
        context = dit.prepare_context(
            encoder_hidden_states=hidden,
            encoder_attention_mask=text_mask,
            encoder_image_token_mask=image_mask,
            image_grid_thw_gen=torch.stack([item.target_grid for item in items]).to(device),
            image_fhw_cond=[item.image_fhw[row].to(device) for item, row in zip(items, rows)],
            conditional_input=[
                (r if r is not None else torch.zeros(0, channels, 1, 1)).to(device, dtype) for r in references
            ] if has_refs else None,
            image_grid_thw_gen_cond=[
                (item.reference_grids[row] if item.reference_grids[row] is not None
                 else torch.zeros(0, 3, dtype=torch.long)).to(device)
                for item, row in zip(items, rows)
            ] if has_refs else None,
        )
    x0 = torch.stack([item.latents for item in items]).to(device)
    noise = noise.to(device)
    sigma = sigmas.to(device).view(-1, 1, 1, 1)
    noisy = (1 - sigma) * x0 + sigma * noise
    timestep = sigmas.to(device) * pipe.scheduler.config.num_train_timesteps * dit.config.timestep_scale
    prediction = dit(noisy.to(dtype), timestep=timestep.float(), context=context)
    return torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class _Schedule:
    """Linear warm-up to the learning rate, then constant (a LambdaLR factor that pickles)."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0


def checkpoint_folder(out: Path) -> Path:
    return out.with_name(out.stem + ".checkpoints")


def samples_folder(out: Path) -> Path:
    return out.with_name(out.stem + ".samples")


def latest_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest ``step-*`` inside a checkpoints folder."""
    if (path / "state.pt").is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / "state.pt").is_file()) if path.is_dir() else []
    if not steps:
        raise InvalidInputError(f"--resume {path}: no checkpoint there (expected a step-N folder with state.pt)")
    return steps[-1]


def load_training_pipeline(config: TrainConfig, device: torch.device, dtype: torch.dtype):
    from .pipeline import InternVLUPipeline

    return InternVLUPipeline.from_pretrained(config.model, torch_dtype=dtype, device=device)


def train_lora(
    config: TrainConfig, pipe=None, progress: bool = True, log: Callable[[str], None] | None = None
) -> TrainResult:
    """Train a LoRA on the DiT and write it to ``config.out``; ``pipe``: an already loaded pipeline to reuse.

    Data and options are checked before any model loads. A passed ``pipe`` is given back as it came
    (the trained adapter removed, no gradients kept).
    """
    from accelerate import Accelerator
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    say = log or (lambda message: logger.info(message))
    adapters.require_peft()
    config.check()
    samples = config.scan()
    out = Path(config.out).expanduser()
    resume_from = latest_checkpoint(Path(config.resume).expanduser()) if config.resume else None
    state = torch.load(resume_from / "state.pt", weights_only=False) if resume_from else None
    if state is not None and state["fingerprint"] != config.fingerprint():
        changed = [k for k in config.fingerprint() if state["fingerprint"].get(k) != config.fingerprint()[k]]
        raise InvalidInputError(f"--resume {resume_from}: the run used other {', '.join(changed)}; resume with the same options")
    if state is not None and state["step"] >= config.steps:
        raise InvalidInputError(f"--resume {resume_from} is at step {state['step']}; --steps must be larger")

    cuda = torch.cuda.is_available() and (config.device is None or str(config.device).startswith("cuda"))
    precision = ("bf16" if cuda else "no") if config.mixed_precision == "auto" else config.mixed_precision
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    owned = pipe is None
    if owned:
        say(f"Loading {config.model}")
        pipe = load_training_pipeline(config, accelerator.device, weight_dtype)
    if pipe.generation_decoder is None:
        raise InvalidInputError("the pipeline has no generation decoder to train")
    if len(pipe.loras):
        raise InvalidInputError("remove the loaded LoRA adapters before training (pipe.remove_lora())")
    pipe.loras.check_supported()

    say(f"Caching the conditioning and latents of {len(samples)} samples")
    cache = [encode_sample(pipe, sample, config.resolution) for sample in samples]
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(cache):
        buckets.setdefault(item.bucket, []).append(index)

    dit = pipe.generation_decoder.decoder
    grads_before = {name: p.requires_grad for name, p in pipe.generation_decoder.named_parameters()}
    checkpointing = cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    torch.manual_seed(config.seed)  # PEFT draws lora_A with the global generator
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                             init_lora_weights=True, lora_dropout=0.0)
    pipe.generation_decoder.requires_grad_(False)
    try:
        dit.add_adapter(lora_config, adapter_name=TRAINEE)
    except ValueError as exc:
        raise InvalidInputError(f"--targets {','.join(config.target_modules)}: {exc}") from exc
    try:
        trainable = [p for name, p in dit.named_parameters() if "lora_" in name]
        for parameter in trainable:
            parameter.data = parameter.data.float()  # adapters train in float32 under bf16/fp16 weights
            parameter.requires_grad_(True)
        if checkpointing:
            dit.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(config.warmup_steps))
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        rng = torch.Generator().manual_seed(config.seed)
        losses: list[float] = []
        start = 0
        if state is not None:
            set_peft_model_state_dict(dit, _read_adapter_weights(resume_from / "adapter.safetensors"), TRAINEE)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng.set_state(state["rng"])
            losses, start = list(state["losses"]), int(state["step"])
            say(f"Resuming at step {start} from {resume_from}")

        def evaluate() -> float:
            """The loss on every sample (full condition) at fixed noise and timesteps."""
            fixed = torch.Generator().manual_seed(config.eval_seed)
            total = 0.0
            with torch.no_grad(), accelerator.autocast():
                for item in cache:
                    sigma = draw_sigmas(1, fixed, config.flow_shift)
                    noise = torch.randn((1, *item.latents.shape), generator=fixed)
                    total += flow_matching_loss(pipe, [item], [ROW_FULL], sigma, noise).item()
            return total / len(cache)

        def save(folder: Path, step: int) -> Path:
            return _write_adapter(folder, dit, pipe, config, step, get_peft_model_state_dict)

        sample_paths: list[Path] = []
        checkpoints: list[Path] = []
        eval_before = state["eval_before"] if state is not None else evaluate()
        dit.train()
        bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train-lora", unit="step")
        for step in range(start, config.steps):
            batch = _draw_batch(buckets, config.batch_size, rng)
            items = [cache[i] for i in batch]
            rows = [dropout_row(float(torch.rand(1, generator=rng)), config.is_edit) for _ in items]
            sigmas = draw_sigmas(len(items), rng, config.flow_shift)
            noise = torch.randn((len(items), *items[0].latents.shape), generator=rng)
            with accelerator.autocast():
                loss = flow_matching_loss(pipe, items, rows, sigmas, noise)
            accelerator.backward(loss)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                folder = checkpoint_folder(out) / f"step-{done:06d}"
                save(folder / "adapter.safetensors", done)
                torch.save({"step": done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rng": rng.get_state(), "losses": losses, "eval_before": eval_before,
                            "fingerprint": config.fingerprint()}, folder / "state.pt")
                checkpoints.append(folder)
            if config.sample_every and (done % config.sample_every == 0 or done == config.steps):
                sample_paths += _draw_samples(pipe, dit, config, cache, samples, out, done)
        bar.close()
        dit.eval()
        eval_after = evaluate()
        adapter = save(out, config.steps)
        say(f"Wrote {adapter} (loss on the fixed samples: {eval_before:.4f} → {eval_after:.4f})")
        return TrainResult(adapter, losses, eval_before, eval_after, sample_paths, checkpoints)
    finally:
        if checkpointing:
            dit.disable_gradient_checkpointing()
        _remove_trainee(dit)
        for name, parameter in pipe.generation_decoder.named_parameters():
            parameter.requires_grad_(grads_before.get(name, False))
        dit.eval()
        if owned:
            accelerator.free_memory()


def _draw_batch(buckets: dict[tuple[int, int], list[int]], batch_size: int, rng: torch.Generator) -> list[int]:
    """A batch from one bucket, the bucket picked in proportion to its size."""
    groups = list(buckets.values())
    total = sum(len(g) for g in groups)
    pick = int(torch.randint(total, (1,), generator=rng))
    for group in groups:
        if pick < len(group):
            break
        pick -= len(group)
    order = torch.randperm(len(group), generator=rng).tolist()
    chosen = [group[i] for i in order[: min(batch_size, len(group))]]
    while len(chosen) < batch_size:  # a small bucket repeats its samples
        chosen.append(group[int(torch.randint(len(group), (1,), generator=rng))])
    return chosen


def _write_adapter(path: Path, dit, pipe, config: TrainConfig, step: int, get_state) -> Path:
    weights = {f"{adapters.DIT_PREFIX}.{k}": v.float() for k, v in get_state(dit, adapter_name=TRAINEE).items()}
    info = adapters.AdapterInfo(
        rank=config.rank, alpha=config.alpha, target_modules=tuple(config.target_modules),
        architecture=adapters.architecture_signature(pipe), base_model=adapters.base_model_name(pipe),
        trigger_words=tuple(config.trigger_words),
        extra={"steps": str(step), "task": "edit" if config.is_edit else "text-to-image",
               "learning_rate": repr(config.learning_rate), "resolution": str(config.resolution)},
    )
    lora_config = {"r": config.rank, "lora_alpha": config.alpha, "target_modules": list(config.target_modules)}
    return adapters.save_adapter(path, weights, info, {adapters.DIT_PREFIX: lora_config})


def _read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = adapters.read_adapter(path)
    prefix = adapters.DIT_PREFIX + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _remove_trainee(dit) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if TRAINEE in getattr(dit, "peft_config", {}):
        dit.delete_adapters(TRAINEE)
    if not getattr(dit, "peft_config", None):
        adapters._replace_wrapped(dit, BaseTunerLayer)
        dit._hf_peft_config_loaded = False
        if hasattr(dit, "peft_config"):
            del dit.peft_config


def _draw_samples(pipe, dit, config: TrainConfig, cache, samples, out: Path, step: int) -> list[Path]:
    """Images from the fixed sample prompts and seeds with the adapter as trained so far."""
    folder = samples_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = list(config.sample_prompts) or [s.prompt for s in samples[:2]]
    width, height = cache[0].bucket
    paths = []
    was_training = dit.training
    dit.eval()
    try:
        for index, prompt in enumerate(prompts):
            seed = config.sample_seed + index
            if config.is_edit:  # edits: the fixed prompts applied to the first samples' sources, in turn
                with Image.open(samples[index % len(samples)].source) as source:
                    image = pipe.edit(source.convert("RGB"), prompt, steps=config.sample_steps, seed=seed)[0]
            else:
                image = pipe.generate(prompt, width=width, height=height, steps=config.sample_steps, seed=seed)[0]
            path = folder / f"step-{step:06d}-{index}.png"
            image.save(path)
            paths.append(path)
    finally:
        dit.train(was_training)
    return paths


def write_loss_log(result: TrainResult, path: Path) -> None:
    """The per-step losses and the before/after evaluation as JSON (the CLI writes it next to the adapter)."""
    path.write_text(json.dumps({"losses": result.losses, "eval_loss_before": result.eval_loss_before,
                                "eval_loss_after": result.eval_loss_after}, indent=1))

