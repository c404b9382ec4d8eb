"""The one training loop, for every model: `model.loss(batch) -> (loss, metrics)`.

Read it top to bottom: `setup` builds the model, the data, the optimizers, the LR schedule and
the EMA weights and resumes from `last.pt`; `train_step` takes one optimizer step; `validate`
scores the fixed validation batches; `save` writes a checkpoint; `_train` is the loop that calls
them. DDP, autocast (bf16 with fp32 weights) and `torch.compile` live here and nowhere else;
FSDP (`trainer.strategy=fsdp`) and activation checkpointing are applied in `setup` from
train/parallel.py. A model with a `discriminator` (a GAN) gets a second optimizer for it,
stepped after the generator.

Every rank runs every forward, validations included: EMA codebooks all-reduce their statistics
(models/quantize.py), so all ranks must make the same quantizer calls. Rank 0 logs and saves.
"""

from __future__ import annotations

import inspect
import logging
import math
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset

from worldmodel.build import build_model
from worldmodel.config import optim_settings
from worldmodel.data.dataset import val_subset
from worldmodel.media import save_grid
from worldmodel.models.interfaces import LatentActions, Tokenizer
from worldmodel.pipeline import build_datasets
from worldmodel.runtime import autocast, set_threads
from worldmodel.train import checkpoint as ckpt
from worldmodel.train import dist, parallel
from worldmodel.train.logging import MetricsLogger, ProgressBar, run_log, setup_logging
from worldmodel.train.optim import EMA, LRSchedule, adamw
from worldmodel.train.sampler import ResumableSampler
from worldmodel.train.sampler import position as data_position

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Train `cfg.model` on `cfg.data`; returns the last validation loss (for sweeps)."""
    # Resolve once here: spawned processes have no Hydra context to resolve `${hydra:...}`.
    plain = OmegaConf.to_container(cfg, resolve=True)
    return dist.launch(_worker, int(cfg.trainer.devices), plain)


def _worker(env: dist.DistEnv, plain: dict[str, Any]) -> float | None:
    cfg = OmegaConf.create(plain)
    tr = cfg.trainer
    setup_logging(env.rank)
    # trainer.threads null: this process's share of the CPUs, split among the ranks on this machine
    set_threads(tr.threads, env.local_world_size)
    device = dist.init_process_group(env, tr.backend, tr.accelerator)
    try:
        with run_log(env.rank, Path(cfg.run_dir) / "run.log"):  # spawned ranks lack Hydra's
            return _train(cfg, env, device)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- setup


class Clock:
    """Wall time of a run across resumes: what the processes before this one stored, plus this
    one's since it started."""

    def __init__(self) -> None:
        self.before = 0.0
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.start


