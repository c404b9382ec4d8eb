"""The loop under what goes wrong in real runs: a transient NaN before a resume, blown-up
gradients, a GAN that starts late, a wall-time budget, DDP with EMA codebooks, thread counts.

The runs are the smoke tokenizer for a few steps; faults are injected by wrapping the model's
loss, and wall time comes from a fake clock that moves only when a training loss is computed,
so budgeted runs are deterministic.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from einops import rearrange
from omegaconf import OmegaConf
from torch import nn

from worldmodel.config import validate
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.tokenizer import VideoTokenizer
from worldmodel.runtime import choose_threads, idle_cpus
from worldmodel.train import checkpoint as ckpt
from worldmodel.train import dist, loop
from worldmodel.train.logging import read_metrics

SMOKE = [
    "experiment=smoke_tokenizer",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.log_every=1",
    "trainer.val_every=1000",
    "trainer.ckpt_every=1000",
    "trainer.val_at_start=false",
    "trainer.val_batches=1",
]


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_run(run_dir: Path, overrides: list[str]) -> list[dict]:
    loop.train(validate(compose_config([*SMOKE, *overrides], run_dir=run_dir)))
    return read_metrics(run_dir / "metrics.jsonl")


def by_step(rows: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def wrap_loss(monkeypatch, fault) -> None:
    """VideoTokenizer.loss through `fault(self, step, loss) -> loss` in training forwards."""
    real = VideoTokenizer.loss

    def loss(self, batch, step=0):
        value, metrics = real(self, batch, step=step)
        return (fault(self, step, value) if self.training else value), metrics

    monkeypatch.setattr(VideoTokenizer, "loss", loss)


def once_at(step: int, make):
    """A fault on the first training forward of optimizer step `step` of each run."""
    seen: set[int] = set()

    def fault(_model, s, loss):
        if s == step and s not in seen:
            seen.add(s)
            return make(loss)
        return loss

    return fault, seen


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradients backward: a finite loss whose gradients blew up."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


# ---------------------------------------------------------------- non-finite steps


def test_transient_nan_then_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    # A NaN loss at step 2 is skipped; the skipped step consumed a batch. A run stopped after it
    # and resumed must read the same batches as one that never stopped.
    common = ["trainer.lr_schedule=constant", "trainer.max_steps=8"]
    fault, seen = once_at(2, lambda loss: loss * float("nan"))
    wrap_loss(monkeypatch, fault)
    full = by_step(train_run(tmp_path / "full", common))
    seen.clear()
    train_run(tmp_path / "split", [*common, "trainer.max_steps=4"])
    state = ckpt.load(tmp_path / "split" / "checkpoints" / "last.pt")
    resumed = by_step(train_run(tmp_path / "split", common))
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    assert all(resumed[s] == full[s] for s in range(5, 9)), (full, resumed)
    assert (state["step"], state["nonfinite_total"]) == (4, 1)
    assert state["data_position"]["batches"] == 5  # four steps and the skipped one


def test_nonfinite_gradients_skip_the_step(tmp_path, monkeypatch):
    # The loss is finite, its gradients are not: the step must be skipped like a NaN loss, not
    # clipped by a NaN norm and applied (which turns every weight into NaN).
    fault, _ = once_at(2, NanGradient.apply)
    wrap_loss(monkeypatch, fault)
    rows = train_run(tmp_path / "run", ["trainer.max_steps=4"])
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["step"], state["nonfinite_total"]) == (4, 1)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    losses = by_step(rows)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert all(math.isfinite(v) for v in by_step(rows, "train/grad_norm").values())


# ---------------------------------------------------------------- GAN start, autocast


def test_discriminator_is_not_trained_before_gan_start_step(tmp_path):
    rows = train_run(
        tmp_path / "gan",
        ["trainer.max_steps=2", "model.gan_weight=0.1", "model.gan_start_step=1000"],
    )
    assert [r["gan/d_loss"] for r in rows if "gan/d_loss" in r] == [0.0, 0.0]
    state = ckpt.load(tmp_path / "gan" / "checkpoints" / "last.pt")
    moments = [t for s in state["disc_optimizer"]["state"].values() for t in s.values()]
    assert moments and all(not t.any() for t in moments if t.ndim > 0)  # no gradient yet


class AutocastProbe(torch.autograd.Function):
    """Records whether autocast was on while the backward pass ran through it."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        AutocastProbe.seen.append(torch.is_autocast_enabled("cpu"))
        return grad


