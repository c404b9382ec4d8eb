"""`run.py` end to end as a user runs it: train the smoke tokenizer, then evaluate it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def run_py(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def test_train_then_eval(tmp_path):
    run_dir = tmp_path / "train"
    run_py("experiment=smoke_tokenizer", f"hydra.run.dir={run_dir}", "trainer.max_steps=20")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/psnr" in r for r in rows) and any("train/loss" in r for r in rows)
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    eval_dir = tmp_path / "eval"
    run_py(
        "task=eval",
        f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
        "experiment=smoke_tokenizer",
        f"hydra.run.dir={eval_dir}",
        "data.env_name=bigfish",
    )
    result = json.loads((eval_dir / "eval.json").read_text())
    assert result["model"] == "tokenizer" and result["step"] == 20
    assert result["data"]["env_name"] == "bigfish"
    for key in ("psnr", "ssim", "codebook/usage", "codebook/perplexity", "tokens_per_frame"):
        assert key in result["metrics"], key
    assert 0 < result["metrics"]["psnr"] < 100 and 0 <= result["metrics"]["ssim"] <= 1
    for rel in result["media"].values():
        assert (eval_dir / rel).stat().st_size > 0


def test_bad_input_fails_before_any_work(tmp_path):
    out = run_py(
        "experiment=smoke_tokenizer",
        "data.resolution=60",
        "model.spatial_downsample=8",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert out.returncode != 0
    assert "data.resolution=[60, 60] is not divisible by model.spatial_downsample=8" in out.stderr
    out = run_py(
        "task=eval", f"checkpoint={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path}", check=False
    )
    assert out.returncode != 0 and "checkpoint not found" in out.stderr


def test_genie_pipeline_end_to_end(tmp_path):
    """Tokenizer -> LAM -> dynamics (recorded actions) -> eval of each -> a headless rollout."""
    run_py("experiment=smoke_genie", f"hydra.run.dir={tmp_path}", "logger=none")
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert list(stages) == ["tokenizer", "lam", "dynamics"]
    results = {name: json.loads((tmp_path / name / "eval.json").read_text()) for name in stages}
    assert {r["schema"] for r in results.values()} == {1}
    assert "action_nmi" in results["lam"]["metrics"]
    dyn = results["dynamics"]["metrics"]
    for key in ("psnr", "rollout_psnr", "delta_psnr", "delta_psnr_stderr", "gen_fps"):
        assert key in dyn, key
    played = json.loads((tmp_path / "play" / "play.json").read_text())
    assert len(played["actions"]) == 6
    assert (tmp_path / "play" / "play.gif").stat().st_size > 0


def test_sigterm_saves_stops_the_command_and_the_run_resumes(tmp_path):
    import signal
    import time

    args = [
        "experiment=smoke_tokenizer",
        f"hydra.run.dir={tmp_path}",
        "logger=none",
        "trainer.max_steps=100000",
        "trainer.log_every=1",
        "eval.after_train=true",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (
        not metrics.exists() or "train/loss" not in metrics.read_text()
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "eval.json").exists(), "a cut run must not be evaluated"
    stopped = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    run_py(*args[:-3], "trainer.max_steps=" + str(stopped + 3), "eval.after_train=true")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert max(steps) == stopped + 3 and (tmp_path / "eval.json").is_file()
