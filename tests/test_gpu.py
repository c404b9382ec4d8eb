"""The GPU check (`make gpu-check`): every model trains a few bf16 steps on cuda, is evaluated and
played there, one-process nccl DDP runs under torchrun, and `torch.compile` trains. Skipped, with
the reason, on a machine without a CUDA device."""

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