@dataclass
class Run:
    """What a run carries from step to step; a checkpoint stores all of it."""

    cfg: DictConfig
    model: nn.Module
    train_ds: Dataset
    val_ds: Dataset
    gen_params: list[nn.Parameter]  # everything but the discriminator
    opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    peak_lr: float
    schedule: LRSchedule
    ema: EMA | None
    clock: Clock
    step: int = 0  # optimizer steps taken
    batches: int = 0  # global batches consumed; a skipped step consumes its batch too
    nonfinite_total: int = 0
    sharded: bool = False  # FSDP (trainer.strategy=fsdp): parameters are DTensor shards

    def set_lr(self, factor: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.peak_lr * factor


def setup(
    cfg: DictConfig,
    device: torch.device,
    manager: ckpt.CheckpointManager,
    env: dist.DistEnv | None = None,
) -> Run:
    """Model, data, optimizers, LR schedule and EMA, resumed from the newest checkpoint of
    `manager` when there is one, else with weights from `cfg.checkpoint` when given. Under
    `trainer.strategy=fsdp` (several processes) the model is sharded before the optimizers are
    built, and the EMA weights are sharded like it."""
    tr = cfg.trainer
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)  # every rank the same weights: the seed is shared
    if tr.get("activation_checkpointing"):
        n = parallel.checkpoint_activations(model)
        log.info("activation checkpointing on %d transformer blocks", n)
    sharded = env is not None and env.distributed and tr.get("strategy", "ddp") == "fsdp"
    if sharded:
        # built in host memory; each unit goes to the device as it is sharded, so no device
        # ever holds the whole model
        n = parallel.shard(model, device, bf16=tr.precision == "bf16")
        log.info("FSDP over %d ranks: %d transformer blocks and the root", env.world_size, n)
    model = model.to(device)  # FSDP: what it leaves whole (a GAN's discriminator)
    train_ds, val_ds = build_datasets(cfg, device)
    clock = Clock()  # the budget counts from here: recording data the first time is not training
    disc = getattr(model, "discriminator", None)
    disc_ids = {id(p) for p in disc.parameters()} if disc is not None else set()
    gen = [(n, p) for n, p in model.named_parameters() if id(p) not in disc_ids]
    hp = optim_settings(cfg)
    opt = adamw(gen, hp["lr"], hp["weight_decay"], hp["betas"])
    disc_opt = None
    if disc is not None:
        disc_opt = adamw(disc.named_parameters(), hp["lr"], 0.0, hp["betas"])
    schedule = LRSchedule(
        hp["warmup_steps"],
        int(tr.max_steps),
        tr.lr_schedule,
        float(tr.min_lr_ratio),
        budget_s=float(tr.max_minutes) * 60 if tr.max_minutes else None,
    )
    run = Run(
        cfg=cfg,
        model=model,
        train_ds=train_ds,
        val_ds=val_ds,
        gen_params=[p for _, p in gen],
        opt=opt,
        disc_opt=disc_opt,
        peak_lr=hp["lr"],
        schedule=schedule,
        ema=EMA(model, tr.ema_decay) if tr.ema_decay else None,
        clock=clock,
        sharded=sharded,
    )
    run.set_lr(schedule.factor)

    state = manager.latest()
    if state is not None:
        ckpt.check_compatible(state, model, str(manager.folder))
        parallel.load_model_state(model, state["model"], sharded)
        # with the learning rate of the next step
        parallel.load_optimizer_state(model, opt, state["optimizer"], sharded)
        schedule.load_state_dict(state["scheduler"])
        if disc_opt is not None and state.get("disc_optimizer"):
            disc_opt.load_state_dict(state["disc_optimizer"])
        if run.ema is not None and state.get("ema"):
            ema = state["ema"]
            run.ema.load_state_dict(parallel.shard_like(ema, run.ema.shadow) if sharded else ema)
        run.step = int(state["step"])
        # checkpoints from before batches were counted: one batch per step
        run.batches = int(state.get("data_position", {}).get("batches", run.step))
        run.nonfinite_total = int(state.get("nonfinite_total", 0))
        clock.before = float(state.get("elapsed_s", 0.0))
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", manager.folder / ckpt.LAST, run.step)
    elif cfg.get("checkpoint"):
        init = ckpt.load(cfg.checkpoint)
        ckpt.check_compatible(init, model, str(cfg.checkpoint))
        parallel.load_model_state(model, init["model"], sharded)
        log.info("initialized weights from %s", cfg.checkpoint)
    return run


