"""Streaming tar shards (worldmodel/data/stream.py): written from a frame cache, read back as the
cache's clips, split across ranks and DataLoader workers with every clip read once per epoch,
placed at any global batch, resumed exactly in a training run, and corrupt shards handled."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_losses
from torch.utils.data import DataLoader

from worldmodel.config import ConfigError, validate
from worldmodel.data.dataset import ClipDataset
from worldmodel.data.shards import CacheWriter
from worldmodel.data.stream import (
    INDEX,
    ShardClips,
    ShardError,
    ShardStream,
    ShardWriter,
    main,
    write_from_cache,
)
from worldmodel.train.loop import train

SIZE = 16  # frame side of the synthetic episodes


def episodes(lengths: list[int], seed: int = 0, size: int = SIZE) -> list[tuple]:
    """Synthetic episodes: smooth random frames; actions are the global frame number, so a
    clip is named by `actions[0]`."""
    rng = np.random.default_rng(seed)
    out, frame = [], 0
    for n in lengths:
        coarse = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
        frames = coarse.repeat(4, axis=1).repeat(4, axis=2)  # (n, H, W, C)
        out.append((frames, np.arange(frame, frame + n, dtype=np.int64)))
        frame += n
    return out


def cache_of(folder: Path, eps: list[tuple], size: int = SIZE) -> Path:
    """A real frame cache (shards.py) holding `eps` as its train split and one val episode."""
    folder.mkdir(parents=True)
    writer = CacheWriter(folder, (size, size, 3))
    for frames, actions in eps:
        writer["train"].add_episode(frames, actions)
    writer["val"].add_episode(*episodes([12], seed=9, size=size)[0])
    writer.finish({"synthetic": True}, num_actions=None)
    return folder


def shard_folder(folder: Path, lengths: list[int], per_shard: int, compress: str = "none"):
    writer = ShardWriter(folder, per_shard, compress=compress)
    for frames, actions in episodes(lengths):
        writer.add_episode(frames, actions)
    return writer.finish()


def clip_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["actions"][:, 0].tolist()


def stream_batches(
    stream: ShardStream,
    start: int,
    rank: int,
    world: int,
    accum: int,
    batch: int,
    workers: int,
    n: int,
) -> list[list[int]]:
    """The first `n` micro-batches (as clip ids) one rank's DataLoader gives."""
    placed = stream.placed(start, batch, accum, rank, world, seed=3, num_workers=workers)
    loader = DataLoader(placed, batch_size=batch // (accum * world), num_workers=workers)
    out = []
    for b in loader:
        out.append(clip_ids(b))
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


# ---------------------------------------------------------------------------- format and writer


def test_shards_from_a_frame_cache_read_back_as_its_clips(tmp_path):
    eps = episodes([9, 3, 14, 7, 11, 5])
    cache = cache_of(tmp_path / "cache", eps)
    out = tmp_path / "shards"
    main(
        [
            "write",
            "--cache",
            str(cache),
            "--split",
            "train",
            "--out",
            str(out),
            "--shards",
            "3",
            "--compress",
            "zlib",
        ]
    )
    index = json.loads((out / INDEX).read_text())
    assert [len(s["episodes"]) for s in index["shards"]] and len(index["shards"]) == 3
    assert index["num_frames"] == 49 and index["num_episodes"] == 6
    assert [e["length"] for s in index["shards"] for e in s["episodes"]] == [9, 3, 14, 7, 11, 5]

    reference = ClipDataset(cache, "train", clip_length=4, frame_stride=2, clip_stride=2)
    clips = ShardClips(str(out / "*.tar"), clip_length=4, frame_stride=2, clip_stride=2)
    assert len(clips) == len(reference) > 0
    for i in range(len(reference)):
        a, b = reference[i], clips[i]
        assert a.keys() == b.keys() == {"video", "actions", "mask"}
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (i, k)
    assert clips[0]["video"].shape == (3, 4, SIZE, SIZE)

    with pytest.raises(FileExistsError, match="new folder"):
        write_from_cache(cache, "train", out, 3)
    with pytest.raises(ValueError, match="no 'test' split"):
        write_from_cache(cache, "test", tmp_path / "other", 3)


def test_bad_urls_and_missing_index_are_named(tmp_path):
    with pytest.raises(ValueError, match="remote shard URLs are not supported"):
        ShardClips("https://example.com/shard-{0..9}.tar", 2, 1, 1)
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        ShardClips(str(tmp_path / "*.tar"), 2, 1, 1)
    shard_folder(tmp_path / "s", [6, 6], per_shard=6)
    (tmp_path / "s" / INDEX).unlink()
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardClips(str(tmp_path / "s"), 2, 1, 1)
    shard_folder(tmp_path / "t", [6, 6], per_shard=6)
    with pytest.raises(ValueError, match=r"data.resolution=\[64, 64\]"):
        ShardStream(str(tmp_path / "t"), 2, resolution=(64, 64))
    cfg = compose_config(
        ["experiment=smoke_tokenizer", "data=shards", "data.urls=s3://bucket/shard-*.tar"]
    )
    with pytest.raises(ConfigError, match="data.urls=s3://bucket/shard-\\*.tar: remote"):
        validate(cfg)


# ----------------------------------------------------------------- ranks, workers and positions


@pytest.mark.parametrize("shuffle_shards", [1, 3])
def test_every_clip_once_per_epoch_across_2_ranks_and_2_workers(tmp_path, shuffle_shards):
    # 16 episodes of 7..12 frames in 8 shards; clip_length 3: 112 clips, 14 global batches of 8.
    lengths = [7, 9, 8, 12, 10, 7, 11, 8, 9, 7, 12, 10, 8, 9, 7, 10]
    index = shard_folder(tmp_path, lengths, per_shard=16)
    stream = ShardStream(str(tmp_path), clip_length=3, shuffle_shards=shuffle_shards)
    n, batch, accum, world = len(stream), 8, 2, 2
    assert n == sum(x - 2 for x in lengths) == 112 and len(stream.shards) == 8
    per_rank = n // batch * accum  # micro-batches per epoch per rank
    two_epochs = [
        stream_batches(stream, 0, r, world, accum, batch, 2, 2 * per_rank) for r in range(world)
    ]
    every = set(range(sum(lengths))) - {s for e in episodes(lengths) for s in e[1][-2:]}
    orders = []
    for epoch in range(2):
        got = [
            c
            for rank in two_epochs
            for mb in rank[epoch * per_rank : (epoch + 1) * per_rank]
            for c in mb
        ]
        assert len(got) == len(set(got)) == n and set(got) == every  # disjoint and complete
        orders.append(
            [c for mb in two_epochs[0][epoch * per_rank : (epoch + 1) * per_rank] for c in mb]
        )
    assert orders[0] != orders[1]  # each epoch has its own order
    # a rank's workers read contiguous pieces: each opens only a few of the 8 shards
    for rank in range(world):
        for worker in range(2):
            mbs = two_epochs[rank][worker:per_rank:2]
            firsts = {c for mb in mbs for c in mb}
            shard_of = np.searchsorted(
                np.cumsum([s["num_frames"] for s in index["shards"]]),
                sorted(firsts),
                side="right",
            )
            assert len(set(shard_of.tolist())) <= {1: 3, 3: 6}[shuffle_shards]


def test_a_stream_placed_at_a_global_batch_continues_the_same_order(tmp_path):
    shard_folder(tmp_path, [11, 6, 9, 13, 8, 10], per_shard=20)
    stream = ShardStream(str(tmp_path), clip_length=2, clip_stride=1)
    bpe = len(stream) // 4
    full = stream_batches(stream, 0, 1, 2, 1, 4, 2, bpe + 7)
    for start in (3, bpe - 1, bpe + 2):  # in the first epoch, across its end, in the second
        assert stream_batches(stream, start, 1, 2, 1, 4, 2, 5) == full[start : start + 5]
    # no workers: the same order as one worker
    assert stream_batches(stream, 0, 1, 2, 1, 4, 0, 9) == stream_batches(
        stream, 0, 1, 2, 1, 4, 1, 9
    )
    with pytest.raises(ValueError, match="fewer than one batch of 4096"):
        stream.placed(0, 4096)


# ----------------------------------------------------------------------------- corrupt shards


def test_a_corrupt_shard_stops_the_stream_or_is_skipped_and_counted(tmp_path, caplog):
    shard_folder(tmp_path, [8] * 8, per_shard=16)
    broken = tmp_path / "shard-00002.tar"
    data = bytearray(broken.read_bytes())
    data[1024:1200] = b"\x00" * 176  # a member's bytes overwritten: the size still matches
    broken.write_bytes(bytes(data))
    stream = ShardStream(str(tmp_path), clip_length=2)
    with pytest.raises(ShardError, match="shard-00002.tar"):
        stream_batches(stream, 0, 0, 1, 1, 8, 0, len(stream) // 8)

    skipping = ShardStream(str(tmp_path), clip_length=2, on_corrupt="skip")
    placed = skipping.placed(0, 8, seed=3)
    it = iter(DataLoader(placed, batch_size=8))
    with caplog.at_level(logging.WARNING, logger="worldmodel.data.stream"):
        got = [next(it) for _ in range(len(stream) // 8)]
    assert all(b["video"].shape == (8, 3, 2, SIZE, SIZE) for b in got)
    assert placed.corrupt_shards == {str(broken)}
    assert any("skipping" in r.message and "shard-00002.tar" in r.message for r in caplog.records)
    ids = {c for b in got for c in clip_ids(b)}
    assert not ids & set(range(32, 48))  # nothing from the broken shard's episodes
    # a truncated shard is caught by its size before it is opened
    broken.write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardError, match="bytes, the index says"):
        ShardClips(str(tmp_path), 2, 1, 1)[len(stream) // 2]


# ------------------------------------------------------------------- training on shards, resumed


SMOKE = [
    "experiment=smoke_tokenizer",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.log_every=1",
    "trainer.val_every=1000",
    "trainer.media_every=1000",
    "trainer.lr_schedule=constant",
    "trainer.num_workers=2",
    "trainer.val_batches=1",
    "data=shards",
    "~data.num_envs",  # the recipe's procgen recording settings
    "~data.train_frames",
    "~data.val_frames",
    "data.resolution=32",
    "data.clip_length=4",
]


def train_losses(run_dir: Path, overrides: list[str]) -> dict[int, float]:
    threads = torch.get_num_threads()
    try:
        train(validate(compose_config([*SMOKE, *overrides], run_dir=run_dir)))
    finally:
        torch.set_num_threads(threads)
    return logged_losses(run_dir)


def test_training_on_shards_stopped_and_resumed_gives_the_same_losses(tmp_path):
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    for folder, lengths, seed in ((train_dir, [10] * 12, 0), (val_dir, [8] * 2, 1)):
        writer = ShardWriter(folder, 20)
        for frames, actions in episodes(lengths, seed=seed, size=32):
            writer.add_episode(frames, actions)
        writer.finish()
    # 84 clips: an epoch is 10 batches of 8, so the 12 steps cross into the second epoch
    data = [f"data.urls={train_dir}/*.tar", f"data.val_urls={val_dir}"]
    full = train_losses(tmp_path / "full", [*data, "trainer.max_steps=12"])
    train_losses(tmp_path / "split", [*data, "trainer.max_steps=9"])
    resumed = train_losses(tmp_path / "split", [*data, "trainer.max_steps=12"])
    assert sorted(full) == sorted(resumed) == list(range(1, 13))
    assert all(resumed[s] == full[s] for s in range(10, 13)), (full, resumed)


@pytest.mark.slow  # two gloo processes in each of three runs: over 2 min on 2 busy cores
def test_two_gloo_ranks_on_shards_resume_exactly(tmp_path):
    # Each rank streams its own block of the epoch through one worker; stopped at step 2 and
    # resumed, the 2-rank run logs the losses the uninterrupted 2-rank run logged.
    train_dir = tmp_path / "train"
    writer = ShardWriter(train_dir, 20)
    for frames, actions in episodes([10] * 12, size=32):
        writer.add_episode(frames, actions)
    writer.finish()
    common = [f"data.urls={train_dir}", "trainer.devices=2", "trainer.num_workers=1"]
    full = train_losses(tmp_path / "full", [*common, "trainer.max_steps=4"])
    train_losses(tmp_path / "split", [*common, "trainer.max_steps=2"])
    resumed = train_losses(tmp_path / "split", [*common, "trainer.max_steps=4"])
    assert sorted(full) == sorted(resumed) == list(range(1, 5))
    assert all(resumed[s] == full[s] for s in (3, 4)), (full, resumed)
