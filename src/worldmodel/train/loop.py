"""The one training loop, for every model: `model.loss(batch) -> (loss, metrics)`.

DDP, autocast (bf16 with fp32 weights), gradient accumulation, clipping, EMA, `torch.compile`,
checkpoints with exact resume, periodic validation and media live here and nowhere else. A model
with a `discriminator` (a GAN) gets a second optimizer for it, stepped after the generator.
"""

from __future__ import annotations

import inspect
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from worldmodel.build import build_datasets, build_model
from worldmodel.config import optim_settings
from worldmodel.data.dataset import val_subset
from worldmodel.train import checkpoint as ckpt
from worldmodel.train import dist
from worldmodel.train.logging import MetricsLogger, setup_logging
from worldmodel.train.optim import EMA, adamw, lr_lambda
from worldmodel.train.sampler import ResumableSampler

log = logging.getLogger(__name__)


class LossModule(nn.Module):
    """Routes `forward` to `model.loss` so DDP's gradient hooks see the call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.takes_step = "step" in inspect.signature(model.loss).parameters

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        return self.model.loss(batch, step=step) if self.takes_step else self.model.loss(batch)


def train(cfg: DictConfig) -> float | None:
    """Train `cfg.model` on `cfg.data`; returns the last validation loss (for sweeps)."""
    # Resolve once here: spawned processes have no Hydra context to resolve `${hydra:...}`.
    plain = OmegaConf.to_container(cfg, resolve=True)
    return dist.launch(_worker, int(cfg.trainer.devices), plain)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(tr: DictConfig, device: torch.device) -> Any:
    if tr.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _worker(env: dist.DistEnv, plain: dict[str, Any]) -> float | None:
    cfg = OmegaConf.create(plain)
    tr = cfg.trainer
    setup_logging(env.rank)
    if tr.threads:
        torch.set_num_threads(int(tr.threads))
    device = dist.init_process_group(env, tr.backend, tr.accelerator)
    run_dir = Path(cfg.run_dir)
    try:
        return _train(cfg, env, device, run_dir)
    finally:
        dist.destroy_process_group()


def _train(cfg: DictConfig, env: dist.DistEnv, device: torch.device, run_dir: Path) -> float | None:
    tr, mcfg = cfg.trainer, cfg.model
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    train_ds, val_ds = build_datasets(cfg)
    disc = getattr(model, "discriminator", None)
    disc_ids = {id(p) for p in disc.parameters()} if disc is not None else set()
    gen_params = [(n, p) for n, p in model.named_parameters() if id(p) not in disc_ids]
    hp = optim_settings(cfg)
    opt = adamw(gen_params, hp["lr"], hp["weight_decay"], hp["betas"])
    disc_opt = (
        adamw(disc.named_parameters(), hp["lr"], 0.0, hp["betas"]) if disc is not None else None
    )
    warmup = hp["warmup_steps"]
    clock = {"start": time.monotonic(), "before": 0.0}  # wall time of this run, across resumes

    def elapsed_s() -> float:
        return clock["before"] + time.monotonic() - clock["start"]

    budget_s = float(tr.max_minutes) * 60 if tr.max_minutes else None
    factor = lr_lambda(
        warmup,
        int(tr.max_steps),
        tr.lr_schedule,
        float(tr.min_lr_ratio),
        (lambda: elapsed_s() / budget_s) if budget_s else None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema = EMA(model, tr.ema_decay) if tr.ema_decay else None
    manager = ckpt.CheckpointManager(run_dir / "checkpoints", tr.keep_last)

    step, nonfinite_total = 0, 0
    state = manager.latest()
    if state is not None:
        ckpt.check_compatible(state, model, str(manager.folder))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if disc_opt is not None and state.get("disc_optimizer"):
            disc_opt.load_state_dict(state["disc_optimizer"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, nonfinite_total = int(state["step"]), int(state.get("nonfinite_total", 0))
        clock["before"] = float(state.get("elapsed_s", 0.0))
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", manager.folder / ckpt.LAST, step)
    elif cfg.get("checkpoint"):
        init = ckpt.load(cfg.checkpoint)
        ckpt.check_compatible(init, model, str(cfg.checkpoint))
        model.load_state_dict(init["model"])
        log.info("initialized weights from %s", cfg.checkpoint)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s: %.2fM parameters, %d train / %d val clips",
        type(model).__name__,
        n_params / 1e6,
        len(train_ds),
        len(val_ds),
    )
    sampler = ResumableSampler(
        len(train_ds),
        int(tr.batch_size),
        int(tr.grad_accum),
        env.rank,
        env.world_size,
        int(cfg.seed),
        start_step=step,
    )
    loader = DataLoader(
        train_ds,
        batch_size=int(tr.micro_batch),
        sampler=sampler,
        num_workers=int(tr.num_workers),
        persistent_workers=tr.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(int(cfg.seed)),
    )
    batches = iter(loader)  # its own generator: the global RNG stream stays the model's

    wrapped: nn.Module = LossModule(model)
    if env.distributed:
        wrapped = DistributedDataParallel(wrapped, find_unused_parameters=disc is not None)
    if tr.compile:
        wrapped = torch.compile(wrapped)
    logger = None
    if env.is_main:
        logger = MetricsLogger(
            run_dir,
            OmegaConf.to_container(cfg.logger),
            OmegaConf.to_container(cfg),
            resume_step=step,
        )
        logger.log(step, {"info/params_m": n_params / 1e6})

    stop = {"signal": None}

    def request_stop(signum: int, _frame: Any) -> None:
        stop["signal"] = signal.Signals(signum).name

    # In a submitit job SLURM also sends USR2 before a time limit or preemption: stop the same way,
    # then hand over to submitit's handler (requeue) once the checkpoint is written.
    preempt = dist.preemption_signal()
    stop_signals = (signal.SIGTERM, signal.SIGINT, *((preempt,) if preempt else ()))
    previous = {s: signal.signal(s, request_stop) for s in stop_signals}

    def save() -> None:
        if not env.is_main:
            return
        manager.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "step": step,
                "nonfinite_total": nonfinite_total,
                "elapsed_s": elapsed_s(),
                "rng": ckpt.rng_state(),
                "data_position": sampler.position(step),
                "config": OmegaConf.to_container(cfg),
                "model_name": mcfg.get("name"),
            },
            step,
        )

    val_loss: float | None = None
    consecutive_bad = 0
    bar = tqdm(
        total=int(tr.max_steps),
        initial=step,
        disable=not (env.is_main and tr.progress),
        desc=f"train {mcfg.get('name', '')}",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    try:
        if step == 0 and tr.get("val_at_start", True) and env.is_main:
            _validate(model, ema, val_ds, cfg, device, 0, logger, run_dir, media=False)
        dist.barrier()
        while step < int(tr.max_steps):
            model.train()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(int(tr.grad_accum)):
                batch = _to(next(batches), device)
                last_micro = micro == int(tr.grad_accum) - 1
                sync = nullcontext() if (last_micro or not env.distributed) else wrapped.no_sync()
                with sync, _autocast(tr, device):
                    loss, metrics = wrapped(batch, step)
                    (loss / int(tr.grad_accum)).backward()
                loss_sum += float(loss.detach()) / int(tr.grad_accum)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / int(tr.grad_accum)
            bad = dist.any_rank(not math.isfinite(loss_sum), device)
            if bad:
                opt.zero_grad(set_to_none=True)
                consecutive_bad += 1
                nonfinite_total += 1
                log.warning(
                    "non-finite loss at step %d skipped (%d in a row)", step, consecutive_bad
                )
                if consecutive_bad >= int(tr.max_nonfinite):
                    raise FloatingPointError(
                        f"training stopped: {consecutive_bad} consecutive non-finite losses "
                        f"at step {step} (trainer.max_nonfinite={tr.max_nonfinite}); the last "
                        f"good checkpoint is {manager.folder / ckpt.LAST}"
                    )
                continue
            consecutive_bad = 0
            grad_norm = (
                torch.nn.utils.clip_grad_norm_([p for _, p in gen_params], float(tr.grad_clip))
                if tr.grad_clip
                else None
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if disc_opt is not None:
                with _autocast(tr, device):
                    d_loss, d_metrics = model.discriminator_loss(batch)
                if d_loss.requires_grad:
                    d_loss.backward()
                    if env.distributed:
                        _average_grads(disc)
                    disc_opt.step()
                disc_opt.zero_grad(set_to_none=True)
                sums.update({k: float(v) for k, v in d_metrics.items()})
            if ema is not None:
                ema.update(model)
            step += 1
            bar.update(1)
            out_of_time = budget_s is not None and elapsed_s() >= budget_s
            finishing = dist.any_rank(out_of_time or stop["signal"] is not None, device)
            finishing = finishing or step >= int(tr.max_steps)

            if env.is_main and (step % int(tr.log_every) == 0 or finishing):
                dt = time.perf_counter() - t0
                row = {f"train/{k}" if "/" not in k else k: v for k, v in sums.items()}
                row.update(
                    {
                        "train/loss": loss_sum,
                        "train/lr": sched.get_last_lr()[0],
                        "train/step_s": dt,
                        "train/frames_per_s": _frames(batch) / dt,
                        "train/nonfinite_total": nonfinite_total,
                    }
                )
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                logger.log(step, row)
                bar.set_postfix(loss=f"{loss_sum:.4f}")
            if step % int(tr.val_every) == 0 or finishing:
                if env.is_main:
                    val_loss = _validate(
                        model,
                        ema,
                        val_ds,
                        cfg,
                        device,
                        step,
                        logger,
                        run_dir,
                        media=step % int(tr.media_every) == 0 or finishing,
                    )
                dist.barrier()
            if step % int(tr.ckpt_every) == 0 or finishing:
                save()
                dist.barrier()
            if finishing and step < int(tr.max_steps):
                why = stop["signal"] or f"trainer.max_minutes={tr.max_minutes}"
                log.info("stopping at step %d (%s); checkpoint saved", step, why)
                break
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if logger is not None:
            logger.close()
    if stop["signal"] is not None and step < int(tr.max_steps):
        dist.stopped_by_signal(stop["signal"], step, previous)
    return val_loss


def _frames(batch: dict[str, torch.Tensor]) -> int:
    if "latents" in batch:  # (B, T, h, w, D)
        return int(batch["latents"].shape[0] * batch["latents"].shape[1])
    x = batch.get("video", batch.get("tokens"))
    return int(x.shape[0] * (x.shape[2] if x.ndim == 5 else x.shape[1]))


def _average_grads(module: nn.Module) -> None:
    """The discriminator is not wrapped in DDP (it runs on detached inputs): average by hand."""
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


@torch.no_grad()
def _validate(
    model: nn.Module,
    ema: EMA | None,
    val_ds: Any,
    cfg: DictConfig,
    device: torch.device,
    step: int,
    logger: MetricsLogger,
    run_dir: Path,
    media: bool,
) -> float:
    tr = cfg.trainer
    subset = val_subset(val_ds, int(tr.val_batches) * int(tr.micro_batch))
    loader = DataLoader(subset, batch_size=int(tr.micro_batch))
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    # Validation draws its randomness (e.g. masks) from a fixed seed, apart from the training
    # stream: every evaluation sees the same masks, and a resumed run's stream is unchanged.
    with torch.random.fork_rng(), ema.swapped_into(model) if ema is not None else nullcontext():
        torch.manual_seed(int(cfg.seed) + 1)
        first = None
        for batch in loader:
            batch = _to(batch, device)
            first = first if first is not None else batch
            with _autocast(tr, device):
                loss, metrics = model.loss(batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        row = {f"val/{k}" if "/" not in k else k: v / max(n, 1) for k, v in sums.items()}
        logger.log(step, row)
        if media and first is not None and hasattr(model, "reconstruct"):
            _reconstruction_media(model, first, cfg, device, step, logger, run_dir)
    model.train()
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
    return row.get("val/loss", float("nan"))


def _reconstruction_media(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: DictConfig,
    device: torch.device,
    step: int,
    logger: MetricsLogger,
    run_dir: Path,
) -> None:
    from worldmodel.media import save_grid

    video = batch["video"][: int(cfg.eval.media_samples)]
    with _autocast(cfg.trainer, device):
        recon, _ = model.reconstruct(video)
    path = run_dir / "media" / f"reconstruction_{step:08d}.png"
    save_grid([video.float().cpu(), recon.float().clamp(-1, 1).cpu()], path)
    logger.log_files(step, {"val/reconstruction": path}, {})