def test_backward_runs_outside_autocast(tmp_path, monkeypatch):
    AutocastProbe.seen.clear()
    wrap_loss(monkeypatch, lambda _model, _step, loss: AutocastProbe.apply(loss))
    train_run(tmp_path / "run", ["trainer.max_steps=1", "trainer.precision=bf16"])
    assert AutocastProbe.seen == [False]


# ---------------------------------------------------------------- wall-time budget


class FakeClock:
    """The loop's `time` module, with wall time that advances `per_step` seconds per training
    loss (so a budget ends at a known step); step timings stay real."""

    def __init__(self, per_step: float) -> None:
        self.now = 1000.0
        self.per_step = per_step
        self.module = SimpleNamespace(monotonic=lambda: self.now, perf_counter=time.perf_counter)

    def fault(self, _model, _step, loss):
        self.now += self.per_step
        return loss


def test_budget_schedule_is_continuous_and_resumes_from_the_stored_position(tmp_path, monkeypatch):
    # 1 minute at 6 s a step: 10 steps, warm-up over the first 3, cosine over the 42 s left.
    clock = FakeClock(6.0)
    monkeypatch.setattr(loop, "time", clock.module)
    signal_at = {"step": None}

    def fault(model, step, loss):
        if step == signal_at["step"]:
            signal_at["step"] = None
            os.kill(os.getpid(), signal.SIGTERM)  # this process: the loop's handler takes it
        return clock.fault(model, step, loss)

    wrap_loss(monkeypatch, fault)
    common = [
        "trainer.max_minutes=1",
        "trainer.max_steps=1000",
        "optim.warmup_steps=3",
        "trainer.lr_schedule=cosine",
    ]
    rows = train_run(tmp_path / "full", common)
    lr, loss = by_step(rows, "train/lr"), by_step(rows)
    assert sorted(lr) == list(range(1, 11))
    peak = lr[3]
    # warm-up, then the first decay step at the peak: no drop where warm-up ends
    assert [lr[s] / peak for s in (1, 2, 3, 4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert all(lr[s] > lr[s + 1] for s in range(4, 10))
    assert lr[10] / peak == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 36 / 42)))

    signal_at["step"] = 5  # SIGTERM during the 6th step: saved at step 6, then stopped
    with pytest.raises(SystemExit):
        train_run(tmp_path / "split", common)
    state = ckpt.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["elapsed_s"] == 36.0
    assert state["scheduler"]["warmup_end_s"] == 18.0
    resumed = train_run(tmp_path / "split", common)
    lr2, loss2 = by_step(resumed, "train/lr"), by_step(resumed)
    assert lr2[7] == pytest.approx(state["scheduler"]["factor"] * peak, rel=1e-12)
    assert sorted(lr2) == list(range(1, 11))
    assert all(lr2[s] == lr[s] and loss2[s] == loss[s] for s in range(1, 11))


def test_progress_bar_follows_the_budget_and_logs_print_above_it(tmp_path, monkeypatch, capsys):
    clock = FakeClock(20.0)  # 1 minute: 3 steps of a max_steps=60 run
    monkeypatch.setattr(loop, "time", clock.module)
    wrap_loss(monkeypatch, clock.fault)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    logging.getLogger().addHandler(console)
    try:
        cfg = compose_config(
            [*SMOKE, "trainer.progress=true", "trainer.max_minutes=1", "trainer.max_steps=60"],
            run_dir=tmp_path / "run",
        )
        cfg.stage_label = "stage 2/3 tok"
        loop.train(validate(cfg))
    finally:
        logging.getLogger().removeHandler(console)
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\n", "\r").split("\r") if "%|" in f]  # bar renderings
    assert frames and all(f.startswith("stage 2/3 tok: train ") for f in frames), frames[-3:]
    assert "3/3 [" in frames[-1] and "/60" not in frames[-1], frames[-1]
    stop_lines = [line for line in err.split("\n") if "stopping at step 3" in line]
    assert stop_lines, err[-2000:]
    # printed through tqdm.write: on a line of its own, not after a half-drawn bar
    assert all(line.split("\r")[-1].startswith("[worldmodel.") for line in stop_lines)


