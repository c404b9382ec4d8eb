"""`run.py` end to end as a user runs it: train the smoke tokenizer, then evaluate it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_py


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
    # wall time and memory of each stage
    resources = json.loads((tmp_path / "resources.json").read_text())
    assert list(resources) == list(stages)
    peaks = [r["peak_rss_gb"] for r in resources.values()]
    assert peaks == sorted(peaks) and 0 < peaks[0] < 24  # the process's peak so far
    assert all(r["seconds"] > 0 and 0 < r["rss_gb"] <= r["peak_rss_gb"] for r in resources.values())
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


def test_torchrun_sets_the_process_count_and_one_run_folder(tmp_path):
    """The README's torchrun command without `trainer.devices`: torchrun's WORLD_SIZE decides,
    and both processes write to the one run folder `outputs/<date>/<time>_<name>`."""
    from worldmodel.train import checkpoint as ckpt
    from worldmodel.train.dist import free_port

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("WORLDMODEL_RUN_STAMP", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(ROOT / "run.py"),
            "experiment=smoke_tokenizer",
            "logger=none",
            "trainer.max_steps=4",
            "trainer.val_at_start=false",
            "trainer.val_every=4",
            "trainer.val_batches=1",
            "trainer.media_every=100",
            "trainer.threads=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")  # one folder for both processes
    assert run_dir.name.endswith("_smoke_tokenizer")
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["config"]["trainer"]["devices"] == 2


def test_processes_of_one_torchrun_agree_on_the_run_folder():
    """The first process's clock, kept in the store torchrun's agent serves, names the folder."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from worldmodel.train.dist import RUN_STAMP, share_run_stamp

    agent = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )
    torchrun = {
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(agent.port),
    }
    stamps = []
    for rank in (1, 0):  # whichever asks first decides
        environ = {**torchrun, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        stamps.append(share_run_stamp(environ, timeout_s=10))
        assert environ[RUN_STAMP] == stamps[-1]
    assert stamps[0] == stamps[1] == agent.get("worldmodel/run_stamp").decode()
    assert len(stamps[0]) == len("2001-02-03/04-05-06")
    assert share_run_stamp({}) is None  # no launcher: Hydra's own clock
    assert share_run_stamp({RUN_STAMP: "x"}) == "x"
    with pytest.raises(RuntimeError, match="partial distributed environment"):
        share_run_stamp({"TORCHELASTIC_RUN_ID": "none", "RANK": "0"})
    with pytest.raises(RuntimeError, match="hydra.run.dir"):
        share_run_stamp(
            {**torchrun, "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"}
        )


def test_cluster_slurm_without_multirun_stops_and_says_how(tmp_path):
    out = run_py(
        "cluster=slurm", "experiment=smoke_tokenizer", f"hydra.run.dir={tmp_path}", check=False
    )
    assert out.returncode != 0
    assert "cluster=slurm submits jobs through Hydra's launcher, which only runs with -m" in (
        out.stderr
    )
    assert "python run.py -m cluster=slurm" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
