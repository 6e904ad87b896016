"""Checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, written atomically.

They load with ``torch.load(path, weights_only=True)`` and nothing else: no code runs from a file,
and no safe globals need registering. A write goes to a temporary file in the same folder, is
fsynced, then renamed over the old file, so a crash or a full disk leaves the previous checkpoint
whole.
"""

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from imaml_cli.engine.file_mode import as_if_created
from imaml_cli.errors import UserError

FORMAT = "imaml-checkpoint-v1"
# A full checkpoint also holds "optimizer" and "rng" (exact resume); a parameters-only one (the
# pretrained/ files) holds just these, enough to evaluate or to fine-tune from.
REQUIRED = ("format", "step", "params", "config")


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_if_created(fd)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"could not write checkpoint {path}: {error.strerror or error}; "
                            f"the previous checkpoint there is unchanged; free space or fix the folder") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


READ_ADVICE = "pass a checkpoints/last.pt or best.pt written by imaml-train"


def load_checkpoint(path: Path, map_location="cpu", advice: str = READ_ADVICE) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; anything else is a UserError ending in ``advice``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file in a run's checkpoints/ folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise UserError(f"{path} cannot be read as a checkpoint: {_why_unreadable(path, error)}; {advice}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in REQUIRED):
        raise UserError(f"{path} is not an imaml checkpoint (no '{FORMAT}' record); {advice}")
    return state


def _why_unreadable(path: Path, error: Exception) -> str:
    """What torch's error means for a user, in a few words (its own messages run to paragraphs)."""
    if isinstance(error, EOFError) or "zip archive" in str(error) or "central directory" in str(error):
        return "it is truncated or damaged (a copy cut short, or a write that never finished)"
    if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):
        return "it holds objects other than tensors and plain values, and imaml runs no code from a file"
    return f"it is not a file that torch.save wrote ({type(error).__name__})"


def load_params(network: torch.nn.Module, state: dict, path) -> None:
    """Copy a checkpoint's parameters into ``network``; a network of another shape is a UserError."""
    params = dict(network.named_parameters())
    stored = state["params"]
    if set(stored) != set(params) or any(stored[k].shape != params[k].shape for k in params):
        raise UserError(f"checkpoint {path} holds parameters of another network shape; "
                        "use it with the dataset.ways and model it was trained with")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(stored[k])
