"""Run logging: `metrics.jsonl` always, W&B when configured, stdlib logging on rank 0 only (also
into the run folder's `run.log`), and the progress bar.

W&B is optional in the strong sense: if it cannot start or fails later (a folder it cannot write,
an unreachable service in online mode), training goes on with `metrics.jsonl` and a warning.

Every W&B run is named and filed (`wandb_identity`): a pipeline's stages are `<recipe>/<stage>`
runs grouped by the pipeline's run folder, a sweep's runs are grouped by the sweep folder, and
`job_type` says what the run did (the stage, the model trained, or `eval`). An evaluation goes to
an eval run of its own in the same group (`log_eval`): its summary holds eval.json's numbers and
its media panels the pictures eval rendered. (An eval run of its own rather than the training run
resumed: offline runs cannot be resumed, two offline runs with one id are synced as two
uploads of which the second replaces the first.)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
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


# Hydra's own format for `run.log` (its default job logging).
_FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@contextmanager
def run_log(rank: int, path: str | Path) -> Iterator[None]:
    """While open, rank 0's log records are appended to `path` (the run folder's `run.log`)
    unless a handler already writes there.

    Hydra opens `run.log` in the process it starts. Processes started by `dist.launch` (DDP
    without torchrun) are fresh interpreters: Hydra's handler lives in the parent, which only
    waits, so without this the file stays empty under DDP. The handler is removed on exit, so a
    caller that trains several runs in one process (tests, a pipeline) does not keep writing into
    an old run's file.
    """
    path = Path(path).resolve()
    root = logging.getLogger()
    present = any(
        isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == path
        for h in root.handlers
    )
    handler = None
    if rank == 0 and not present:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()


# ------------------------------------------------------------------------------ W&B run identity


def _folder_id(path: str | Path, parts: int) -> str:
    """The last `parts` components of a folder, e.g. `2026-11-29/15-02-11_demo`."""
    return "/".join(Path(path).parts[-parts:])


def sweep_group() -> str | None:
    """The sweep folder (`<date>/<time>`) when Hydra runs a multirun, else None."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return _folder_id(hydra.sweep.dir, 2)


def name_wandb_run(cfg: DictConfig) -> None:
    """In a sweep, file the run under the sweep: `logger.group` = the sweep folder, and
    `logger.run_name` = `<name>/<job number>` unless set. Read here, where the task starts:
    Hydra's context is gone in the processes that train."""
    group = sweep_group()
    if cfg.get("logger") is None or group is None:
        return
    with open_dict(cfg):
        if not cfg.logger.get("group"):
            cfg.logger.group = group
        if not cfg.logger.get("run_name"):
            cfg.logger.run_name = f"{cfg.get('name') or 'run'}/{HydraConfig.get().job.num}"


def name_stage_run(stage_cfg: DictConfig, recipe_cfg: DictConfig, stage: str) -> None:
    """A pipeline stage's W&B run: `<recipe>/<stage>`, grouped by the pipeline's run folder
    (inside a sweep: `<sweep>/<run>`), `job_type` = the stage, tagged with the recipe."""
    recipe = str(recipe_cfg.get("name") or "pipeline")
    run_dir = Path(recipe_cfg.run_dir)
    sweep = (recipe_cfg.get("logger") or {}).get("group") or sweep_group()
    tags = [str(t) for t in (stage_cfg.logger.get("tags") or [])]
    with open_dict(stage_cfg):
        stage_cfg.logger.run_name = f"{recipe}/{stage}"
        stage_cfg.logger.group = f"{sweep}/{run_dir.name}" if sweep else _folder_id(run_dir, 2)
        stage_cfg.logger.job_type = stage
        stage_cfg.logger.tags = [*tags, recipe, "pipeline"]


def wandb_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """`name`, `group`, `job_type` and `tags` of a run's W&B run, from its (resolved) config.

    `logger.run_name` / `logger.group` / `logger.job_type` when set (a pipeline sets them per
    stage); otherwise the run's `name`, no group (a sweep's group is filled in by
    `name_wandb_run`), and `eval` for `task=eval` or the model's name for training. Tags: the
    configured ones, the run's name, the model and the game, without repeats.
    """
    logger = config.get("logger") or {}
    model = str((config.get("model") or {}).get("name") or "model")
    name = str(logger.get("run_name") or config.get("name") or model)
    job_type = logger.get("job_type") or ("eval" if config.get("task") == "eval" else model)
    data = config.get("data") or {}
    game = data.get("env_name") or data.get("game")
    tags = [*(logger.get("tags") or []), config.get("name"), model, game]
    unique = list(dict.fromkeys(str(t)[:64] for t in tags if t))  # W&B tags: <= 64 characters
    return {"name": name, "group": logger.get("group"), "job_type": str(job_type), "tags": unique}


