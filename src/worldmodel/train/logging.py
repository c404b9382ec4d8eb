"""Run logging: `metrics.jsonl` always, W&B when configured, stdlib logging on rank 0 only.

W&B is optional in the strong sense: if it cannot start or fails later (a folder it cannot write,
an unreachable service in online mode), training goes on with `metrics.jsonl` and a warning.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

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
