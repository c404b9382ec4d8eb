"""The GPU check (`make gpu-check`): every model trains a few bf16 steps on cuda, is evaluated and
played there, one-process nccl DDP runs under torchrun, `torch.compile` trains, activation
checkpointing trains and, with 2 GPUs, FSDP resumes under torchrun. Skipped, with the reason, on
a machine without a CUDA device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
GPU = ["trainer=gpu", "logger=none", "trainer.progress=false", "trainer.num_workers=0"]


def _run(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "run.py"), *args]
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr[-4000:]}"
    return done


def test_the_genie_pipeline_trains_evaluates_and_plays_on_cuda(tmp_path) -> None:
    _run("experiment=smoke_genie", *GPU, "trainer.max_steps=5", f"hydra.run.dir={tmp_path}")
    for stage in ("tokenizer", "lam", "dynamics"):
        result = json.loads((tmp_path / stage / "eval.json").read_text())
        assert result["num_clips"] > 0, stage
    play = json.loads((tmp_path / "play" / "play.json").read_text())
    assert play["device"].startswith("cuda") and play["num_frames"] == 7


@pytest.mark.parametrize(
    "experiment",
    ["smoke_cvivit", "smoke_videogpt_vqvae", "smoke_genie2", "smoke_phenaki", "smoke_videogpt"],
)
def test_every_model_trains_on_cuda(tmp_path, experiment) -> None:
    _run(f"experiment={experiment}", *GPU, "trainer.max_steps=3", f"hydra.run.dir={tmp_path}")
    assert list(tmp_path.rglob("last.pt")), "no checkpoint written"


def test_one_process_nccl_ddp_under_torchrun(tmp_path) -> None:
    torchrun = shutil.which("torchrun") or str(ROOT / ".venv" / "bin" / "torchrun")
    _run(
        "experiment=smoke_tokenizer",
        *GPU,
        "trainer.backend=nccl",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path}",
        launcher=[torchrun, "--standalone", "--nproc_per_node=1"],
    )
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_torch_compile_trains_on_cuda(tmp_path) -> None:
    _run(
        "experiment=smoke_tokenizer",
        *GPU,
        "trainer.compile=true",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


# ---------------------------------------------------------------- FSDP (trainer.strategy=fsdp)
# tests/test_fsdp.py runs FSDP2 on 2 gloo processes on the CPU (against DDP, resume, checkpoint
# format); these run it where it is meant to run: one process per GPU over nccl, bf16.


def test_activation_checkpointing_trains_on_cuda(tmp_path) -> None:
    _run(
        "experiment=smoke_lam",
        *GPU,
        "trainer.activation_checkpointing=true",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA devices")
def test_fsdp_on_two_gpus_under_torchrun_resumes_and_loads_in_one_process(tmp_path) -> None:
    torchrun = shutil.which("torchrun") or str(ROOT / ".venv" / "bin" / "torchrun")
    launcher = [torchrun, "--standalone", "--nproc_per_node=2"]
    args = ["experiment=smoke_lam", *GPU, "trainer=fsdp", "trainer.lr_schedule=constant"]
    _run(*args, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'whole'}", launcher=launcher)
    _run(*args, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'split'}", launcher=launcher)
    _run(*args, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'split'}", launcher=launcher)
    rows = {}
    for run in ("whole", "split"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(line) for line in lines]
        rows[run] = {r["step"]: r["train/loss"] for r in logged if "train/loss" in r}
    # nccl's reductions are not bit-exact from run to run
    assert rows["whole"].keys() == rows["split"].keys() and all(
        abs(rows["whole"][s] - rows["split"][s]) <= 1e-3 * abs(rows["whole"][s]) for s in (4, 5, 6)
    ), rows
    # the whole state dict of one process: it resumes on one GPU under DDP's strategy
    _run(
        "experiment=smoke_lam",
        *GPU,
        "trainer.lr_schedule=constant",
        "trainer.max_steps=8",
        f"hydra.run.dir={tmp_path / 'split'}",
    )
