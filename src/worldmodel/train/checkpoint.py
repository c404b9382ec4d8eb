"""Checkpoints: one file with everything a run needs to continue, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
its final name, so a kill at any moment leaves either the old file or the new one. `last.pt` is a
hard link to the newest `step_XXXXXXXX.pt`; the last `keep_last` step files are kept. Loading uses
`weights_only=True`: a file that needs pickled code is refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, or of another model or shape."""


def rng_state() -> dict[str, Any]:
    """Every random generator the run uses, in types `weights_only` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, fsync, rename. On failure the previous file stays intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch.save can turn an OSError (a full disk) into a RuntimeError of its zip writer.
        cause = _os_error(e)
        if cause is not None:
            kept = f"the previous {path.name} is intact" if path.exists() else "none was written"
            raise CheckpointError(f"could not write checkpoint {path}: {cause}; {kept}") from e
        raise
    _fsync_dir(path.parent)


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind an exception, following its chain of causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (`weights_only=True`), with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise CheckpointError(
                f"{path} is unreadable (truncated or not a checkpoint): {e}"
            ) from e
        raise CheckpointError(
            f"{path} needs pickled code to load and is refused (weights_only=True): {e}"
        ) from e
    except Exception as e:  # truncated or not a torch file at all
        raise CheckpointError(f"{path} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a worldmodel checkpoint (no 'model' entry)")
    return obj


class CheckpointManager:
    """Writes step checkpoints into a run's `checkpoints/` folder and finds the newest good one."""

    def __init__(self, folder: str | Path, keep_last: int = 3) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, int(keep_last))

    def step_files(self) -> list[Path]:
        return sorted(self.folder.glob("step_*.pt"))

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.folder / f"step_{step:08d}.pt"
        try:
            atomic_save({"format": FORMAT_VERSION, **state}, path)
        except CheckpointError as e:
            last = self.folder / LAST
            if last.exists():
                raise CheckpointError(f"{e}; the previous {last} is intact") from e
            raise
        tmp_link = self.folder / f".{LAST}.tmp-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        try:
            os.link(path, tmp_link)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp_link)
        os.replace(tmp_link, self.folder / LAST)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint; a corrupt `last.pt` falls back with a warning."""
        candidates = [self.folder / LAST, *reversed(self.step_files())]
        for path in candidates:
            if not path.exists():
                continue
            try:
                return load(path)
            except CheckpointError as e:
                log.warning("skipping unusable checkpoint: %s", e)
        return None


def check_compatible(state: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Refuse a checkpoint of another model or shape, naming what differs."""
    theirs = state["model"]
    ours = model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [
        f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(v.shape)}"
        for k, v in ours.items()
        if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    stored = (state.get("config") or {}).get("model", {})
    lines = [f"checkpoint {source} does not fit this model"]
    if stored.get("_target_"):
        lines.append(f"checkpoint model: {stored.get('_target_')}")
    if missing:
        lines.append(
            f"missing in checkpoint: {', '.join(missing[:5])}{' ...' * (len(missing) > 5)}"
        )
    if unexpected:
        extra = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        lines.append(f"not in model: {extra}")
    lines.extend(shapes[:5])
    raise CheckpointError("\n  ".join(lines))
