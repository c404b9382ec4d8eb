"""Runs that survive what happens to real runs: kill -9, corrupt checkpoints, a full disk, W&B down.

Every resumed run must reproduce the uninterrupted run's losses exactly (deterministic settings,
one thread, the same data order); no kill may leave an unreadable `last.pt`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from conftest import logged_losses as losses

from worldmodel.config import validate
from worldmodel.train import checkpoint as ckpt
from worldmodel.train.loop import train

SMOKE = [
    "experiment=smoke_tokenizer",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.log_every=1",
    "trainer.val_every=1000",
    "trainer.media_every=1000",
]


def train_here(run_dir: Path, overrides: list[str]) -> dict[int, float]:
    """Train in this process (trainer.threads is restored after)."""
    threads = torch.get_num_threads()
    try:
        train(validate(compose_config([*SMOKE, *overrides], run_dir=run_dir)))
    finally:
        torch.set_num_threads(threads)
    return losses(run_dir)


def run_py(run_dir: Path, overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run.py"), *SMOKE, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the run started here, by its own pid
    proc.communicate(timeout=60)


# ---------------------------------------------------------------- kill -9 and exact resume


TEN_STEPS = ["trainer.max_steps=10", "trainer.ckpt_every=2", "trainer.keep_last=5"]
KILL_RUN = ["trainer.max_steps=16", "trainer.ckpt_every=2", "trainer.keep_last=2"]


def _reached(metrics: Path, before: int | None, target: int) -> bool:
    """A new metrics.jsonl (not the one of `before`) that has reached `target`."""
    fresh = metrics.exists() and metrics.stat().st_ino != before
    return fresh and max(losses(metrics.parent) or [0]) >= target


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_reproduces_the_losses(tmp_path):
    rng = random.Random(20261122)
    reference_dir = tmp_path / "reference"
    uninterrupted = run_py(reference_dir, KILL_RUN)  # beside the first killed run: 2 cores

    run_dir = tmp_path / "killed"
    metrics = run_dir / "metrics.jsonl"
    resume_step, segments = 0, []
    for _ in range(3):
        # A starting run rewrites metrics.jsonl (dropping what came after its checkpoint) into a
        # new file: only rows of that file are this run's, not those the killed run left.
        before = metrics.stat().st_ino if metrics.exists() else None
        proc = run_py(run_dir, KILL_RUN)
        target = min(resume_step + rng.randint(2, 5), 14)
        deadline = time.monotonic() + 300

        while not _reached(metrics, before, target):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a step: forward, backward, a save
        kill_9(proc)
        # What this run logged after the checkpoint it started from, before it died.
        got = {s: v for s, v in losses(run_dir).items() if s > resume_step}
        segments.append((resume_step, got))
        state = ckpt.load(run_dir / "checkpoints" / "last.pt")  # never unreadable
        assert state["step"] >= resume_step
        resume_step = state["step"]
    finish(run_py(run_dir, KILL_RUN))
    resumed = [line for line in (run_dir / "run.log").read_text().splitlines() if "resumed" in line]
    assert len(resumed) == 3 and resumed[-1].endswith(f"at step {resume_step}"), resumed
    segments.append((resume_step, {s: v for s, v in losses(run_dir).items() if s > resume_step}))
    finish(uninterrupted)
    reference = losses(reference_dir)
    assert sorted(reference) == list(range(1, 17))

    matched = 0
    for start, got in segments:
        assert got, f"the run resumed at step {start} logged nothing"
        assert all(got[s] == reference[s] for s in got), (start, got)  # bit for bit
        matched += 1
    assert losses(run_dir) == reference
    final = ckpt.load(run_dir / "checkpoints" / "last.pt")["model"]
    expected = ckpt.load(reference_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], expected[k]) for k in final)
    spans = ", ".join(f"{start}->{max(got)}" for start, got in segments)
    print(f"\nRELIABILITY kill-9: {len(segments) - 1} kills, {matched}/{len(segments)} runs")
    print(f"RELIABILITY kill-9 segments (resumed at -> last logged step): {spans}")


WRITER = textwrap.dedent(
    """
    import sys, torch
    from worldmodel.train.checkpoint import CheckpointManager
    manager = CheckpointManager(sys.argv[1], keep_last=2)
    state = manager.latest()
    step = state["step"] if state else 0
    while True:
        step += 1
        # 16 MB per file, so that much of the time goes into writing one.
        manager.save({"model": {"w": torch.full((4_000_000,), float(step))}, "step": step}, step)
        print(step, flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_while_writing_checkpoints_never_corrupts_last(tmp_path):
    rng = random.Random(7)
    folder = tmp_path / "checkpoints"
    mid_write, cycles, last_step = 0, 0, 0
    # Kill until three kills have hit a write in progress (a temp file left behind), so the test
    # cannot pass on kills that only fell between writes.
    while mid_write < 3:
        assert cycles < 15, f"only {mid_write} of {cycles} kills hit a write"
        cycles += 1
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        first = int(proc.stdout.readline())  # one save done: the writer is in its loop
        assert first == last_step + 1, (first, last_step)
        time.sleep(rng.uniform(0.0, 0.5))
        kill_9(proc)
        leftovers = list(folder.glob(".*.tmp-*"))
        mid_write += bool(leftovers)
        for tmp in leftovers:  # a real run leaves them too; they are never read
            tmp.unlink()
        state = ckpt.load(folder / "last.pt")
        last_step = state["step"]
        assert torch.equal(state["model"]["w"], torch.full((4_000_000,), float(last_step)))
        for path in folder.glob("step_*.pt"):  # every visible step file is complete
            assert ckpt.load(path)["step"] == int(path.stem.split("_")[1])
    print(f"\nRELIABILITY ckpt-write kills: {cycles} kills, {mid_write} during a write, 0 corrupt")


# ---------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """10 steps with a checkpoint every 2 (all kept), the reference for every resumed run."""
    run_dir = tmp_path_factory.mktemp("reference")
    got = train_here(
        run_dir, ["trainer.max_steps=10", "trainer.ckpt_every=2", "trainer.keep_last=5"]
    )
    assert sorted(got) == list(range(1, 11))
    return run_dir, got


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    with open(path, "r+b") as f:  # in place: the hard-linked step file is cut too
        f.truncate(len(data) // 2)


def _empty(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)


def _garbage(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(random.Random(0).randbytes(4096))


def _needs_code(path: Path) -> None:
    # A file that only loads by running pickled code: weights_only=True refuses it.
    path.unlink()
    torch.save({"model": {}, "step": 8, "payload": Path("/")}, path)


CORRUPTIONS = {
    "truncated": (_truncate, 6),
    "empty": (_empty, 6),
    "garbage": (_garbage, 6),
    "needs_pickled_code": (_needs_code, 8),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(
    case, reference_run, tmp_path, caplog
):
    torch.manual_seed(0)
    ref_dir, reference = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    ckpts = run_dir / "checkpoints"
    # As after a run stopped at step 8: last.pt is a hard link to step_00000008.pt.
    (ckpts / "step_00000010.pt").unlink()
    (ckpts / "last.pt").unlink()
    os.link(ckpts / "step_00000008.pt", ckpts / "last.pt")
    corrupt, expected_step = CORRUPTIONS[case]
    corrupt(ckpts / "last.pt")

    with caplog.at_level(logging.INFO):
        got = train_here(run_dir, TEN_STEPS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping unusable checkpoint" in w and "last.pt" in w for w in warnings), warnings
    assert any(f"at step {expected_step}" in r.getMessage() for r in caplog.records)
    assert sorted(got) == list(range(1, 11))
    for step in range(expected_step + 1, 11):
        assert got[step] == reference[step], step
    assert ckpt.load(ckpts / "last.pt")["step"] == 10  # and the run wrote a good one again


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB tmpfs: room for one checkpoint of the smoke run (1.6 MB) and the logs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or 'not permitted'}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(small_disk, reference_run):
    torch.manual_seed(0)
    _, reference = reference_run
    run_dir = small_disk / "run"
    with pytest.raises(ckpt.CheckpointError) as failure:
        train_here(run_dir, TEN_STEPS)
    message = str(failure.value)
    assert "No space left on device" in message and "step_00000004.pt" in message, message
    assert f"the previous {run_dir / 'checkpoints' / 'last.pt'} is intact" in message, message
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob(".*tmp*")), list(ckpts.iterdir())  # no half-written files
    assert ckpt.load(ckpts / "last.pt")["step"] == 2  # the previous checkpoint, intact
    # With room again the run continues from it, as if nothing had happened.
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    got = train_here(run_dir, TEN_STEPS)
    assert all(got[s] == reference[s] for s in range(1, 11))


# ---------------------------------------------------------------- W&B down


@pytest.mark.slow
def test_training_goes_on_when_wandb_fails(tmp_path):
    torch.manual_seed(0)
    overrides = ["logger=wandb", "trainer.max_steps=4", "trainer.ckpt_every=1000"]
    # 1. W&B cannot create its folder: a file stands where `wandb/` must go.
    unwritable = tmp_path / "unwritable"
    unwritable.mkdir()
    (unwritable / "wandb").write_text("not a folder")
    # 2. Online mode with the service unreachable (nothing listens on port 9).
    offline_server = {
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "0" * 40,
        "WANDB_INIT_TIMEOUT": "5",
    }
    unreachable = tmp_path / "unreachable"
    procs = {
        unwritable: run_py(unwritable, overrides),
        unreachable: run_py(unreachable, overrides, env=offline_server),
    }
    for run_dir, proc in procs.items():
        finish(proc)
        log = (run_dir / "run.log").read_text()
        assert "W&B disabled, logging to metrics.jsonl only" in log, log[-2000:]
        assert sorted(losses(run_dir)) == [1, 2, 3, 4]
        assert ckpt.load(run_dir / "checkpoints" / "last.pt")["step"] == 4
    assert "127.0.0.1:9" in (unreachable / "run.log").read_text()
