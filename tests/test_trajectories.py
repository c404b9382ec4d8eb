"""Logged trajectories as a data source: npz episodes, videos beside their actions (written with
PyAV), Minari's HDF5 layout (written with h5py), bad inputs, and a few steps of the shared loop
on a folder of episodes whose actions must reach the batch unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from worldmodel.config import validate
from worldmodel.data.decode import DecodeError, probe, read_frames, read_video
from worldmodel.data.frames import resize_frames
from worldmodel.data.trajectories import TrajectorySource
from worldmodel.train import checkpoint as ckpt
from worldmodel.train import dist, loop
from worldmodel.train.logging import read_metrics


def frames_of(
    rng: np.random.Generator, length: int, h: int = 24, w: int = 32, noise: int = 60
) -> np.ndarray:
    """A moving bright square on a noisy backdrop, uint8 (T, H, W, 3)."""
    frames = rng.integers(0, noise, (length, h, w, 3), dtype=np.uint8)
    for t in range(length):
        y, x = (2 * t) % (h - 6), (3 * t) % (w - 6)
        frames[t, y : y + 6, x : x + 6] = (250, 200, 40)
    return frames


def stored(source: TrajectorySource) -> dict[str, dict]:
    """Each recorded episode part by (file, first_frame): its frames, actions and metadata."""
    out = {}
    for split in source.manifest["splits"]:
        ds = source.split(split)
        frames = np.load(ds.frames_path, mmap_mode="r")
        actions = np.load(ds.actions_path, mmap_mode="r")
        for e in ds.episodes:
            part = slice(e["offset"], e["offset"] + e["length"])
            key = e["file"] if e["first_frame"] == 0 else f"{e['file']}@{e['first_frame']}"
            out[key] = {
                **e,
                "split": split,
                "frames": np.asarray(frames[part]),
                "actions": np.asarray(actions[part]),
            }
    return out


# -- npz -------------------------------------------------------------------------------------------
def test_npz_episodes_keep_their_actions_rewards_and_text(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "episodes"
    (folder / "day2").mkdir(parents=True)
    episodes = {}
    for i in range(6):
        frames = frames_of(rng, 10 + i)
        # even episodes: one action per transition (T-1); odd ones: one per frame (T)
        actions = rng.integers(0, 5, len(frames) - (i % 2 == 0))
        extra = {"rewards": rng.normal(size=len(actions)), "text": f"run {i}"} if i == 1 else {}
        rel = f"day2/ep{i}.npz" if i >= 4 else f"ep{i}.npz"
        np.savez_compressed(folder / rel, frames=frames, actions=actions, **extra)
        episodes[rel] = (frames, actions, extra)
    grey = rng.integers(0, 256, (8, 24, 32), dtype=np.uint8)  # (T, H, W) grey frames
    np.savez(folder / "grey.npz", frames=grey, actions=np.arange(7) % 3)

    source = TrajectorySource(
        root=str(tmp_path / "cache"), folder=str(folder), resolution=16, clip_length=4
    )
    train, val = source.datasets()
    assert source.num_actions == 5 and train.num_actions == 5 and source.skipped == 0
    assert train.num_episodes + val.num_episodes == 7 and train.num_episodes and val.num_episodes
    parts = stored(source)
    for rel, (frames, actions, extra) in episodes.items():
        part = parts[rel]
        expect = actions if len(actions) == len(frames) else np.append(actions, -1)
        assert np.array_equal(part["actions"], expect), rel  # T-1 actions: -1 at the last frame
        assert np.array_equal(part["frames"], resize_frames(frames, (16, 16), "center")), rel
        if extra:
            assert part["text"] == "run 1"
            assert part["return"] == pytest.approx(extra["rewards"].sum())
    assert np.array_equal(parts["grey.npz"]["frames"][..., 0], parts["grey.npz"]["frames"][..., 2])

    # a clip's actions are the stored ones
    item = train[len(train) - 1]
    assert item["video"].shape == (3, 4, 16, 16) and item["actions"].dtype == torch.int64

    # data.num_actions: a larger action space is kept, a smaller one is refused naming the file
    wide = TrajectorySource(
        root=str(tmp_path / "cache"),
        folder=str(folder),
        resolution=16,
        clip_length=4,
        num_actions=9,
    )
    assert wide.cache_dir != source.cache_dir and wide.datasets()[0].num_actions == 9
    narrow = TrajectorySource(
        root=str(tmp_path / "cache"),
        folder=str(folder),
        resolution=16,
        clip_length=4,
        num_actions=4,
    )
    with pytest.raises(ValueError, match=r"ep\d\.npz: action id 4 is outside \[0, 4\)"):
        narrow.datasets()


def test_one_episode_is_split_by_frames(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "one"
    folder.mkdir()
    frames, actions = frames_of(rng, 30), rng.integers(0, 3, 29)
    np.savez(folder / "only.npz", frames=frames, actions=actions)
    source = TrajectorySource(
        root=str(tmp_path), folder=str(folder), resolution=[24, 32], clip_length=3
    )
    train, val = source.datasets()
    assert (train.num_frames, val.num_frames) == (27, 3)
    parts = stored(source)
    assert np.array_equal(parts["only.npz"]["actions"], actions[:27])
    assert np.array_equal(parts["only.npz@27"]["actions"], np.append(actions[27:], -1))
    assert np.array_equal(parts["only.npz@27"]["frames"], frames[27:])  # native size: unchanged


# -- videos ----------------------------------------------------------------------------------------
def write_video(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, fps: int = 10) -> None:
    """Encodes uint8 RGB frames (T, H, W, 3) with PyAV."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def test_videos_beside_their_actions(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "videos"
    folder.mkdir()
    lossy, lossless = frames_of(rng, 20, 32, 48, noise=1), frames_of(rng, 15, 32, 48)
    write_video(folder / "a.mp4", lossy, "libx264", "yuv420p")
    np.save(folder / "a.actions.npy", np.arange(20) % 4)  # T actions
    # FFV1 in Matroska: lossless, and a container that does not record its frame count
    write_video(folder / "b.mkv", lossless, "ffv1", "bgr0")
    (folder / "b.actions.json").write_text(
        json.dumps({"actions": [6] * 14, "rewards": [1.0] * 14, "text": "waiting"})
    )
    (folder / "no_actions.mp4").write_bytes((folder / "a.mp4").read_bytes())

    assert probe(folder / "b.mkv").num_frames == 15 and probe(folder / "a.mp4").fps == 10.0
    assert np.array_equal(read_video(folder / "b.mkv"), lossless)
    picked = np.concatenate(list(read_frames(folder / "b.mkv", [0, 3, 3, 14], batch=3)))
    assert np.array_equal(picked, lossless[[0, 3, 3, 14]])
    with pytest.raises(DecodeError, match="ended after 15 frames"):
        list(read_frames(folder / "b.mkv", [15]))

    source = TrajectorySource(
        root=str(tmp_path / "cache"),
        folder=str(folder),
        resolution=[32, 48],
        crop="none",
        clip_length=4,
    )
    source.datasets()
    assert source.num_actions == 7
    assert source.manifest["skipped_files"] == ["no_actions.mp4"]
    assert "no actions beside it" in source.manifest["skipped_reasons"]["no_actions.mp4"]
    parts = stored(source)
    assert np.array_equal(parts["a.mp4"]["actions"], np.arange(20) % 4)
    assert np.abs(parts["a.mp4"]["frames"].astype(int) - lossy).mean() < 3  # h264, 4:2:0
    assert np.array_equal(parts["b.mkv"]["actions"], [6] * 14 + [-1])
    assert np.array_equal(parts["b.mkv"]["frames"], lossless)
    assert parts["b.mkv"]["text"] == "waiting" and parts["b.mkv"]["return"] == 14.0

    # a video with fewer frames than its actions need is skipped with the reason
    (folder / "a.actions.npy").unlink()
    np.save(folder / "a.actions.npy", np.zeros(25, dtype=np.int64))
    again = TrajectorySource(
        root=str(tmp_path / "cache"),
        folder=str(folder),
        resolution=[32, 48],
        crop="none",
        clip_length=4,
    )
    again.prepare()
    assert (
        again.skipped == 2
        and "20 frames but 25 actions" in again.manifest["skipped_reasons"]["a.mp4"]
    )


