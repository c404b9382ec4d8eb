"""Run logging: `metrics.jsonl` always, W&B when configured, stdlib logging on rank 0 only, and
the progress bar.

W&B is optional in the strong sense: if it cannot start or fails later (a folder it cannot write,
an unreachable service in online mode), training goes on with `metrics.jsonl` and a warning.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR


def setup_logging(rank: int) -> None:
    """Only rank 0 speaks below ERROR, so N processes do not print N copies."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    for handler in root.handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, _RankZeroFilter)]
        handler.addFilter(_RankZeroFilter(rank))
    root.setLevel(logging.INFO)


def _scalar(v: Any) -> float | int:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item()
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


class MetricsLogger:
    """One JSON object per line (`step` plus namespaced keys), mirrored to W&B."""

    def __init__(
        self,
        run_dir: str | Path,
        logger_cfg: dict[str, Any] | None,
        config: dict[str, Any],
        resume_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        # A resumed run rewrites what the killed one logged after its last checkpoint.
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self.log_media = bool((logger_cfg or {}).get("log_media", False))
        self.wandb = None
        if logger_cfg and logger_cfg.get("name") == "wandb":
            self.wandb = self._start_wandb(logger_cfg, config)

    def _start_wandb(self, cfg: dict[str, Any], config: dict[str, Any]) -> Any:
        try:
            import wandb

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            return wandb.init(
                project=cfg.get("project", "worldmodel"),
                entity=cfg.get("entity"),
                mode=cfg.get("mode", "offline"),
                dir=str(self.run_dir),
                id=run_id,
                resume="allow",
                config=config,
                tags=list(cfg.get("tags") or []),
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # any failure of W&B must not stop training
            log.warning("W&B disabled, logging to metrics.jsonl only: %s: %s", type(e).__name__, e)
            return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))
            except Exception as e:
                log.warning("W&B log failed, continuing without it: %s", e)
                self.wandb = None

    def log_files(self, step: int, images: dict[str, Path], videos: dict[str, Path]) -> None:
        """Pictures for W&B (the files themselves stay in the run dir)."""
        if self.wandb is None or not self.log_media:
            return
        try:
            import wandb

            media = {k: wandb.Image(str(p)) for k, p in images.items()}
            media.update({k: wandb.Video(str(p), format=p.suffix[1:]) for k, p in videos.items()})
            self.wandb.log(media, step=int(step))
        except Exception as e:
            log.warning("W&B media log failed, continuing: %s", e)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                log.warning("W&B finish failed: %s", e)


class _AboveBar:
    """A console stream whose writes go through `tqdm.write`: the bar is cleared, the text
    printed, the bar drawn again below it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def logs_above_bar() -> Iterator[None]:
    """While it is open, console log handlers (stdout, stderr) print above the progress bar
    instead of through it; their format, level and filters stay as they are."""
    swapped = []
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
            swapped.append((handler, handler.setStream(_AboveBar(handler.stream))))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


def _clock(seconds: float) -> str:
    return tqdm.format_interval(max(0.0, seconds))


class ProgressBar:
    """The run's bar: steps toward `max_steps`, or, under a wall-time budget, toward the step the
    budget is expected to end at (`max_steps` if that comes first), estimated from this
    process's rate; so the total and the ETA follow whichever ends the run.

    `desc` names the run ("stage 2/3 lam: train lam" in a pipeline). Log records go above the
    bar while it is open (`logs_above_bar`).
    """

    def __init__(
        self,
        enabled: bool,
        desc: str,
        max_steps: int,
        step: int,
        budget_s: float | None = None,
    ) -> None:
        self.max_steps = max_steps
        self.budget_s = budget_s
        self.first: tuple[int, float] | None = None  # (step, elapsed) when this process began
        self.loss: float | None = None  # the last logged loss
        self.bar = tqdm(
            total=max_steps,
            initial=step,
            disable=not enabled,
            desc=desc,
            dynamic_ncols=True,
            mininterval=2.0,
            smoothing=0.1,
        )
        self._open = ExitStack()
        if enabled:
            self._open.enter_context(logs_above_bar())

    def start(self, step: int, elapsed_s: float) -> None:
        """Mark where this process's steps begin (after setup and a first validation)."""
        self.first = (step, elapsed_s)

    def update(self, step: int, elapsed_s: float, loss: float | None = None) -> None:
        if self.budget_s is not None and self.first is not None:
            done, spent = step - self.first[0], elapsed_s - self.first[1]
            if done > 0 and spent > 0:
                expected = step + (self.budget_s - elapsed_s) * done / spent
                self.bar.total = max(step, min(self.max_steps, round(expected)))
        if loss is not None:
            self.loss = loss
        postfix = {} if self.loss is None else {"loss": f"{self.loss:.4f}"}
        if self.budget_s is not None:
            postfix["time"] = f"{_clock(elapsed_s)}/{_clock(self.budget_s)}"
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self, step: int) -> None:
        """The run ended at `step`: a budget that ended it first makes that the total."""
        if self.budget_s is not None and step < self.max_steps:
            self.bar.total = step
            self.bar.refresh()
        self.bar.close()
        self._open.close()
