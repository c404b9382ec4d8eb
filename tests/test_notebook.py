"""notebooks/ablation.ipynb executed on a sweep run here: 2 learning rates x 2 FSQ quantizers.

The sweep goes through `cluster=submitit_local` (each run in its own process, as on SLURM), so
this also checks that launcher config.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "ablation.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_ablation_notebook_reads_a_sweep(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        "cluster=submitit_local",
        "experiment=smoke_tokenizer",
        "logger=none",
        "trainer.progress=false",
        "trainer.threads=1",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "eval.after_train=true",
        "eval.batches=1",
        "eval.media_samples=2",
        "optim.lr=1e-3,3e-3",
        "model.quantizer.levels=[8,5,5,5],[8,8,8,5,5,5]",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml"))
    assert len(runs) == 4 and all((r / "eval.json").exists() for r in runs)
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 4  # 4 submitit jobs

    monkeypatch.setenv("WORLDMODEL_SWEEP_DIR", str(sweep_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        for o in c.get("outputs", [])
    )
    assert "4 runs; swept: model.quantizer.levels, optim.lr" in text

    with open(sweep_dir / "ablation.csv") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(table) == ["0", "1", "2", "3"]
    psnr = {}
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        row = table[run.name]
        last_val = [r for r in rows if "val/loss" in r][-1]
        assert float(row["val/loss"]) == pytest.approx(last_val["val/loss"])
        assert int(row["steps"]) == 4
        evaluated = json.loads((run / "eval.json").read_text())["metrics"]["psnr"]
        assert float(row["eval/psnr"]) == pytest.approx(evaluated)
        psnr[run.name] = last_val["val/psnr"]
    assert {row["optim.lr"] for row in table.values()} == {"0.001", "0.003"}
    assert {row["model.quantizer.levels"] for row in table.values()} == {
        "[8, 5, 5, 5]",
        "[8, 8, 8, 5, 5, 5]",
    }
    assert (sweep_dir / "ablation.png").stat().st_size > 10_000
    best = max(psnr, key=psnr.get)
    assert f"best by val/psnr: {best} " in text