# -- Minari's HDF5 layout --------------------------------------------------------------------------
def test_minari_hdf5_layout(tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "minari" / "coinrun-v0" / "data"
    data.mkdir(parents=True)
    (data / "metadata.json").write_text(json.dumps({"dataset_id": "coinrun-v0"}))  # not read
    expected = {}
    with h5py.File(data / "main_data.hdf5", "w") as f:
        for i, steps in enumerate([12, 9, 15, 11]):
            g = f.create_group(f"episode_{i}")
            g.attrs["id"] = i
            obs = frames_of(rng, steps + 1)
            actions = rng.integers(0, 15, steps)
            g.create_dataset("observations", data=obs)  # (T+1, H, W, 3)
            g.create_dataset("actions", data=actions)  # (T,)
            g.create_dataset("rewards", data=np.ones(steps))
            g.create_dataset("terminations", data=np.eye(1, steps, steps - 1, dtype=bool)[0])
            g.create_dataset("truncations", data=np.zeros(steps, dtype=bool))
            expected[f"episode_{i}"] = (obs, actions)
        d = f.create_group("episode_4")  # a Dict observation space: skipped
        d.create_group("observations").create_dataset("pixels", data=frames_of(rng, 5))
        d.create_dataset("actions", data=np.zeros(4, dtype=np.int64))

    source = TrajectorySource(
        root=str(tmp_path / "cache"),
        folder=str(tmp_path / "minari"),
        resolution=16,
        crop="none",
        clip_length=4,
    )
    train, val = source.datasets()
    assert train.num_episodes + val.num_episodes == 4 and val.num_episodes >= 1
    name = "coinrun-v0/data/main_data.hdf5"
    assert source.manifest["skipped_files"] == [f"{name}/episode_4"]
    assert "Dict observation space" in source.manifest["skipped_reasons"][f"{name}/episode_4"]
    parts = stored(source)
    for group, (obs, actions) in expected.items():
        part = parts[f"{name}/{group}"]
        assert np.array_equal(part["actions"], np.append(actions, -1))
        assert np.array_equal(part["frames"], resize_frames(obs, (16, 16)))
        assert part["return"] == len(actions)
    assert source.num_actions == max(int(a.max()) for _, a in expected.values()) + 1

    # continuous (float) actions, as in MuJoCo datasets: an error naming the episode
    with h5py.File(data / "main_data.hdf5", "a") as f:
        del f["episode_1/actions"]
        f["episode_1"].create_dataset("actions", data=rng.normal(size=(8, 3)).astype(np.float32))
    with pytest.raises(
        ValueError, match=re.escape(f"{data}/main_data.hdf5/episode_1: actions are float32")
    ):
        TrajectorySource(root=str(tmp_path / "cache"), folder=str(data), clip_length=4).datasets()


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_inputs_are_skipped_and_counted_or_named(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"good{i}.npz", frames=frames_of(rng, 8), actions=rng.integers(0, 4, 7))
    np.savez(folder / "short_actions.npz", frames=frames_of(rng, 8), actions=np.zeros(5, int))
    np.savez(folder / "no_actions.npz", frames=frames_of(rng, 8))
    np.savez(folder / "float_frames.npz", frames=np.zeros((8, 4, 4, 3)), actions=np.zeros(7, int))
    (folder / "corrupt.npz").write_bytes(rng.bytes(3000))
    (folder / "corrupt.hdf5").write_bytes(b"not hdf5")
    (folder / "broken.mp4").write_text("not a video")
    (folder / "broken.actions.json").write_text("[0, 1]")

    source = TrajectorySource(
        root=str(tmp_path / "cache"), folder=str(folder), resolution=8, clip_length=4
    )
    train, val = source.datasets()
    assert train.num_episodes + val.num_episodes == 3
    reasons = source.manifest["skipped_reasons"]
    assert source.skipped == 6 and sorted(reasons) == sorted(source.manifest["skipped_files"])
    assert "8 frames but 5 actions (expected 7 or 8)" in reasons["short_actions.npz"]
    assert "no actions array" in reasons["no_actions.npz"]
    assert "frames are float64, expected uint8" in reasons["float_frames.npz"]
    assert "unreadable" in reasons["corrupt.npz"] and "unreadable" in reasons["corrupt.hdf5"]
    assert "cannot be opened as a video" in reasons["broken.mp4"]

    # unsupported actions stop the recording, naming the file, and leave no cache behind
    for bad, match in (
        (np.linspace(0, 1, 7), "bad.npz: actions are float64; only discrete actions"),
        (np.full(7, 2.0), "store them as integers"),
        (np.array([0, 1, -1, 2, 0, 1, 1]), "bad.npz: negative action id -1"),
        (np.zeros((7, 2), dtype=int), r"bad.npz: actions have shape \(7, 2\)"),
    ):
        np.savez(folder / "bad.npz", frames=frames_of(rng, 8), actions=bad)
        source = TrajectorySource(
            root=str(tmp_path / "cache"), folder=str(folder), resolution=8, clip_length=4
        )
        with pytest.raises(ValueError, match=match):
            source.datasets()
        assert not source.cache_dir.exists()

    # nothing usable: the error names the folder and the reasons
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    np.savez(only_bad / "x.npz", frames=frames_of(rng, 8), actions=np.zeros(3, int))
    source = TrajectorySource(root=str(tmp_path / "cache"), folder=str(only_bad))
    with pytest.raises(ValueError, match=r"no usable episode in .*only_bad.*8 frames but 3"):
        source.datasets()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no npz/hdf5/h5/mp4/.* file in .*empty"):
        TrajectorySource(root=str(tmp_path / "cache"), folder=str(empty))
    with pytest.raises(ValueError, match="data.num_actions must be >= 1"):
        TrajectorySource(root=str(tmp_path / "cache"), folder=str(only_bad), num_actions=0)


# -- through the shared loop -----------------------------------------------------------------------
def test_a_lam_trains_on_trajectories_and_sees_their_actions(tmp_path):
    """The smoke LAM recipe for a few steps on a folder of npz episodes. Pixel (0, 0) of every
    frame encodes (episode, frame index), so each batch clip can be traced back to its episode
    and its actions compared with the ones written."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "episodes"
    folder.mkdir()
    written = {}
    for e in range(6):
        frames = frames_of(rng, 16, 32, 32)
        frames[:, 0, 0] = [[10 * e, t, 0] for t in range(16)]  # (T, 3): episode and frame index
        actions = rng.integers(0, 7, 15)
        np.savez(folder / f"ep{e}.npz", frames=frames, actions=actions)
        written[e] = np.append(actions, -1)

    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke_lam",
        "data=trajectories",
        f"data.folder={folder}",
        f"data.root={tmp_path / 'cache'}",
        "~data.num_envs",
        "~data.train_frames",
        "~data.val_frames",
        "data.resolution=32",
        "model.image_size=32",
        "logger=none",
        "trainer.progress=false",
        "trainer.threads=1",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.val_every=1000",
        "trainer.ckpt_every=1000",
        "trainer.media_every=1000",
        "trainer.val_batches=1",
    ]
    cfg = validate(compose_config(overrides, run_dir=run_dir))
    loop.train(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert (run_dir / "checkpoints" / "last.pt").is_file()

    source = instantiate(cfg.data, _convert_="all")
    source.prepare()
    assert source.num_actions == 7 and source.skipped == 0

    run = loop.setup(cfg, torch.device("cpu"), ckpt.CheckpointManager(tmp_path / "fresh", 1))
    batches = loop.train_batches(run, dist.DistEnv(), torch.device("cpu"))
    seen = 0
    for _ in range(3):
        batch = next(batches)
        pixel = ((batch["video"][:, :2, :, 0, 0] + 1) * 127.5).round().long()  # (B, 2, T)
        for clip in range(batch["video"].shape[0]):
            episode, t = pixel[clip, 0, 0].item() // 10, pixel[clip, 1].tolist()
            assert t == list(range(t[0], t[0] + len(t)))  # consecutive frames of one episode
            assert torch.equal(batch["actions"][clip], torch.from_numpy(written[episode][t]))
            seen += 1
    assert seen == 3 * int(cfg.trainer.batch_size)
