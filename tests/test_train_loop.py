"""The one loop on a real tokenizer and real CoinRun clips: learning, resume, DDP, bad losses."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config

from worldmodel.config import validate
from worldmodel.train import checkpoint as ckpt
from worldmodel.train.logging import read_metrics
from worldmodel.train.loop import train

SMOKE = ["experiment=smoke_tokenizer", "logger=none", "trainer.progress=false"]


def run(tmp_path, name: str, overrides: list[str]):
    run_dir = tmp_path / name
    cfg = validate(compose_config([*SMOKE, *overrides], run_dir=run_dir))
    train(cfg)
    return run_dir, read_metrics(run_dir / "metrics.jsonl")


def losses(rows: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def test_smoke_tokenizer_learns(tmp_path):
    run_dir, rows = run(tmp_path, "learn", ["logger=wandb"])
    val = [r for r in rows if "val/psnr" in r]
    assert len(val) >= 2
    first, last = val[0]["val/psnr"], val[-1]["val/psnr"]
    # Random init reconstructs at ~5-10 dB; a tokenizer that learned anything is far above.
    assert last > first + 3.0 and last > 16.0, (first, last)
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == rows[-1]["step"]
    assert state["config"]["model"]["name"] == "tokenizer"
    assert list((run_dir / "media").glob("reconstruction_*.png"))
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run folder missing"


def test_resume_continues_with_the_same_losses(tmp_path):
    common = [
        "trainer.lr_schedule=constant",
        "trainer.log_every=1",
        "trainer.val_every=1000",
        "trainer.ckpt_every=1000",
        "trainer.max_steps=16",
    ]
    _, full = run(tmp_path, "full", common)
    run(tmp_path, "split", [*common, "trainer.max_steps=9"])
    state = ckpt.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert state["step"] == 9
    _, resumed = run(tmp_path, "split", common)
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 17))
    for step in range(1, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_ddp_two_processes_match_one(tmp_path):
    common = [
        "trainer.max_steps=6",
        "trainer.batch_size=4",
        "trainer.threads=1",
        "trainer.ema_decay=null",
        "trainer.precision=fp32",
        "trainer.val_every=1000",
        "trainer.log_every=1",
        "model.quantizer={kind: fsq, levels: [8, 5, 5, 5]}",
        # a discriminator (kept out of DDP, averaged by the loop) that has not started yet
        "model.gan_weight=0.1",
        "model.gan_start_step=1000",
    ]
    _, one_rows = run(tmp_path, "one", common)
    _, two_rows = run(tmp_path, "two", [*common, "trainer=ddp", "trainer.devices=2"])
    one = ckpt.load(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    two = ckpt.load(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    # The logged scalars are the whole batch's (averaged over the ranks), not rank 0's half.
    for key in ("train/loss", "train/psnr"):
        a, b = losses(one_rows, key), losses(two_rows, key)
        assert sorted(a) == sorted(b) == list(range(1, 7))
        assert all(b[s] == pytest.approx(a[s], rel=1e-4) for s in a), (key, a, b)


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    # Fault injection: from step 4 on the loss is NaN. The loop skips those steps, counts them
    # and stops after trainer.max_nonfinite in a row, with the last good checkpoint intact.
    from worldmodel.models.tokenizer import VideoTokenizer

    real_loss = VideoTokenizer.loss

    def nan_after_4(self, batch, step=0):
        loss, metrics = real_loss(self, batch, step=step)
        return (loss * float("nan") if step >= 4 else loss), metrics

    monkeypatch.setattr(VideoTokenizer, "loss", nan_after_4)
    overrides = ["trainer.max_nonfinite=3", "trainer.ckpt_every=1", "trainer.log_every=1"]
    with pytest.raises(
        FloatingPointError, match="3 consecutive non-finite losses or gradients at step 4"
    ):
        run(tmp_path, "nan", overrides)
    state = ckpt.load(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
