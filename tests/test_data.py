"""Data layer: real recorders (procgen, ALE), real decoding (PyAV), the cache, clip datasets."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from worldmodel.data import (
    PROCGEN_GAMES,
    AtariSource,
    BundledClipsSource,
    ClipDataset,
    ImageFolderSource,
    ProcgenSource,
    VideoFolderSource,
    bundled_clips_folder,
)
from worldmodel.data.frames import resize_frames, split_by_hash
from worldmodel.data.shards import MANIFEST, CacheWriter, read_manifest, verify_cache

CONF = Path(__file__).resolve().parents[1] / "conf"


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _check_batch(item: dict, clip_length: int, resolution: tuple[int, int]) -> None:
    assert item["video"].shape == (3, clip_length, *resolution)
    assert item["video"].dtype == torch.float32
    assert item["video"].min() >= -1.0 and item["video"].max() <= 1.0
    assert item["actions"].shape == (clip_length,) and item["actions"].dtype == torch.int64
    assert item["mask"].shape == (clip_length,) and item["mask"].dtype == torch.bool
    assert item["mask"].all()


# -- procgen ---------------------------------------------------------------------------------------
def test_procgen_records_caches_and_rerecords_after_interruption(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(
        root=str(tmp_path),
        num_envs=4,
        train_frames=400,
        val_frames=120,
        train_num_levels=20,
        clip_length=4,
        name="procgen",
    )
    source = ProcgenSource(**kwargs)
    assert source.num_actions == 15  # known before recording (for model sizes)
    train, val = source.datasets()
    folder = source.cache_dir
    assert folder.parent == tmp_path and (folder / MANIFEST).is_file()

    frames = np.load(folder / "train_frames.npy", mmap_mode="r")
    actions = np.load(folder / "train_actions.npy", mmap_mode="r")
    assert frames.shape == (400, 64, 64, 3) and frames.dtype == np.uint8
    assert actions.dtype == np.int64 and actions.min() >= 0 and actions.max() < 15
    assert len(np.unique(actions)) > 5  # random actions, not one repeated
    assert train.num_frames == 400 and val.num_frames == 120
    assert train.num_actions == val.num_actions == 15 and train.resolution == (64, 64)
    assert float(np.asarray(frames[:50]).std()) > 10  # real pictures, not blank frames
    # the actions of a clip are the recorded ones, aligned with its frames
    item = train[3]
    start = int(train.starts[3])
    assert torch.equal(item["actions"], torch.from_numpy(np.array(actions[start : start + 4])))
    _check_batch(item, 4, (64, 64))

    # train and val come from disjoint level ranges
    manifest = json.loads((folder / MANIFEST).read_text())
    train_seeds = {e["level_seed"] for e in manifest["splits"]["train"]["episodes"]}
    val_seeds = {e["level_seed"] for e in manifest["splits"]["val"]["episodes"]}
    assert train_seeds and val_seeds and not train_seeds & val_seeds
    assert all(0 <= s < 20 for s in train_seeds)
    assert all(100000 <= s < 100100 for s in val_seeds)
    assert manifest["num_frames"] == 520 and manifest["format_version"] == 1
    assert verify_cache(folder)

    # a second call (new instance, same config) reads the cache without recording again
    before = _mtimes(folder)
    again = ProcgenSource(**kwargs)
    assert again.cache_dir == folder
    train2, _ = again.datasets()
    assert _mtimes(folder) == before and train2.num_clips == train.num_clips

    # an interrupted recording (no manifest, a half-written file) is deleted and redone
    sha = manifest["files"]["train_frames.npy"]["sha256"]
    (folder / MANIFEST).unlink()
    with open(folder / "train_frames.npy", "r+b") as f:
        f.truncate(1000)
    assert read_manifest(folder) is None
    train3, _ = ProcgenSource(**kwargs).datasets()
    redone = json.loads((folder / MANIFEST).read_text())
    assert train3.num_frames == 400
    assert redone["files"]["train_frames.npy"]["sha256"] == sha  # seeded, so identical frames

    # another recording config gets another folder
    assert ProcgenSource(**{**kwargs, "seed": 1}).cache_dir != folder


def test_procgen_records_a_test_split_of_its_own_levels_with_many_envs(tmp_path):
    kwargs = dict(
        root=str(tmp_path),
        num_envs=2,
        train_frames=200,
        val_frames=240,
        test_frames=240,
        eval_num_envs=24,  # 24 short episodes from up to 24 levels per held-out split
        val_num_levels=1000,
        test_num_levels=1000,
        clip_length=4,
        name="procgen",
    )
    source = ProcgenSource(**kwargs)
    test = source.split("test")
    assert test.num_frames == 240 and test.num_clips > 0
    manifest = json.loads((source.cache_dir / MANIFEST).read_text())
    seeds = {
        split: [e["level_seed"] for e in manifest["splits"][split]["episodes"]]
        for split in ("train", "val", "test")
    }
    assert len(seeds["test"]) >= 24 and len(set(seeds["test"])) >= 20  # many levels
    assert all(200000 <= s < 201000 for s in seeds["test"])
    assert not set(seeds["test"]) & (set(seeds["val"]) | set(seeds["train"]))
    # a recording without test frames has no test split, and says so
    plain = ProcgenSource(**{**kwargs, "test_frames": 0, "eval_num_envs": None})
    with pytest.raises(ValueError, match="no 'test' split"):
        plain.split("test")
    with pytest.raises(ValueError, match="test levels .* overlap"):
        ProcgenSource(root=str(tmp_path), test_frames=10, test_level_start=100050)


def test_procgen_policy_over_an_action_set_with_frame_skip(tmp_path):
    kwargs = dict(root=str(tmp_path), num_envs=1, val_frames=16, clip_length=4)
    plain = ProcgenSource(**kwargs, train_frames=240)
    moves = ProcgenSource(**kwargs, train_frames=300, action_set=[1, 2, 7], frame_skip=4)
    # earlier recordings keep their cache key; the new settings make a new one
    assert "frame_skip" not in plain.recording_params()
    assert "action_set" not in plain.recording_params()
    assert moves.cache_dir != plain.cache_dir
    moves.prepare()
    actions = np.load(moves.cache_dir / "train_actions.npy")
    assert set(np.unique(actions)) == {1, 2, 7}  # only the moves asked for
    episodes = read_manifest(moves.cache_dir)["splits"]["train"]["episodes"]
    assert sum(e["length"] for e in episodes) == 300 and len(episodes) >= 2
    assert all(e["level_seed"] >= 0 for e in episodes)

    # always right: the frame skip recording is every 4th frame of the plain one (same levels)
    right = dict(action_set=[7], max_action_repeat=1)
    every = ProcgenSource(**kwargs, train_frames=240, **right)
    skip = ProcgenSource(**kwargs, train_frames=60, frame_skip=4, **right)
    every.prepare(), skip.prepare()
    first = read_manifest(every.cache_dir)["splits"]["train"]["episodes"][0]["length"]
    shown = min(first // 4, 60)
    assert shown >= 5
    frames = np.load(every.cache_dir / "train_frames.npy")
    skipped = np.load(skip.cache_dir / "train_frames.npy")
    np.testing.assert_array_equal(skipped[:shown], frames[: 4 * shown : 4])
    assert not np.array_equal(skipped[1:shown], frames[1:shown])

    with pytest.raises(ValueError, match=r"action_set \[3, 15\].*outside: \[15\]"):
        ProcgenSource(**kwargs, action_set=[3, 15])
    with pytest.raises(ValueError, match="frame_skip must be >= 1"):
        ProcgenSource(**kwargs, frame_skip=0)


def test_procgen_rejects_bad_names_and_overlapping_levels(tmp_path):
    with pytest.raises(ValueError, match="coinrun.*starpilot"):
        ProcgenSource(root=str(tmp_path), env_name="coinrunn")
    with pytest.raises(ValueError, match="overlap"):
        ProcgenSource(root=str(tmp_path), val_level_start=400)
    assert len(PROCGEN_GAMES) == 16


# -- ALE -------------------------------------------------------------------------------------------
def test_atari_pong_recorder(tmp_path):
    torch.manual_seed(0)
    source = AtariSource(
        root=str(tmp_path),
        game="pong",
        train_frames=300,
        val_frames=100,
        clip_length=8,
        resolution=[48, 64],
    )
    assert source.num_actions == 6
    train, val = source.datasets()
    assert source.game == "ALE/Pong-v5" and train.num_actions == 6
    frames = np.load(source.cache_dir / "train_frames.npy", mmap_mode="r")
    actions = np.load(source.cache_dir / "train_actions.npy", mmap_mode="r")
    assert frames.shape == (300, 48, 64, 3) and frames.dtype == np.uint8
    assert actions.min() >= 0 and actions.max() < 6 and len(np.unique(actions)) >= 4
    assert val.num_frames == 100 and train.resolution == (48, 64)
    _check_batch(val[0], 8, (48, 64))
    with pytest.raises(ValueError, match="Breakout"):
        AtariSource(root=str(tmp_path), game="NotAGame")


# -- videos ----------------------------------------------------------------------------------------
def test_bundled_clips_decode(tmp_path):
    torch.manual_seed(0)
    source = BundledClipsSource(
        root=str(tmp_path), resolution=32, max_frames_per_video=12, clip_length=4, name="clips"
    )
    train, val = source.datasets()
    files = sorted(e["file"] for ds in (train, val) for e in ds.episodes)
    assert files == [
        "bigbuckbunny.mp4",
        "bikes.mp4",
        "carphone_distorted.mp4",
        "carphone_pristine.mp4",
    ]
    assert train.num_frames + val.num_frames == 48 and source.skipped == 0
    assert train.num_actions is None and train.resolution == (32, 32)
    for ds in (train, val):
        item = ds[len(ds) - 1]
        _check_batch(item, 4, (32, 32))
        assert (item["actions"] == -1).all()
        assert item["video"].std() > 0.05  # a real picture

    # the cache holds exactly FFmpeg's first frames (read with PyAV), center-cropped and resized
    import av

    episode = next(e for e in train.episodes + val.episodes if e["file"] == "bikes.mp4")
    ds = train if episode in train.episodes else val
    with av.open(str(bundled_clips_folder() / "bikes.mp4")) as container:
        raw = [f.to_ndarray(format="rgb24") for _, f in zip(range(2), container.decode(video=0))]
    expected = resize_frames(np.stack(raw), (32, 32), "center")
    stored = np.load(ds.frames_path, mmap_mode="r")[episode["offset"] : episode["offset"] + 2]
    assert np.array_equal(stored, expected)


def _bad_files(folder: Path, real: Path) -> None:
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(real.read_bytes()[:2048])
    (folder / "x.mp4").write_text("this is not a video\n")


def test_video_folder_skips_bad_files(tmp_path):
    torch.manual_seed(0)
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    real = bundled_clips_folder() / "carphone_pristine.mp4"
    shutil.copy(real, videos / "sub" / "good.MP4")
    _bad_files(videos, bundled_clips_folder() / "bikes.mp4")

    source = VideoFolderSource(
        root=str(tmp_path / "cache"),
        folder=str(videos),
        resolution=[24, 32],
        crop="none",
        clip_length=4,
        frame_stride=2,
    )
    train, val = source.datasets()
    assert source.skipped == 3
    assert sorted(source.manifest["skipped_files"]) == ["empty.mp4", "truncated.mp4", "x.mp4"]
    # one readable video: its frames are split, the last 10% going to val
    assert (train.num_frames, val.num_frames) == (108, 12)
    assert train.num_episodes == val.num_episodes == 1
    assert train.num_clips == ClipDataset.count_clips(108, 4, 2, 1)
    _check_batch(train[5], 4, (24, 32))
    assert val.resolution == (24, 32) and len(val) == 1  # val clips do not overlap: 12 // 7

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    _bad_files(only_bad, real)
    bad = VideoFolderSource(root=str(tmp_path / "cache"), folder=str(only_bad))
    with pytest.raises(ValueError, match=re.escape(str(only_bad))):
        bad.datasets()
    assert not bad.cache_dir.exists()  # nothing half-written left behind
    with pytest.raises(ValueError, match="no mp4"):
        VideoFolderSource(root=str(tmp_path / "cache"), folder=str(tmp_path / "cache"))


def test_video_folder_fps_and_frame_cap(tmp_path):
    torch.manual_seed(0)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):  # 120 frames at 29.97 fps each
        shutil.copy(bundled_clips_folder() / "carphone_distorted.mp4", videos / name)
    common = dict(root=str(tmp_path / "cache"), folder=str(videos), resolution=16, clip_length=2)
    train, val = VideoFolderSource(**common, fps=10).datasets()
    # 120 frames over 4.004 s at 10 fps: 41 frames each, every ~3rd one
    assert [e["length"] for e in train.episodes + val.episodes] == [41, 41]
    assert train.num_episodes == val.num_episodes == 1  # two files: one each way
    capped = VideoFolderSource(**common, max_frames_per_video=7)
    assert capped.cache_dir != train.folder
    train, val = capped.datasets()
    assert train.num_frames == val.num_frames == 7 and capped.num_actions is None


# -- images ----------------------------------------------------------------------------------------
def test_image_folder(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        h, w = rng.integers(20, 60, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    Image.new("RGB", (30, 40), (255, 0, 0)).save(images / "red.jpg", quality=100)
    Image.new("L", (30, 30), 0).save(images / "gray.png")  # converted to RGB
    (images / "broken.png").write_text("not an image")

    source = ImageFolderSource(root=str(tmp_path / "cache"), folder=str(images), resolution=16)
    train, val = source.datasets()
    assert source.skipped == 1 and train.num_frames + val.num_frames == 9
    assert len(train) == train.num_frames and len(val) == val.num_frames > 0
    reds = [
        ds[i] for ds in (train, val) for i, e in enumerate(ds.episodes) if e["file"] == "red.jpg"
    ]
    video = reds[0]["video"]
    _check_batch(reds[0], 1, (16, 16))
    assert video[0].min() > 0.95 and video[1:].max() < -0.95  # pure red
    with pytest.raises(ValueError, match="clip_length"):
        ImageFolderSource(root=str(tmp_path), folder=str(images), clip_length=4)


# -- clip enumeration and loading -----------------------------------------------------------------
@pytest.fixture
def counting_cache(tmp_path) -> Path:
    """A cache whose frame i is filled with i % 256 and whose action i is i."""
    writer = CacheWriter(tmp_path, (4, 6, 3))
    for split, lengths in (("train", [3, 10, 17, 25, 1]), ("val", [9])):
        for length in lengths:
            offset = writer[split].num_frames
            index = np.arange(offset, offset + length)
            frames = np.broadcast_to(
                (index % 256).astype(np.uint8)[:, None, None, None], (length, 4, 6, 3)
            )
            writer[split].add_episode(np.ascontiguousarray(frames), index)
    writer.finish({"test": True}, num_actions=100)
    return tmp_path


@pytest.mark.parametrize(
    "clip_length,frame_stride,clip_stride", [(4, 1, 1), (3, 2, 3), (1, 1, 2), (5, 3, 4), (11, 1, 1)]
)
def test_clip_enumeration(counting_cache, clip_length, frame_stride, clip_stride):
    torch.manual_seed(0)
    ds = ClipDataset(counting_cache, "train", clip_length, frame_stride, clip_stride)
    expected, skipped, offset = [], 0, 0
    for length in [3, 10, 17, 25, 1]:  # brute force: every start that fits, every clip_stride
        starts = [
            s
            for s in range(0, length, clip_stride)
            if s + (clip_length - 1) * frame_stride < length
        ]
        expected += [offset + s for s in starts]
        skipped += not starts
        offset += length
    assert ds.num_clips == len(expected) == len(ds)
    assert ds.skipped_episodes == skipped and ds.num_episodes == 5 and ds.num_frames == 56
    assert ds.num_clips == sum(
        ClipDataset.count_clips(n, clip_length, frame_stride, clip_stride)
        for n in [3, 10, 17, 25, 1]
    )
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        index = expected[i] + frame_stride * np.arange(clip_length)
        pixels = (item["video"][:, :, 0, 0] + 1) * 127.5  # (C, T)
        assert torch.allclose(pixels, torch.from_numpy(index % 256).float().expand(3, -1))
        assert item["actions"].tolist() == index.tolist()


def test_clip_dataset_through_dataloader(counting_cache):
    torch.manual_seed(0)
    ds = ClipDataset(counting_cache, "train", clip_length=4, frame_stride=2, clip_stride=1)
    ds[0]  # opens the memory maps in this process; they must not be pickled
    assert len(pickle.dumps(ds)) < 20_000
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=1)
    batch = next(iter(loader))
    assert batch["video"].shape == (8, 3, 4, 4, 6) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
    assert batch["actions"].shape == (8, 4) and batch["actions"].dtype == torch.int64
    assert batch["mask"].shape == (8, 4) and batch["mask"].all()
    # frames and actions stay aligned through the workers: pixel value == action index % 256
    pixels = ((batch["video"][:, 0, :, 0, 0] + 1) * 127.5).round().long()
    assert torch.equal(pixels, batch["actions"] % 256)


def test_split_by_hash_is_stable_and_keeps_both_splits():
    keys = [f"video_{i}.mp4" for i in range(200)]
    train, val = split_by_hash(keys, 0.1)
    assert (train, val) == split_by_hash(keys, 0.1) and 10 <= len(val) <= 30
    assert sorted(train + val) == list(range(200))
    assert split_by_hash(keys[:2], 0.1)[1] and split_by_hash(keys[:2], 0.1)[0]


# -- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["procgen", "atari", "video_folder", "images", "clips"])
def test_data_configs_instantiate(name, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(bundled_clips_folder() / "carphone_distorted.mp4", folder)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    monkeypatch.delenv("WORLDMODEL_DATA", raising=False)
    overrides = [f"+data={name}"]
    if name in ("video_folder", "images"):
        overrides.append(f"data.folder={folder}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=overrides)
    assert cfg.data.name == name
    source = instantiate(cfg.data, _convert_="all")
    assert source.root == Path(os.environ["HOME"]) / ".cache" / "worldmodel" / "data"
    assert source.resolution == (64, 64) and source.name == name
    monkeypatch.setenv("WORLDMODEL_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=overrides)
    assert Path(cfg.data.root) == tmp_path / "data"
