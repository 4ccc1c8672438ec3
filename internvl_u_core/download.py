"""Finding a checkpoint folder or fetching it from the Hugging Face hub; ``internvl-u download``.

Into the Hugging Face cache (where ``--model InternVL-U/InternVL-U`` finds it) or, with
``--local-dir``, into a folder to pass as ``--model`` or to put in ComfyUI's ``models/`` folder.
Only the files the pipeline reads are fetched (configs, processor, safetensors; never pickles).
Imports nothing heavy (no torch), so the command answers at once, also when the hub is unreachable.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointNotDownloaded, ModelLoadError
from .options import DEFAULT_HUB_ID

COMPONENTS = ("vlm", "generation_decoder", "vae", "scheduler", "processor")
#: The official code repository; people pass it by mistake, it holds no weights.
CODE_REPOSITORY_ID = "OpenGVLab/InternVL-U"

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "*/*.safetensors.index.json",
    "scheduler/scheduler_config.json",
    "processor/*.json",
    "processor/*.txt",
    "processor/*.jinja",
    "processor/*.model",
]


def download_checkpoint(
    hub_id: str,
    *,
    local_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fetch the files the pipeline reads (configs, processor, safetensors; never pickles) of a hub checkpoint.

    Into the Hugging Face cache, or into ``local_dir`` (the ComfyUI model folder). With
    ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) only an earlier download is used.
    """
    if hub_id.lower() == CODE_REPOSITORY_ID.lower():
        raise ModelLoadError(
            f"{hub_id!r} is the GitHub code repository, not the weights; the released model is "
            f"{DEFAULT_HUB_ID!r} on the Hugging Face hub"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelLoadError("downloading from the hub needs the huggingface_hub package") from exc
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false")
    if progress:
        progress(f"Fetching {hub_id} from the Hugging Face hub" + (" cache" if offline else ""))
    try:
        folder = snapshot_download(
            hub_id,
            revision=revision,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
            local_dir=None if local_dir is None else os.fspath(local_dir),
        )
    except Exception as exc:  # the hub raises many unrelated types; all mean "not available"
        if offline:
            raise CheckpointNotDownloaded(hub_id) from exc
        raise ModelLoadError(_download_problem(hub_id, revision, exc)) from exc
    return Path(folder)


def _download_problem(hub_id: str, revision: str | None, exc: Exception) -> str:
    """Why a download failed, in words a user can act on (the hub's own messages are long and generic)."""
    from huggingface_hub import constants, errors

    if isinstance(exc, errors.GatedRepoError):
        return (f"{hub_id!r} is gated on the Hugging Face hub: accept its terms on https://huggingface.co/{hub_id} "
                "and log in with `hf auth login`")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"there is no model {hub_id!r} on the Hugging Face hub (or it is private: `hf auth login`); "
                f"the released model is {DEFAULT_HUB_ID!r}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{hub_id!r} has no revision {revision!r} on the Hugging Face hub; leave --revision out for the latest"
    if isinstance(exc, errors.LocalEntryNotFoundError):  # the hub did not answer and nothing is cached
        return (f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to download {hub_id!r}: check your "
                "network or proxy (HF_ENDPOINT names a mirror), then run again; files already fetched are kept")
    return (f"could not download {hub_id!r} from the Hugging Face hub: check the id, your network and, for "
            f"gated repos, `hf auth login` ({type(exc).__name__}: {exc})")



def resolve_checkpoint(
    path_or_id: str | os.PathLike,
    *,
    local_files_only: bool = False,
    revision: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the local root folder of a checkpoint, downloading a hub id only when asked to."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise ModelLoadError(
            f"model must be a folder path or a Hugging Face hub id, got {type(path_or_id).__name__}"
        )
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the checkpoint folder that holds model_index.json")
    if not HUB_ID_PATTERN.match(text) or text.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model folder {text!r} does not exist and is not a hub id of the form 'owner/name' "
            f"(the released model is {DEFAULT_HUB_ID!r})"
        )
    return download_checkpoint(text, revision=revision, local_files_only=local_files_only, progress=progress)


def component_folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ModelLoadError(
            f"checkpoint {root} has no '{name}/' folder; a released InternVL-U checkpoint has "
            f"{', '.join(c + '/' for c in COMPONENTS)} and model_index.json"
        )
    return folder


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``download`` subcommand (imports nothing heavy: it runs on every ``internvl-u`` call)."""
    parser = subparsers.add_parser(
        "download",
        help="fetch the released weights (or another hub checkpoint) into the cache or a folder",
        description="Download a checkpoint in the released layout from the Hugging Face hub, with a progress bar "
                    "per file. A second run fetches only what is missing.",
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_HUB_ID,
                        help=f"hub id of the checkpoint (default: {DEFAULT_HUB_ID}, the released weights)")
    parser.add_argument("--local-dir", default=None, metavar="FOLDER",
                        help="download into this folder (pass it as --model later, or use ComfyUI's "
                             "models/internvl_u/<name>) instead of the Hugging Face cache")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: the latest)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .errors import InvalidInputError

    if not HUB_ID_PATTERN.match(args.model):
        raise InvalidInputError(
            f"{args.model!r} is not a hub id of the form 'owner/name'; the released model is {DEFAULT_HUB_ID!r}"
        )
    problem = _hub_unreachable()
    if problem:
        raise InvalidInputError(problem)
    folder = download_checkpoint(
        args.model, local_dir=args.local_dir, revision=args.revision,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    model = args.model if args.local_dir is None else str(folder)
    print(f'downloaded to {folder}\nnext: internvl-u generate "a red fox in fresh snow" --model {model}',
          file=sys.stderr)
    print(folder)
    return 0


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, found with one request (the hub client retries for many seconds)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading; unset it to download"
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as exc:  # no HTTP answer at all: DNS, refused, timeout, proxy (httpx or requests types)
        return (f"cannot reach the Hugging Face hub ({constants.ENDPOINT}): check your network or proxy "
                f"(HF_ENDPOINT names a mirror), then run again ({type(exc).__name__})")
    return None