def _init_wandb(
    cfg: Mapping[str, Any], config: Mapping[str, Any], run_dir: Path, run_id: str, **identity: Any
) -> Any:
    import wandb

    return wandb.init(
        project=cfg.get("project", "worldmodel"),
        entity=cfg.get("entity"),
        mode=cfg.get("mode", "offline"),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=dict(config),
        settings=wandb.Settings(silent=True, console="off"),
        **identity,
    )


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts and lists as one level of `a/b/0` keys (list positions count from 0): the
    numbers (and strings) of eval.json as W&B summary entries."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, list | tuple):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}/{i}"))
        return out
    if value is None or isinstance(value, bool | int | float | str):
        return {prefix: value}
    return {}


def media_panels(media: Mapping[str, str | Path], root: Path) -> dict[str, Path]:
    """eval.json's media (paths relative to `root`) as `eval/media/<kind>` panels: PNGs as
    images, an MP4 as a video, a GIF only where no MP4 of the same clip exists."""
    paths = {str(k): root / v for k, v in media.items() if (root / v).is_file()}
    panels = {}
    for key, path in paths.items():
        base = key.removesuffix("_gif").removesuffix("_mp4")
        if path.suffix == ".gif" and f"{base}_mp4" in paths:
            continue
        panels[f"eval/media/{base}"] = path
    return panels


def _wandb_media(panels: Mapping[str, Path]) -> dict[str, Any]:
    import wandb

    return {
        k: wandb.Video(str(p), format=p.suffix[1:])
        if p.suffix in (".gif", ".mp4")
        else wandb.Image(str(p))
        for k, p in panels.items()
    }


def _trained_by(checkpoint: str | None) -> str | None:
    """The W&B id of the training run that wrote a checkpoint (`<run>/checkpoints/last.pt`, or
    a run folder), None when it had none."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "wandb_id.txt").is_file():
            return (folder / "wandb_id.txt").read_text().strip()
    return None


def log_eval(
    cfg: DictConfig | Mapping[str, Any], result: Mapping[str, Any], run_dir: str | Path
) -> None:
    """An evaluation's W&B run: eval.json's numbers (flattened, `eval/...`) in its summary, its
    pictures (reconstruction and next-frame grids, rollout videos real | generated, PSNR and
    ΔtPSNR plots, the LAM's confusion matrix) as media at the checkpoint's step.

    After training (`eval.after_train`, every pipeline stage) the eval run is `<training
    run>/eval` in the training run's group, `job_type=eval`; `task=eval` is a run of its own
    (`job_type=eval`). Either way its config names the training run that wrote the checkpoint
    (`train_wandb_id`) when that run had one. Nothing happens unless `logger.name=wandb`; a
    failure is a warning.
    """
    if (cfg.get("logger") or {}).get("name") != "wandb":
        return
    run_dir = Path(run_dir)
    try:
        config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        logger_cfg = config["logger"]
        identity = wandb_identity(config)
        if identity["job_type"] != "eval":  # evaluation of what this run folder trained
            identity["name"] = f"{identity['name']}/eval"
            identity["job_type"] = "eval"
        extra: dict[str, Any] = {}
        trained_by = _trained_by(result.get("checkpoint"))
        if trained_by is not None:
            extra["train_wandb_id"] = trained_by
        run_id = uuid.uuid4().hex[:12]
        (run_dir / "wandb_eval_id.txt").write_text(run_id)
        run = _init_wandb(logger_cfg, {**config, **extra}, run_dir, run_id, **identity)
        try:
            summary = flatten(dict(result.get("metrics") or {}), "eval")
            for key in ("model", "kind", "split", "num_clips", "step", "checkpoint"):
                if key in result:
                    summary[f"eval/{key}"] = result[key]
            summary.update(flatten(dict(result.get("data") or {}), "eval/data"))
            step = int(result.get("step") or 0)
            if logger_cfg.get("log_media", True):
                run.log(_wandb_media(media_panels(result.get("media") or {}, run_dir)), step=step)
            run.summary.update(summary)
        finally:
            run.finish()
    except Exception as e:  # W&B must never cost the evaluation its result
        log.warning("W&B eval logging failed (eval.json is written): %s: %s", type(e).__name__, e)


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
            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            return _init_wandb(cfg, config, self.run_dir, run_id, **wandb_identity(config))
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
            self.wandb.log(_wandb_media({**images, **videos}), step=int(step))
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