# ---------------------------------------------------------------- DDP


class TwoClusters(nn.Module):
    """2-d latents through the LAM's kind of EMA codebook (k-means init, dead-code restarts)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # something for DDP to reduce
        self.quantizer = build_quantizer(
            "vq", 2, codebook_size=4, decay=0.9, kmeans_init=True, threshold_ema_dead_code=1
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z = batch["x"] * self.scale  # (B, D)
        codes, _, aux, _ = self.quantizer(rearrange(z, "b d -> b d 1"))  # (B, D, 1)
        return aux + (rearrange(codes, "b d 1 -> b d") - z).pow(2).mean(), {}


CENTERS = (3.0, -3.0)  # rank r's latents lie around (CENTERS[r], CENTERS[r])


def _codebook_rank(env: dist.DistEnv, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(env, "gloo", "cpu")
    try:
        torch.manual_seed(0)
        model = TwoClusters()
        wrapped = loop.wrap(model, env)
        g = torch.Generator().manual_seed(env.rank)
        for _ in range(8):
            x = CENTERS[env.rank] + 0.2 * torch.randn(32, 2, generator=g)
            loss, _ = wrapped({"x": x}, 0)
            loss.backward()
        torch.save(dict(model.quantizer.named_buffers()), Path(out_dir) / f"rank{env.rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_codebooks_learn_from_every_rank(tmp_path):
    dist.launch(_codebook_rank, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    codes = next(v for k, v in ranks[0].items() if k.endswith("_codebook.embed"))[0]  # (K, D)
    for center in CENTERS:
        nearest = (codes - torch.tensor([center, center])).norm(dim=-1).min()
        assert nearest < 0.5, (center, codes)
    # no buffer is broadcast, yet every rank holds the same codebook
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


# ---------------------------------------------------------------- threads


def test_threads_null_is_this_process_share_of_the_cpus(monkeypatch, tmp_path):
    # 6 CPUs and 3 ranks on this machine: 2 torch threads each.
    monkeypatch.setattr("worldmodel.runtime.available_cpus", lambda: 6)
    monkeypatch.setattr("worldmodel.runtime.idle_cpus", lambda: 6.0)  # an idle machine
    monkeypatch.setattr(loop, "_train", lambda *args: torch.get_num_threads())
    cfg = compose_config(["trainer.threads=null"], run_dir=tmp_path)  # rank 0 writes run.log there
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert loop._worker(dist.DistEnv(local_world_size=3), plain) == 2
    assert loop._worker(dist.DistEnv(local_world_size=1), plain) == 6


def test_a_busy_machine_gets_fewer_threads(monkeypatch):
    monkeypatch.setattr("worldmodel.runtime.available_cpus", lambda: 2)
    assert choose_threads(idle=2.0) == 2  # idle: the whole share
    assert choose_threads(idle=1.0) == 1  # one CPU-bound neighbour: one thread
    assert choose_threads(idle=0.1) == 1  # never fewer than one
    assert choose_threads(4, idle=0.0) == 4  # what the config asks for wins
    idle = idle_cpus(0.05)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1)


def test_ranks_per_machine_come_from_the_launcher(monkeypatch):
    # A SLURM job of 4 tasks on 2 nodes: 2 ranks share each machine's CPUs.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    job = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    env = dist.env_from_environment()
    assert (env.world_size, env.local_world_size) == (4, 2)


def test_validation_leaves_the_model_unchanged(tmp_path):
    """A LAM's k-means codebook init runs on the first forward pass: run by the validation
    before step 0 (inside the EMA swap) it used to leave `initted` set over a zero codebook,
    so the codebook was never initialised from training data."""
    cfg = validate(
        compose_config(
            ["experiment=smoke_lam", "logger=none", "trainer.progress=false"], run_dir=tmp_path
        )
    )
    run = loop.setup(cfg, torch.device("cpu"), ckpt.CheckpointManager(tmp_path / "ck", 1))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    loop.validate(run, torch.device("cpu"), None, media=False)
    after = run.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []
