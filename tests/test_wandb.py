"""W&B as a researcher reads it: runs named and grouped, eval numbers in the summary, pictures as
media, and `run.log` under DDP. Real offline W&B runs, read back from their `.wandb` files."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import run_py as _run_py

from worldmodel.media import plot_curve, save_grid
from worldmodel.train.logging import flatten, log_eval, media_panels, wandb_identity

# ----------------------------------------------------------------------- reading an offline run

_BLOCK = 32768  # the `.wandb` file is a LevelDB-style log: 32 KiB blocks of framed records
_FULL, _LAST = 1, 4


@dataclass
class OfflineRun:
    """What an offline W&B run recorded: its identity, summary, history keys, media files."""

    folder: Path
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config_keys: set[str] = field(default_factory=set)
    summary: dict[str, object] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)

    def media(self, kind: str) -> list[Path]:
        """Media files under `files/media/<kind>/` (kind: images | videos)."""
        return sorted((self.folder / "files" / "media" / kind).rglob("*.*"))


def _records(path: Path):
    """The protobuf records of a `.wandb` file (W&B's own framing: a 7-byte `:W&B` header, then
    records of checksum, length, type split across 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if pos + length > len(data):  # a record still being written
            return
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        parts += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(folder: Path, wait_s: float = 60.0) -> OfflineRun:
    """The run as its `.wandb` file holds it once complete: W&B's service process writes the
    file on its own, and may still be writing when `finish()` has returned in this process, so
    the file is read again until its last record (`exit`) is there."""
    (path,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        records = list(_records(path))
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "exit" in kinds, f"{path} has no exit record after {wait_s} s"
    run = OfflineRun(folder)
    for record, kind in zip(records, kinds, strict=True):
        if kind == "run":
            r = record.run
            run.id, run.name, run.group = r.run_id, r.display_name, r.run_group
            run.job_type = r.job_type
            run.tags = list(r.tags)
            run.config_keys = {_key(item) for item in r.config.update}
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history_keys |= {_key(item) for item in record.history.item}
    return run


def offline_runs(run_dir: Path) -> dict[str, OfflineRun]:
    """The offline runs in a run folder, keyed by job_type."""
    runs = [read_offline_run(f) for f in sorted((run_dir / "wandb").glob("offline-run-*"))]
    return {r.job_type: r for r in runs}


# --------------------------------------------------------------------------------------- runs


def run_py(*args: str) -> subprocess.CompletedProcess:
    return _run_py(*args, env={"WANDB_SILENT": "true"})


# Media each stage's runs must hold (training run: validation grid; eval run: eval.json's media).
STAGE_MEDIA = {
    "tokenizer": ("val/reconstruction", ("reconstruction_grid", "side_by_side")),
    "lam": ("val/next_frame", ("next_frame_grid", "action_confusion")),
    "dynamics": (None, ("next_frame_grid", "rollout", "rollout_psnr_plot", "delta_psnr_plot")),
}


def _numbers(metrics: dict) -> dict[str, object]:
    return {k: v for k, v in flatten(metrics, "eval").items() if v is not None}


@pytest.mark.slow  # a whole three-stage pipeline with W&B (~25 s alone, more on shared cores)
def test_a_pipeline_files_its_runs_and_their_eval(tmp_path):
    run_dir = tmp_path / "2026-01-01" / "12-00-00_smoke_genie"
    run_py(
        "experiment=smoke_genie",
        f"hydra.run.dir={run_dir}",
        "logger=wandb",
        "trainer.max_steps=10",
        "trainer.progress=false",
        "play.actions=[]",
    )
    group = "2026-01-01/12-00-00_smoke_genie"  # the pipeline's run folder
    for stage, (val_media, eval_media) in STAGE_MEDIA.items():
        runs = offline_runs(run_dir / stage)
        assert set(runs) == {stage, "eval"}, (stage, set(runs))
        train_run, eval_run = runs[stage], runs["eval"]
        assert train_run.name == f"smoke_genie/{stage}"
        assert eval_run.name == f"smoke_genie/{stage}/eval"
        assert train_run.group == eval_run.group == group
        assert "smoke_genie" in train_run.tags and "smoke_genie" in eval_run.tags
        assert (run_dir / stage / "wandb_id.txt").read_text() == train_run.id
        assert "train_wandb_id" in eval_run.config_keys

        # training: losses over steps, the validation grid as an image
        assert {"train/loss", "val/loss"} <= train_run.history_keys
        if val_media is not None:
            assert f"{val_media}/path" in train_run.summary or val_media in train_run.summary
            assert train_run.media("images"), f"{stage}: no validation image"

        # evaluation: every number of eval.json in the summary, each picture as media
        result = json.loads((run_dir / stage / "eval.json").read_text())
        expected = _numbers(result["metrics"])
        missing = sorted(set(expected) - set(eval_run.summary))
        assert not missing, f"{stage}: eval.json numbers missing from the summary: {missing[:5]}"
        for key in ("eval/psnr", "eval/num_clips", "eval/step"):
            assert key in eval_run.summary, (stage, key)
        assert eval_run.summary["eval/psnr"] == pytest.approx(result["metrics"]["psnr"])
        for kind in eval_media:
            assert f"eval/media/{kind}" in eval_run.history_keys or any(
                k.startswith(f"eval/media/{kind}/") for k in eval_run.history_keys
            ), (stage, kind)
        names = [p.name for p in eval_run.media("images") + eval_run.media("videos")]
        for kind in eval_media:
            assert any(n.startswith(f"{kind}_") for n in names), (stage, kind, names)
    videos = offline_runs(run_dir / "dynamics")["eval"].media("videos")
    assert [p.suffix for p in videos] == [".mp4"]  # the rollout once, as MP4 (not also a GIF)


@pytest.mark.slow  # a sweep of a 1-process and a 2-process (gloo) run, started by run.py (~35 s)
def test_a_sweeps_runs_share_a_group_and_run_log_holds_rank_zero_lines(tmp_path):
    sweep = tmp_path / "2026-01-01" / "12-00-00"
    run_py(
        "-m",
        "experiment=smoke_tokenizer",
        "logger=wandb",
        "trainer=ddp",
        "trainer.devices=1,2",
        "trainer.threads=1",
        "trainer.batch_size=4",
        "trainer.max_steps=2",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    runs = [offline_runs(sweep / str(i))["tokenizer"] for i in (0, 1)]
    assert [r.group for r in runs] == ["2026-01-01/12-00-00"] * 2  # the sweep folder
    assert [r.name for r in runs] == ["smoke_tokenizer/0", "smoke_tokenizer/1"]
    # One process (Hydra's own handler writes run.log) and two spawned ones (before: run.log
    # stayed empty, the spawned rank 0 had no handler for it): rank 0's lines, once each.
    for i in (0, 1):
        lines = (sweep / str(i) / "run.log").read_text().splitlines()
        assert sum("VideoTokenizer:" in line and "parameters" in line for line in lines) == 1
        assert sum("step 2: val/loss=" in line for line in lines) == 1


# ---------------------------------------------------------------------------------- the parts


def test_flatten_keeps_every_number_of_nested_results():
    flat = flatten({"psnr": 20.5, "curve": [1.0, 2.0], "m": [[1, 2]], "d": {"a": "x"}}, "eval")
    assert flat == {
        "eval/psnr": 20.5,
        "eval/curve/0": 1.0,
        "eval/curve/1": 2.0,
        "eval/m/0/0": 1,
        "eval/m/0/1": 2,
        "eval/d/a": "x",
    }


def test_media_panels_prefer_mp4_and_skip_missing_files(tmp_path):
    for name in ("rollout.gif", "rollout.mp4", "grid.png", "only.gif"):
        (tmp_path / name).write_bytes(b"x")
    media = {
        "rollout_gif": "rollout.gif",
        "rollout_mp4": "rollout.mp4",
        "grid": "grid.png",
        "only_gif": "only.gif",
        "gone": "gone.png",
    }
    panels = media_panels(media, tmp_path)
    assert panels == {
        "eval/media/rollout": tmp_path / "rollout.mp4",
        "eval/media/grid": tmp_path / "grid.png",
        "eval/media/only": tmp_path / "only.gif",
    }


def test_identity_of_a_plain_run_and_of_an_eval():
    config = {"name": "smoke_lam", "task": "train", "model": {"name": "lam"}, "data": {}}
    config["logger"] = {"name": "wandb", "tags": ["mine"]}
    assert wandb_identity(config) == {
        "name": "smoke_lam",
        "group": None,
        "job_type": "lam",
        "tags": ["mine", "smoke_lam", "lam"],
    }
    assert wandb_identity({**config, "task": "eval"})["job_type"] == "eval"


def test_task_eval_is_a_run_of_its_own_linked_to_its_training_run(tmp_path):
    trained = tmp_path / "train"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "wandb_id.txt").write_text("abc123")
    eval_dir = tmp_path / "eval"
    plot = plot_curve([1, 2], {"model": [20.0, 18.0]}, eval_dir / "rollout_psnr.png")
    grid = save_grid([torch.zeros(1, 3, 2, 8, 8)], eval_dir / "next_frame.png")
    result = {
        "model": "dynamics",
        "step": 7,
        "checkpoint": str(trained / "checkpoints" / "last.pt"),
        "num_clips": 4,
        "metrics": {"psnr": 21.5, "rollout_psnr": [20.0, 18.0], "action_source": "true"},
        "media": {"rollout_psnr_plot": plot.name, "next_frame_grid": grid.name},
    }
    config = {
        "name": "smoke_dynamics",
        "task": "eval",
        "model": {"name": "dynamics"},
        "data": {"env_name": "coinrun"},
        "logger": {"name": "wandb", "mode": "offline", "log_media": True},
    }
    log_eval(config, result, eval_dir)
    (run,) = offline_runs(eval_dir).values()
    assert (run.name, run.job_type, run.group) == ("smoke_dynamics", "eval", "")
    assert "train_wandb_id" in run.config_keys
    assert run.summary["eval/psnr"] == 21.5 and run.summary["eval/rollout_psnr/1"] == 18.0
    assert run.summary["eval/step"] == 7 and run.summary["eval/action_source"] == "true"
    assert {"eval/media/rollout_psnr_plot/path", "eval/media/next_frame_grid/path"} <= set(
        run.summary
    )
    assert len(run.media("images")) == 2


def test_a_failing_wandb_costs_the_evaluation_nothing(tmp_path, caplog):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the run folder should be")
    config = {"name": "x", "task": "eval", "model": {"name": "lam"}, "logger": {"name": "wandb"}}
    log_eval(config, {"metrics": {"psnr": 1.0}, "media": {}}, blocked)  # must not raise
    assert "W&B eval logging failed" in caplog.text