def train_batches(run: Run, env: dist.DistEnv, device: torch.device) -> Iterator[dict]:
    """This rank's micro-batches, from global batch `run.batches` on (see `ResumableSampler`)."""
    tr = run.cfg.trainer
    dataset, sampler = run.train_ds, None
    args = (int(tr.batch_size), int(tr.grad_accum), env.rank, env.world_size, int(run.cfg.seed))
    if isinstance(dataset, IterableDataset):  # a stream places itself (data/stream.py)
        dataset = dataset.placed(run.batches, *args, num_workers=int(tr.num_workers))
    else:
        sampler = ResumableSampler(len(dataset), *args, start_batch=run.batches)
    loader = DataLoader(
        dataset,
        batch_size=int(tr.micro_batch),
        sampler=sampler,
        num_workers=int(tr.num_workers),
        persistent_workers=tr.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(int(run.cfg.seed)),
    )
    # the loader has its own generator: the global RNG stream stays the model's
    return ({k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in loader)


class LossModule(nn.Module):
    """Routes `forward` to `model.loss` so DDP's gradient hooks see the call (FSDP's see it
    through `parallel.shard`'s registration of `loss`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.takes_step = "step" in inspect.signature(model.loss).parameters

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        return self.model.loss(batch, step=step) if self.takes_step else self.model.loss(batch)


def wrap(
    model: nn.Module, env: dist.DistEnv, compile: bool = False, sharded: bool = False
) -> nn.Module:
    """`model.loss` as a module, under DDP when there are several processes and the model is not
    `sharded` (FSDP: `parallel.shard` already made it distributed), compiled on request.

    DDP leaves buffers alone (`broadcast_buffers=False`): broadcasting rank 0's at every forward
    would overwrite the EMA codebooks the other ranks just updated. The codebooks all-reduce their
    statistics instead (models/quantize.py), so every rank computes the same buffers. A GAN's
    discriminator is left out of DDP: its loss runs outside the wrapped forward, and the loop
    averages its gradients itself. FSDP leaves buffers alone too.
    """
    wrapped: nn.Module = LossModule(model)
    if env.distributed and not sharded:
        disc = getattr(model, "discriminator", None)
        if disc is not None:
            ids = {id(p) for p in disc.parameters()}
            ignored = [f"model.{n}" for n, p in model.named_parameters() if id(p) in ids]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapped, ignored)
        wrapped = DistributedDataParallel(
            wrapped, broadcast_buffers=False, find_unused_parameters=disc is not None
        )
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


# ------------------------------------------------------------------------------- one train step


def train_step(
    run: Run, wrapped: nn.Module, batches: Iterator[dict], env: dist.DistEnv, device: torch.device
) -> dict[str, float] | None:
    """One optimizer step over `trainer.grad_accum` micro-batches: forward under autocast,
    backward outside it, clip, step, the discriminator's step, EMA.

    A non-finite loss or gradient norm on any rank skips the step: no update, `run.step` stays,
    but the batch is consumed (`run.batches`). Returns this rank's metrics, None when skipped.
    """
    tr = run.cfg.trainer
    accum = int(tr.grad_accum)
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    frames = 0
    for micro in range(accum):
        batch = next(batches)
        # DDP: gradients all-reduce on the last micro-batch only. FSDP reduce-scatters after
        # each one, so only sharded gradients are ever kept (memory over traffic).
        local = env.distributed and not run.sharded and micro < accum - 1
        with wrapped.no_sync() if local else nullcontext():
            with autocast(device, tr.precision == "bf16"):
                loss, metrics = wrapped(batch, run.step)
            (loss / accum).backward()
        for k, v in {"loss": loss.detach(), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
        frames += _frames(batch)
    run.batches += 1

    # DDP averaged the gradients, so the norm is the same on every rank; the loss is not.
    # Under FSDP the norm is over every rank's shards (a DTensor, `norm` is its full value).
    clip_norm, norm = parallel.grad_norm(run.gen_params)
    if dist.any_rank(not (math.isfinite(sums["loss"]) and math.isfinite(norm)), device):
        run.opt.zero_grad(set_to_none=True)
        return None
    if tr.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(run.gen_params, float(tr.grad_clip), clip_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.disc_opt is not None:
        sums.update(_discriminator_step(run, batch, env, device))
    if run.ema is not None:
        run.ema.update(run.model)

    dt = time.perf_counter() - t0
    sums.update(lr=run.opt.param_groups[0]["lr"], grad_norm=float(norm), step_s=dt)
    sums["frames_per_s"] = frames / dt
    run.step += 1
    run.set_lr(run.schedule.update(run.step, run.clock.elapsed()))
    return sums


def _discriminator_step(
    run: Run, batch: dict, env: dist.DistEnv, device: torch.device
) -> dict[str, float]:
    """The discriminator's step on the last micro-batch; its loss is zero before the model's
    `gan_start_step`, which is why it gets the step."""
    disc = run.model.discriminator
    with autocast(device, run.cfg.trainer.precision == "bf16"):
        d_loss, d_metrics = run.model.discriminator_loss(batch, step=run.step)
    if d_loss.requires_grad:
        d_loss.backward()
        if env.distributed:
            _average_grads(disc)  # the same on every rank afterwards, so is the check below
        if math.isfinite(_grad_norm(disc.parameters())):
            run.disc_opt.step()
    run.disc_opt.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in d_metrics.items()}


def _grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """The total 2-norm of the gradients (non-finite when any gradient is)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _average_grads(module: nn.Module) -> None:
    """The discriminator is not wrapped in DDP (it runs on detached inputs): average by hand."""
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _frames(batch: dict[str, torch.Tensor]) -> int:
    if "latents" in batch:  # (B, T, h, w, D)
        return int(batch["latents"].shape[0] * batch["latents"].shape[1])
    x = batch.get("video", batch.get("tokens"))
    return int(x.shape[0] * (x.shape[2] if x.ndim == 5 else x.shape[1]))


def train_row(out: dict[str, float], run: Run, env: dist.DistEnv, device: torch.device) -> dict:
    """A step's metrics for the log: averaged over the ranks (throughput summed), namespaced."""
    mean = dist.mean_over_ranks(out, device)
    mean["frames_per_s"] *= env.world_size
    mean["nonfinite_total"] = run.nonfinite_total
    return {k if "/" in k else f"train/{k}": v for k, v in mean.items()}


# ------------------------------------------------------------------------------------- validate


@torch.no_grad()
def validate(run: Run, device: torch.device, logger: MetricsLogger | None, media: bool) -> float:
    """Mean loss and metrics over the fixed validation batches, with the EMA weights when there
    are any; returns `val/loss`. Every rank runs it (a codebook's k-means init, when it runs
    before the first step, is a collective), rank 0 logs it.

    Its randomness (e.g. masks) comes from a fixed seed apart from the training stream: every
    evaluation sees the same masks, and a resumed run's stream is unchanged.
    """
    cfg, model = run.cfg, run.model
    tr = cfg.trainer
    subset = val_subset(run.val_ds, int(tr.val_batches) * int(tr.micro_batch))
    loader = DataLoader(subset, batch_size=int(tr.micro_batch))
    model.eval()
    # Validation must not change the model: a quantizer's k-means init or EMA statistics run on
    # a forward pass would otherwise stay (and, inside the EMA swap, half of it be undone).
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    sums: dict[str, float] = {}
    n = 0
    swapped = run.ema.swapped_into(model) if run.ema is not None else nullcontext()
    with torch.random.fork_rng(), swapped:
        torch.manual_seed(int(cfg.seed) + 1)
        first = None
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            first = first if first is not None else batch
            with autocast(device, tr.precision == "bf16"):
                loss, metrics = model.loss(batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        row = {f"val/{k}" if "/" not in k else k: v / max(n, 1) for k, v in sums.items()}
        if logger is not None:
            logger.log(run.step, row)
            if media and first is not None:
                _validation_media(run, first, device, logger)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.train()
    log.info("step %d: %s", run.step, ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
    return row.get("val/loss", float("nan"))


def _validation_media(
    run: Run, batch: dict[str, torch.Tensor], device: torch.device, logger: MetricsLogger
) -> None:
    """The first validation clips beside the model's version of them, as a grid (real rows
    above, model rows below): a tokenizer's reconstruction (`val/reconstruction`), a LAM's
    next frames predicted with the codes it inferred (`val/next_frame`). A world model trains
    on tokens and has no pixels to show here; its evaluation renders rollouts."""
    cfg, model = run.cfg, run.model
    if "video" not in batch or not isinstance(model, Tokenizer | LatentActions):
        return
    video = batch["video"][: int(cfg.eval.media_samples)]  # (B, C, T, H, W)
    with autocast(device, cfg.trainer.precision == "bf16"):
        if isinstance(model, Tokenizer):
            name, real = "reconstruction", video
            fake, _ = model.reconstruct(video)
        else:
            video = video[:, :, : int(model.max_frames)]
            name, real = "next_frame", video[:, :, 1:]  # frames 1..T-1
            fake = model.predict_frames(video, model.infer_actions(video))  # (B, C, T-1, H, W)
    path = Path(cfg.run_dir) / "media" / f"{name}_{run.step:08d}.png"
    save_grid([real.float().cpu(), fake.float().clamp(-1, 1).cpu()], path)
    logger.log_files(run.step, {f"val/{name}": path}, {})


# ----------------------------------------------------------------------------------------- save


def save(run: Run, manager: ckpt.CheckpointManager, env: dist.DistEnv) -> None:
    """Rank 0 writes everything needed to continue exactly: weights, optimizers, the schedule's
    position, EMA, step, batches consumed, RNG, wall time used, the config. Under FSDP every rank
    first takes part in gathering the whole weights, optimizer state and EMA weights: the file is
    the same as a single process writes (see train/parallel.py)."""
    model = parallel.full_model_state(run.model, run.sharded)
    optimizer = parallel.full_optimizer_state(run.model, run.opt, run.sharded)
    ema = run.ema.state_dict() if run.ema is not None else None
    if ema is not None and run.sharded:
        ema = parallel.full_tensors(ema)
    if not env.is_main:
        return
    batches_per_epoch = len(run.train_ds) // int(run.cfg.trainer.batch_size)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": run.schedule.state_dict(),
        "disc_optimizer": run.disc_opt.state_dict() if run.disc_opt is not None else None,
        "ema": ema,
        "step": run.step,
        "nonfinite_total": run.nonfinite_total,
        "elapsed_s": run.clock.elapsed(),
        "rng": ckpt.rng_state(),
        "data_position": data_position(run.batches, batches_per_epoch),
        "config": OmegaConf.to_container(run.cfg),
        "model_name": run.cfg.model.get("name"),
    }
    manager.save(state, run.step)


# ----------------------------------------------------------------------------------------- loop


class StopRequests:
    """SIGTERM, Ctrl-C and, in a submitit job, its preemption signal ask the loop to save and
    stop; `restore` puts the previous handlers back."""

    def __init__(self) -> None:
        self.signal: str | None = None
        preempt = dist.preemption_signal()
        signals = (signal.SIGTERM, signal.SIGINT, *((preempt,) if preempt else ()))
        self.previous = {s: signal.signal(s, self._request) for s in signals}

    def _request(self, signum: int, _frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _train(cfg: DictConfig, env: dist.DistEnv, device: torch.device) -> float | None:
    tr = cfg.trainer
    max_steps = int(tr.max_steps)
    budget_s = float(tr.max_minutes) * 60 if tr.max_minutes else None
    run_dir = Path(cfg.run_dir)
    manager = ckpt.CheckpointManager(run_dir / "checkpoints", tr.keep_last)
    run = setup(cfg, device, manager, env)
    n_params = sum(p.numel() for p in run.model.parameters())
    log.info(
        "%s: %.2fM parameters, %d train / %d val clips, %d torch threads per process",
        type(run.model).__name__,
        n_params / 1e6,
        len(run.train_ds),
        len(run.val_ds),
        torch.get_num_threads(),
    )
    batches = train_batches(run, env, device)
    wrapped = wrap(run.model, env, bool(tr.compile), sharded=run.sharded)
    logger = None
    if env.is_main:
        config = OmegaConf.to_container(cfg)
        logger = MetricsLogger(run_dir, config.get("logger"), config, resume_step=run.step)
        logger.log(run.step, {"info/params_m": n_params / 1e6})

    stop = StopRequests()
    label = f"{cfg.stage_label}: " if cfg.get("stage_label") else ""
    bar = ProgressBar(
        env.is_main and bool(tr.progress),
        f"{label}train {cfg.model.get('name', '')}",
        max_steps,
        run.step,
        budget_s,
    )
    val_loss: float | None = None
    consecutive_bad = 0
    try:
        if run.step == 0 and tr.get("val_at_start", True):
            val_loss = validate(run, device, logger, media=False)
        bar.start(run.step, run.clock.elapsed())
        while run.step < max_steps:
            out = train_step(run, wrapped, batches, env, device)
            if out is None:
                consecutive_bad += 1
                run.nonfinite_total += 1
                log.warning(
                    "non-finite loss or gradient at step %d skipped (%d in a row)",
                    run.step,
                    consecutive_bad,
                )
                if consecutive_bad >= int(tr.max_nonfinite):
                    raise FloatingPointError(
                        f"training stopped: {consecutive_bad} consecutive non-finite losses or "
                        f"gradients at step {run.step} (trainer.max_nonfinite="
                        f"{tr.max_nonfinite}); the last good checkpoint is "
                        f"{manager.folder / ckpt.LAST}"
                    )
                continue
            consecutive_bad = 0
            step, elapsed = run.step, run.clock.elapsed()
            out_of_time = budget_s is not None and elapsed >= budget_s
            finishing = dist.any_rank(out_of_time or stop.signal is not None, device)
            finishing = finishing or step >= max_steps

            loss = None
            if step % int(tr.log_every) == 0 or finishing:
                row = train_row(out, run, env, device)
                if logger is not None:
                    logger.log(step, row)
                loss = row["train/loss"]
            bar.update(step, elapsed, loss)
            if step % int(tr.val_every) == 0 or finishing:
                # FSDP: media are drawn on rank 0 alone, which cannot gather the weights
                # (task=eval draws them from the checkpoint)
                media = (step % int(tr.media_every) == 0 or finishing) and not run.sharded
                val_loss = validate(run, device, logger, media=media)
            if step % int(tr.ckpt_every) == 0 or finishing:
                save(run, manager, env)
                dist.barrier()
            if finishing and step < max_steps:
                why = stop.signal or f"trainer.max_minutes={tr.max_minutes}"
                log.info("stopping at step %d (%s); checkpoint saved", step, why)
                break
    finally:
        bar.close(run.step)
        stop.restore()
        if logger is not None:
            logger.close()
    if stop.signal is not None and run.step < max_steps:
        dist.stopped_by_signal(stop.signal, run.step, stop.previous)
    return val_loss
