"""`make bench`: one JSON line per case — ms per step, frames/s, params, GFLOP/s, peak memory.

Each case runs in a process of its own so that its peak RSS is its own. Shapes follow the peers'
published CPU figures (B=2, C=3, T=16, 64x64 for tokenizers), so ratios can be read side by side.

    python -m worldmodel.bench                       # every case
    python -m worldmodel.bench --cases tokenizer_train_bf16,loader
    python -m worldmodel.bench --overrides model.quantizer.kind=lfq
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from worldmodel.build import build_model
from worldmodel.config import instantiate
from worldmodel.data.clips import bundled_clips_folder
from worldmodel.data.decode import probe, read_frames
from worldmodel.data.stream import ShardWriter, read_shard
from worldmodel.play.browser import measure
from worldmodel.runtime import choose_threads
from worldmodel.world import World

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _timed(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _train_step(model: torch.nn.Module, batch: dict, bf16: bool) -> Callable[[], None]:
    """One optimizer step of `model.loss(batch)` (AdamW, optional bf16 autocast), as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _video(b: int = 2, t: int = 16, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, t, size, size) * 2 - 1  # (B, C, T, H, W)


# The demo tokenizer's design widened to the peers' parameter count (~14M): 4x patchify stem,
# width 256, 4 encoder and 8 decoder blocks at 16x16 (the same 16x16 token grid).
PEER_TOKENIZER = [
    "experiment=demo_tokenizer",
    "model.channels=[256]",
    "model.num_mid_blocks=4",
    "model.decoder_mid_blocks=8",
]


def case_tokenizer(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:

    base = PEER_TOKENIZER if "peer" in kind else []
    cfg = _compose(["model=tokenizer", *base, *overrides])
    model = build_model(cfg.model)
    video = _video()
    batch = {
        "video": video,
        "actions": torch.zeros(2, 16, dtype=torch.long),
        "mask": torch.ones(2, 16, dtype=torch.bool),
    }
    bf16 = kind.endswith("bf16")
    train_step = _train_step(model, batch, bf16)

    @torch.no_grad()
    def encode() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.tokenize(video)

    fn = encode if "encode" in kind else train_step
    return _video_case(model, video, fn, bf16, warmup, iters)


def case_loader(overrides: list[str], warmup: int, iters: int) -> dict:
    from torch.utils.data import DataLoader

    cfg = _compose(["experiment=demo_tokenizer", *overrides])
    train, _ = instantiate(cfg.data).datasets()
    batch_size = int(cfg.trainer.batch_size)
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, num_workers=int(cfg.trainer.num_workers)
    )
    it = iter(loader)
    times = _timed(lambda: next(it), warmup, iters)
    med = statistics.median(times)
    return {
        "ms": med * 1e3,
        "clips_per_s": batch_size / med,
        "batch_size": batch_size,
        "clip_length": int(cfg.data.clip_length),
        "num_workers": int(cfg.trainer.num_workers),
    }


def _summary(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"ms": med * 1e3, "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3}


def _video_case(
    model: torch.nn.Module,
    video: torch.Tensor,
    fn: Callable[[], object],
    bf16: bool,
    warmup: int,
    iters: int,
) -> dict:
    """Time `fn` (a step over the clips `video` (B, C, T, H, W)): ms, frames/s, size, GFLOP."""
    flops = _flops(fn)
    times = _timed(fn, warmup, iters)
    med = statistics.median(times)
    return {
        **_summary(times),
        "frames_per_s": video.shape[0] * video.shape[2] / med,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop": flops / 1e9,
        "gflop_per_s": flops / 1e9 / med,
        "shape": list(video.shape),
        "precision": "bf16" if bf16 else "fp32",
    }


# The peers' published sizes: open-genie's DynamicsModel (4 space-time layers, d=256, 16 frames of
# 16x16 tokens, vocabulary 1024, 8 actions) and its LatentAction input (2, 3, 16, 64, 64).
PEER_DYNAMICS = [
    "model=dynamics",
    "model.dim=256",
    "model.depth=4",
    "model.heads=4",
    "model.grid=[16,16]",
    "model.vocab_size=1024",
    "model.num_actions=8",
    "model.max_frames=17",
]
# The demo's world: its tokenizer stage (conf/experiment/demo.yaml) and dynamics stage.
DEMO_TOKENIZER = [
    "experiment=demo_tokenizer",
    "model.spatial_downsample=8",
    "model.channels=[64,128]",
    "model.quantizer.levels=[8,5,5,5]",
]
DEMO_DYNAMICS = ["model=dynamics", "model.num_actions=15"]


def case_lam(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:

    cfg = _compose(["model=lam", *overrides])
    model = build_model(cfg.model)
    video = _video()  # (2, 3, 16, 64, 64): open-genie's LAM case
    batch = {"video": video, "mask": torch.ones(2, 16, dtype=torch.bool)}
    bf16 = kind.endswith("bf16")
    return _video_case(model, video, _train_step(model, batch, bf16), bf16, warmup, iters)


def case_dynamics(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    """Training step at batch 2 over 16 frames, or one new frame after 16 context frames with
    8 MaskGIT steps and the KV cache (batch 1), at open-genie's sizes."""

    cfg = _compose([*PEER_DYNAMICS, *overrides])
    model = build_model(cfg.model)
    h, w = model.grid
    bf16 = kind.endswith("bf16")
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if kind.startswith("train"):
        b, t = 2, 16
        batch = {
            "tokens": torch.randint(0, model.vocab_size, (b, t, h, w)),
            "actions": torch.randint(0, model.num_actions, (b, t)),
            "mask": torch.ones(b, t, dtype=torch.bool),
        }
        fn = _train_step(model, batch, bf16)

    else:
        model.eval()
        context = torch.randint(0, model.vocab_size, (1, 16, h, w))
        actions = torch.randint(0, model.num_actions, (1, 16))

        @torch.no_grad()
        def fn() -> None:
            with amp:
                cache = model.new_cache(context, actions[:, :15])  # the context, cached once
                start = time.perf_counter()
                model.generate_next(context, actions, steps=8, cache=cache)
                fn.generate_s.append(time.perf_counter() - start)  # type: ignore[attr-defined]

        fn.generate_s = []  # type: ignore[attr-defined]
    flops = _flops(fn)
    times = _timed(fn, warmup, iters)
    out = {
        **_summary(times),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop": flops / 1e9,
        "tokens": [16, h, w],
        "precision": "bf16" if bf16 else "fp32",
    }
    if not kind.startswith("train"):  # the new frame alone, the context's one-off cache excluded
        gen = fn.generate_s[-iters:]  # type: ignore[attr-defined]
        out.update({f"frame_{k}": v for k, v in _summary(gen).items()})
    return out


# VAR beside the MaskGIT dynamics model at conf/model/dynamics.yaml's sizes (8x8 grid, d=128 x 4
# layers, 4 heads, 16-frame window, 1000 codes), 15 true actions: the same grid, width, depth.
VAR_VS_MASKGIT = ["model.num_actions=15"]


def case_var(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    """Per-frame generation, VAR (one network pass per scale: 1x1, 2x2, 4x4, 8x8) beside the
    MaskGIT dynamics model (8 steps) at the same grid, width, depth and window, batch 1. Each
    measured call is the steady state of play: the cache holds 14 context frames and the frame
    generated after them (built before the clock starts), and the call commits that frame and
    samples the next one. Passes are the transformer's forward calls during the measured call
    (MaskGIT: 1 to commit + 8 steps; VAR: the commit rides in the first scale's pass). The two
    models alternate call by call so both see the same machine load. Random weights: the cost
    does not depend on them."""
    dyn_cfg = _compose(["model=dynamics", *VAR_VS_MASKGIT, *overrides])
    m = dyn_cfg.model
    same = [f"model.grid=[{m.grid[0]},{m.grid[1]}]", f"model.max_frames={m.max_frames}"]
    same += [f"model.{k}={m[k]}" for k in ("dim", "depth", "heads", "num_actions")]
    var_cfg = _compose(["model=var", *same, f"model.codebook_size={m.vocab_size}", *overrides])
    models = {"maskgit": build_model(dyn_cfg.model).eval(), "var": build_model(var_cfg.model)}
    models["var"].eval()
    bf16 = kind.endswith("bf16")
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    t = int(m.max_frames) - 2  # context frames; the measured call generates frame t + 1
    actions = torch.randint(0, int(m.num_actions), (1, t + 1))
    passes = {name: [0] for name in models}
    for name, model in models.items():
        count = passes[name]
        model.transformer.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
    h, w = m.grid
    contexts = {
        "maskgit": torch.randint(0, int(m.vocab_size), (1, t, h, w)),
        "var": torch.randint(0, int(m.vocab_size), (1, t, 1, models["var"].code_len)),
    }
    steps = {"maskgit": 8, "var": 1}

    @torch.no_grad()
    def frame(name: str) -> tuple[float, int]:
        model, context = models[name], contexts[name]
        with amp:
            cache = model.new_cache(context, actions[:, : t - 1])
            new = model.generate_next(context, actions[:, :t], steps=steps[name], cache=cache)
            grown = torch.cat([context, new[:, None]], dim=1)
            passes[name][0] = 0
            start = time.perf_counter()
            model.generate_next(grown, actions, steps=steps[name], cache=cache)
            return time.perf_counter() - start, passes[name][0]

    times: dict[str, list[float]] = {name: [] for name in models}
    counted: dict[str, int] = {}
    for i in range(warmup + iters):
        for name in models:
            seconds, counted[name] = frame(name)
            if i >= warmup:
                times[name].append(seconds)
    out: dict = {"grid": [h, w], "dim": int(m.dim), "depth": int(m.depth), "context_frames": t}
    out["var_scales"] = [list(s) for s in models["var"].scales]
    for name, model in models.items():
        med = statistics.median(times[name])
        out[name] = {
            "passes_per_frame": counted[name],
            "frame_ms": med * 1e3,
            "frame_ms_min": min(times[name]) * 1e3,
            "frames_per_s": 1.0 / med,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        }
    out["var_speedup"] = out["maskgit"]["frame_ms"] / out["var"]["frame_ms"]
    out["precision"] = "bf16" if bf16 else "fp32"
    return out


def case_muse(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    """Per-frame generation, Muse's cascade (`steps` MaskGIT steps on the 8x8 coarse codes, then
    `fine_steps` on the 16x16 tokens) beside the direct fine-grid MaskGIT (8 steps on 16x16) at
    the same width, heads, window and 15 true actions, the direct model as deep as the cascade's
    base stage (experiment=compare's muse and dynamics_fine stages; `--overrides` size the
    cascade, e.g. model.dim=64,model.base_depth=2,model.sr_depth=1 for experiment=muse_vs_fine).
    Batch 1; each measured call is the steady state of play: the cache holds the context and the
    frame generated after it (built before the clock starts), and the call commits that frame and
    samples the next. The two models alternate call by call so both see the same machine load.
    Random weights: the cost does not depend on them."""
    muse_cfg = _compose(["model=muse", "model.max_frames=9", *overrides])
    m = muse_cfg.model
    same = [f"model.grid=[{m.grid[0]},{m.grid[1]}]", f"model.depth={m.base_depth}"]
    same += [f"model.{k}={m[k]}" for k in ("dim", "heads", "num_actions", "max_frames")]
    dyn_cfg = _compose(["model=dynamics", *same, f"model.vocab_size={m.vocab_size}"])
    models = {"muse": build_model(m).eval(), "fine": build_model(dyn_cfg.model).eval()}
    bf16 = kind.endswith("bf16")
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    t = int(m.max_frames) - 2  # context frames; the measured call generates frame t + 1
    h, w = m.grid
    context = torch.randint(0, int(m.vocab_size), (1, t, h, w))
    actions = torch.randint(0, int(m.num_actions), (1, t + 1))

    @torch.no_grad()
    def frame(name: str) -> float:
        model = models[name]
        with amp:
            cache = model.new_cache(context, actions[:, : t - 1])
            new = model.generate_next(context, actions[:, :t], steps=8, cache=cache)
            grown = torch.cat([context, new[:, None]], dim=1)
            start = time.perf_counter()
            model.generate_next(grown, actions, steps=8, cache=cache)
            return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + iters):
        for name in models:
            seconds = frame(name)
            if i >= warmup:
                times[name].append(seconds)
    out: dict = {"grid": [h, w], "coarse_grid": list(m.coarse_grid), "context_frames": t}
    out["steps"] = {"muse": [8, int(m.fine_steps)], "fine": 8}
    for name, model in models.items():
        med = statistics.median(times[name])
        out[name] = {
            "frame_ms": med * 1e3,
            "frame_ms_min": min(times[name]) * 1e3,
            "frames_per_s": 1.0 / med,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        }
    out["muse_speedup"] = out["fine"]["frame_ms"] / out["muse"]["frame_ms"]
    out["precision"] = "bf16" if bf16 else "fp32"
    return out


def case_play(overrides: list[str], warmup: int, iters: int) -> dict:
    """Interactive play at the demo's sizes: one action -> next frame (MaskGIT with the KV cache,
    `play.steps` iterations) -> decoded picture, as `task=play` runs it. Random weights: the cost
    does not depend on them."""
    tok_cfg = _compose([*DEMO_TOKENIZER, *overrides])
    dyn_cfg = _compose([*DEMO_DYNAMICS, *overrides])
    tokenizer = build_model(tok_cfg.model).eval()
    dynamics = build_model(dyn_cfg.model).eval()
    steps = int(dyn_cfg.play.steps)
    precision = str(dyn_cfg.play.precision)
    session = World(
        tokenizer, dynamics, None, "true", dyn_cfg, {"tokenizer": tok_cfg}, "cpu", precision
    )
    session.configure(steps=steps)
    session.reset(np.zeros((*session.frame_size, 3), dtype=np.uint8))
    n = max(iters, 2 * dynamics.max_frames)  # long enough to slide the window
    with torch.no_grad():
        times = _timed(lambda: session.step(0), warmup, n)
    med = statistics.median(times)
    return {
        **_summary(times),
        "frames_per_s": 1.0 / med,
        "frames_per_s_mean": len(times) / sum(times),
        "maskgit_steps": steps,
        "precision": precision,
        "grid": list(dynamics.grid),
        "params_m": sum(p.numel() for p in dynamics.parameters()) / 1e6,
    }


# MaskGIT steps the page is measured at: `make play`'s (the first: its headline figure), then more
WEB_STEPS = [2, 4, 1]


def case_play_web(overrides: list[str], warmup: int, iters: int) -> dict:
    """The play page with the shipped demo world in headless Chromium (`make play`'s server):
    frames/s from key press to frame drawn as the page measures it, median over 20 presses (or
    `iters`) after 2 warm-up presses, at each of `WEB_STEPS`. Needs Debian's chromium."""
    world = CONF.parent / "experiments" / "demo" / "world.safetensors"
    presses = max(20, iters)
    result = measure(world, WEB_STEPS, presses, overrides)
    by_steps = result["by_steps"]
    headline = by_steps[str(WEB_STEPS[0])]
    return {
        "frames_per_s": headline["frames_per_s"],
        "ms": headline["ms"],
        "maskgit_steps": WEB_STEPS[0],
        **{f"frames_per_s_steps{k}": v["frames_per_s"] for k, v in by_steps.items()},
        "presses": presses,
        "measured": "keydown -> frame drawn, in the page",
    }


# phenaki-pytorch's published CPU case: CViViT dim 256, 8x8 patches, temporal patch 2, 4 + 4
# spatial / temporal layers (heads 4 x 64), LFQ with 1024 codes, on (2, 3, 17, 64, 64); its
# MaskGit d=256 x 4 over 9 latent frames of 8x8 tokens (576 tokens).
PEER_CVIVIT = [
    "model=tokenizer_cvivit",
    "model.dim=256",
    "model.heads=4",
    "model.spatial_downsample=8",
    "model.temporal_downsample=2",
    "model.spatial_depth=4",
    "model.temporal_depth=4",
    "model.max_frames=9",
    "~model.quantizer",
    "+model.quantizer={kind: lfq, codebook_size: 1024}",
]
PEER_PHENAKI = [
    "model=phenaki",
    "model.dim=256",
    "model.depth=4",
    "model.heads=4",
    "model.vocab_size=1024",
    "model.grid=[8,8]",
    "model.max_frames=9",
]


def case_cvivit(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    """C-ViViT training step or encoding at phenaki-pytorch's sizes, on (2, 3, 17, 64, 64)."""

    cfg = _compose([*PEER_CVIVIT, *overrides])
    model = build_model(cfg.model)
    video = _video(t=17)
    bf16 = kind.endswith("bf16")
    batch = {"video": video, "mask": torch.ones(2, 17, dtype=torch.bool)}
    if kind.startswith("train"):
        fn = _train_step(model, batch, bf16)
    else:
        model.eval()

        @torch.no_grad()
        def fn() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.tokenize(video)

    return _video_case(model, video, fn, bf16, warmup, iters)


def case_phenaki(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    """Phenaki sampling at phenaki-pytorch's sizes (8 MaskGIT steps, batch 1, guidance off):
    `sample`: a 17-frame clip from text (9 latent frames, 576 tokens) decoded by the peer-size
    C-ViViT; `continue_cached` / `continue_full`: a long video's next latent frame (2 frames)
    primed on the 8 latent frames before it -- prime frames encoded once, or the whole clip at
    every step (the reference path, what a model without the cache runs)."""

    tokenizer = build_model(_compose([*PEER_CVIVIT, *overrides]).model).eval()
    model = build_model(_compose([*PEER_PHENAKI, *overrides]).model).eval()
    text = model.encode_text(["coinrun, moving right"])
    bf16 = kind.endswith("bf16")
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    prime = torch.randint(0, model.vocab_size, (1, 8, *model.grid))
    decode_s: list[float] = []

    @torch.no_grad()
    def fn() -> None:
        with amp:
            if kind.startswith("sample"):
                tokens = model.sample(text, 9, steps=8)  # (1, 9, 8, 8)
                start = time.perf_counter()
                tokenizer.detokenize(tokens)  # (1, 3, 17, 64, 64)
                decode_s.append(time.perf_counter() - start)
            else:
                model.sample(text, 9, prime, steps=8, use_cache=kind.startswith("continue_cached"))

    flops = _flops(fn)
    times = _timed(fn, warmup, iters)
    out = {
        **_summary(times),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop": flops / 1e9,
        "latent_frames": 9,
        "new_latent_frames": 9 if kind.startswith("sample") else 1,
        "maskgit_steps": 8,
        "precision": "bf16" if bf16 else "fp32",
    }
    if decode_s:
        out["decode_ms"] = statistics.median(decode_s[-iters:]) * 1e3
    return out


def case_contention(overrides: list[str], warmup: int, iters: int) -> dict:
    """The demo tokenizer's bf16 train step on an idle machine, then beside one CPU-bound
    process: with the threads fixed at the idle choice, and with the threads chosen for the
    busy machine (`runtime.choose_threads`, as `trainer.threads: null` does). The ratios are
    the busy rate over the idle rate (1.0 = no slowdown)."""
    cfg = _compose(["experiment=demo_tokenizer", *overrides])
    model = build_model(cfg.model)
    video = _video(b=16, t=1)
    batch = {"video": video, "mask": torch.ones(16, 1, dtype=torch.bool)}
    step = _train_step(model, batch, bf16=True)

    def rate(threads: int) -> float:
        torch.set_num_threads(threads)
        return 1.0 / statistics.median(_timed(step, warmup, iters))

    idle_threads = choose_threads()
    idle = rate(idle_threads)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        fixed = rate(idle_threads)
        chosen_threads = choose_threads()
        chosen = rate(chosen_threads)
    finally:
        busy.kill()
        busy.wait()
    return {
        "idle_steps_per_s": idle,
        "idle_threads": idle_threads,
        "busy_fixed_steps_per_s": fixed,
        "busy_chosen_steps_per_s": chosen,
        "busy_chosen_threads": chosen_threads,
        "busy_fixed_vs_idle": fixed / idle,
        "busy_chosen_vs_idle": chosen / idle,
    }


def case_decode(overrides: list[str], warmup: int, iters: int) -> dict:
    """Decoding real h264 clips to RGB uint8 frames (the bundled 272x640 and 720x1280 clips):
    PyAV through `data/decode.py` (what the sources use) beside decord, every frame and every
    3rd frame (as `data.fps` resampling asks), both in batches of 64 frames as the video folder
    reads them (`decode_batch`; a whole 720p clip in one array is 365 MB, whose allocation
    would be timed instead of the decoder). Runs alternate between the decoders so both see the
    same machine load; frames/s are medians of `iters` runs, and `identical` says whether both
    returned the same pixels."""
    try:
        import decord  # the comparison only: the sources decode with PyAV
    except ImportError:
        decord = None
    batch = 64
    out: dict = {}
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        path = bundled_clips_folder() / name
        count = probe(path).num_frames
        for label, idx in (("all", np.arange(count)), ("every_3rd", np.arange(0, count, 3))):

            def pyav(idx: np.ndarray = idx, path: Path = path) -> list[np.ndarray]:
                return list(read_frames(path, idx, batch))  # [(n, H, W, 3)]

            def by_decord(idx: np.ndarray = idx, path: Path = path) -> list[np.ndarray]:
                decord.bridge.set_bridge("native")
                reader = decord.VideoReader(str(path))
                chunks = [idx[i : i + batch].tolist() for i in range(0, len(idx), batch)]
                return [reader.get_batch(c).asnumpy() for c in chunks]  # [(n, H, W, 3)]

            runs = {"pyav": pyav} if decord is None else {"pyav": pyav, "decord": by_decord}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for i in range(warmup + iters):
                for key, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    if i >= warmup:
                        times[key].append(time.perf_counter() - t0)
            row: dict = {"frames": len(idx)}
            for key, ts in times.items():
                row[f"{key}_frames_per_s"] = len(idx) / statistics.median(ts)
            if decord is not None:
                row["pyav_vs_decord"] = row["pyav_frames_per_s"] / row["decord_frames_per_s"]
                same = zip(pyav(), by_decord(), strict=True)
                row["identical"] = all(np.array_equal(a, b) for a, b in same)
            out[f"{name.split('.')[0]}_{label}"] = row
    out["decord"] = decord.__version__ if decord is not None else "not installed"
    return out


# The streaming case's data: 1M frames of 64x64 in 100 shards (env vars shrink it for a quick run).
STREAM_FRAMES = int(os.environ.get("WORLDMODEL_BENCH_STREAM_FRAMES", 1_000_000))
STREAM_COMPRESS = os.environ.get("WORLDMODEL_BENCH_STREAM_COMPRESS", "zlib")
STREAM_WORKERS = int(os.environ.get("WORLDMODEL_BENCH_STREAM_WORKERS", 1))
STREAM_SHARDS = 100


def _synthetic_episode(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """A game-like episode (n, H, W, 3) uint8: a map of 6 textured 8x8 tile kinds scrolling one
    pixel every other frame under an 8x8 sprite on a random walk. zlib (level 1) shrinks it
    about 12x, as it does CoinRun on its plain backdrop (7-9x with the picture backdrops)."""
    palette = rng.integers(0, 256, (6, 1, 1, 3))
    texture = np.clip(palette + rng.integers(-24, 25, (6, 8, 8, 3)), 0, 255).astype(np.uint8)
    tiles = rng.integers(0, 6, (size // 8, (size + n // 2) // 8 + 1))
    canvas = rearrange(texture[tiles], "y x h w c -> (y h) (x w) c")  # (H, W + n/2, 3)
    frames = np.stack([canvas[:, t // 2 : t // 2 + size] for t in range(n)])  # (n, H, W, 3)
    pos = np.clip(np.cumsum(rng.integers(-2, 3, (n, 2)), axis=0) + size // 2, 0, size - 8)
    sprite = rng.integers(0, 256, 3, dtype=np.uint8)
    for t, (y, x) in enumerate(pos):
        frames[t, y : y + 8, x : x + 8] = sprite
    return frames


def case_stream(overrides: list[str], warmup: int, iters: int) -> dict:
    """Streaming shards (`data=shards`) feeding the demo's tokenizer stage (its overrides in
    conf/experiment/demo.yaml: batch 16 clips of 2 frames, 64x64, bf16). Writes
    `STREAM_FRAMES` synthetic frames into `STREAM_SHARDS` tar shards (zlib by default) in a
    temporary folder, deleted after. Times, side by side in alternating rounds, the model's
    train step on a fixed batch and the same step fed by a DataLoader with `STREAM_WORKERS`
    workers; `loader_share` is the time spent waiting for batches over the fed step time,
    `loader_share_with_shard_loads` adds one shard's decoding spread over the micro-batches a
    shard gives (a worker decodes a whole shard when it reaches it)."""
    stages = OmegaConf.load(CONF / "experiment" / "demo.yaml").stages
    stage = [o for o in stages.tokenizer.overrides if not o.startswith("trainer.max_minutes")]
    folder = Path(tempfile.mkdtemp(prefix="worldmodel-bench-stream-"))
    try:
        episode = min(1000, max(16, STREAM_FRAMES // STREAM_SHARDS))
        rng = np.random.default_rng(0)
        writer = ShardWriter(folder, STREAM_FRAMES // STREAM_SHARDS, compress=STREAM_COMPRESS)
        t0 = time.perf_counter()
        for _ in range(STREAM_FRAMES // episode):
            writer.add_episode(_synthetic_episode(rng, episode))
        index = writer.finish()
        write_s = time.perf_counter() - t0
        disk = sum(s["bytes"] for s in index["shards"])

        cfg = _compose([*stage, "data=shards", f"data.urls={folder}", *overrides])
        model = build_model(cfg.model)
        source = instantiate(cfg.data)
        stream = source.stream()
        batch_size = int(cfg.trainer.batch_size)
        bf16 = cfg.trainer.precision == "bf16"
        placed = stream.placed(0, batch_size, num_workers=STREAM_WORKERS)
        loader = DataLoader(
            placed,
            batch_size=batch_size,
            num_workers=STREAM_WORKERS,
            persistent_workers=STREAM_WORKERS > 0,
        )
        it = iter(loader)
        fixed = next(it)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(batch: dict) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model.loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(max(warmup, 3)):
            step(next(it))
        n = max(iters, 10)  # steps per round and kind
        alone, fed, wait = [], [], []
        for _ in range(3):  # alternating rounds: both see the same machine load
            alone += _timed(lambda: step(fixed), 0, n)
            for _ in range(n):
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                step(batch)
                fed.append(time.perf_counter() - t0)
                wait.append(t1 - t0)
        drain = _timed(lambda: next(it), 0, 3 * n)  # the loader alone, no model beside it
        shard_s = _timed(lambda: read_shard(stream.shards[0], stream.frame_shape()), 0, 3)
        per_shard = int(stream.shard_clips[0]) // batch_size  # micro-batches one shard gives
        load_per_step = statistics.median(shard_s) / max(per_shard, 1)
        return {
            "frames": index["num_frames"],
            "shards": len(index["shards"]),
            "compress": STREAM_COMPRESS,
            "disk_mb": disk / 2**20,
            "raw_mb": index["num_frames"] * 64 * 64 * 3 / 2**20,
            "write_s": write_s,
            "write_frames_per_s": index["num_frames"] / write_s,
            "batch": list(fixed["video"].shape),
            "num_workers": STREAM_WORKERS,
            "step_ms": statistics.median(alone) * 1e3,
            "fed_step_ms": statistics.median(fed) * 1e3,
            "wait_ms": statistics.median(wait) * 1e3,
            "wait_ms_mean": statistics.mean(wait) * 1e3,
            "loader_share": sum(wait) / sum(fed),
            "fed_vs_alone": statistics.median(fed) / statistics.median(alone),
            "loader_alone_clips_per_s": batch_size / statistics.median(drain),
            "shard_decode_s": statistics.median(shard_s),
            "loader_share_with_shard_loads": (sum(wait) / len(wait) + load_per_step)
            / (sum(fed) / len(fed) + load_per_step),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Perceiver AR at its config's width and depth (d=128, 4 latent blocks, 4 heads) over 8x8 tokens
# per frame, vocabulary 1024; the full-attention baseline is the same module with the latent
# window as long as the context (its cross-attend layer then is plain causal self-attention: a
# causal transformer of depth + 1 layers over every position, with a GPT's KV cache).
PERCEIVER_AR = [
    "model=perceiver_ar",
    "model.vocab_size=1024",
    "model.num_actions=15",
    "model.grid=[8,8]",
    "model.random_context=false",  # every step over the whole context
]
PERCEIVER_AR_FRAMES = [
    int(f) for f in os.environ.get("WORLDMODEL_BENCH_PAR_FRAMES", "16,32,64,128").split(",")
]


def _perceiver_ar_step(model: torch.nn.Module, kind: str, frames: int) -> Callable[[], float]:
    """A closure that runs one measured step and returns its seconds (counting FLOPs in it
    while `_PERCEIVER_AR_COUNTER.active`). `train`: an optimizer step at batch 1 over `frames`
    frames. `generate`: one new frame (greedy) with a cache that already holds the context but
    its last frame: that frame is committed and the next one's tokens are sampled; bringing
    the cache there is done before the clock starts."""
    h, w = model.grid
    tokens = torch.randint(0, model.vocab_size, (1, frames, h, w))
    actions = torch.randint(0, model.num_actions, (1, frames))
    if kind == "train":
        step = _train_step(model, {"tokens": tokens, "actions": actions}, bf16=False)

        def train() -> float:
            start = time.perf_counter()
            with _PERCEIVER_AR_COUNTER:
                step()
            return time.perf_counter() - start

        return train
    model.eval()
    t = frames - 2  # context frames before the measured call; it generates frame frames - 1

    @torch.no_grad()
    def generate() -> float:
        cache = model.new_cache(tokens[:, :t], actions[:, : t - 1])
        model.generate_next(tokens[:, :t], actions[:, :t], temperature=0, cache=cache)
        start = time.perf_counter()
        with _PERCEIVER_AR_COUNTER:
            model.generate_next(tokens[:, : t + 1], actions[:, : t + 1], temperature=0, cache=cache)
        return time.perf_counter() - start

    return generate


def _cpu_attention_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode does not know: torch's
    count for attention, halved for a causal call (the kernel skips the blocks above the
    diagonal). An explicit mask is counted in full."""
    from torch.utils import flop_counter

    flops = flop_counter.sdpa_flop_count(q, k, v)
    return flops // 2 if is_causal else flops


def _cpu_attention_backward_flops(grad, q, k, v, out, lse, dropout_p, is_causal, *a, **kw) -> int:
    from torch.utils import flop_counter

    flops = flop_counter.sdpa_backward_flop_count(grad, q, k, v)
    return flops // 2 if is_causal else flops


class _Counter:
    """A context that counts FLOPs (attention on the CPU included) while `active`, else does
    nothing, so a closure counts the part it times and not its set-up."""

    def __init__(self) -> None:
        self.active = False
        self.flops = 0.0
        self._mode = None

    def __enter__(self) -> None:
        if self.active:
            from torch.utils.flop_counter import FlopCounterMode

            aten = torch.ops.aten
            mapping = {
                aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: (
                    _cpu_attention_backward_flops
                ),
            }
            self._mode = FlopCounterMode(display=False, custom_mapping=mapping)
            self._mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.flops = float(self._mode.get_total_flops())
            self._mode = None


_PERCEIVER_AR_COUNTER = _Counter()


def case_perceiver_ar(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    """Perceiver AR beside full causal attention over the same context, at each context length
    of `PERCEIVER_AR_FRAMES` (frames of 8x8 tokens: 128 frames = 8192 positions), timed side by
    side in 3 alternating rounds of `iters` (medians; fp32, batch 1). GFLOP are counted
    (FlopCounterMode, with the CPU attention kernel), so their ratio does not depend on the
    machine's load."""
    out: dict = {"precision": "fp32", "batch": 1, "tokens_per_frame": 64, "contexts": []}
    for frames in PERCEIVER_AR_FRAMES:
        fns, entry = {}, {"frames": frames, "positions": frames * 64}
        for variant, window in (("perceiver", None), ("full", frames * 64)):
            extra = [] if window is None else [f"model.latent_window={window}"]
            cfg = _compose([*PERCEIVER_AR, f"model.max_frames={frames}", *extra, *overrides])
            torch.manual_seed(0)
            model = build_model(cfg.model)
            fns[variant] = _perceiver_ar_step(model, kind, frames)
            entry[f"{variant}_window"] = model.latent_window
            entry[f"{variant}_params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
            _PERCEIVER_AR_COUNTER.active = True
            fns[variant]()
            _PERCEIVER_AR_COUNTER.active = False
            entry[f"{variant}_gflop"] = _PERCEIVER_AR_COUNTER.flops / 1e9
        times: dict[str, list[float]] = {"perceiver": [], "full": []}
        for name in times:
            for _ in range(warmup):
                fns[name]()
        for _ in range(3):  # alternating rounds: both see the same machine load
            for name in times:
                times[name] += [fns[name]() for _ in range(iters)]
        for name, t in times.items():
            entry[f"{name}_ms"] = statistics.median(t) * 1e3
            entry[f"{name}_ms_min"] = min(t) * 1e3
        entry["full_over_perceiver_ms"] = entry["full_ms"] / entry["perceiver_ms"]
        entry["full_over_perceiver_gflop"] = entry["full_gflop"] / entry["perceiver_gflop"]
        out["contexts"].append(entry)
    return out


def case_teco(overrides: list[str], warmup: int, iters: int) -> dict:
    """TECO's cost per generated frame against the length of the video so far, at
    conf/model/teco.yaml's sizes (8x8 grid, 8 MaskGIT steps, batch 1, fp32): with the cache
    (the temporal transformer's keys/values of the last `state_window` frames, built before the
    clock starts over all but the newest frame; the call commits that frame, one temporal
    position, then runs the prior 8 times) and without (the temporal transformer re-run over
    the whole video). The two alternate call by call so both see the same machine load. Random
    weights: the cost does not depend on them."""
    cfg = _compose(["model=teco", *overrides])
    model = build_model(cfg.model).eval()
    h, w = model.grid

    @torch.no_grad()
    def call(video: torch.Tensor, actions: torch.Tensor, cached: bool) -> float:
        cache = model.new_cache(video[:, :-1], actions[:, :-2]) if cached else None
        start = time.perf_counter()
        model.generate_next(video, actions, steps=8, cache=cache, use_cache=cached)
        return time.perf_counter() - start

    out: dict = {"grid": [h, w], "state_window": model.state_window, "contexts": []}
    for length in (16, 64, 256, 1024):
        video = torch.randint(0, model.codebook_size, (1, length, h, w))  # (1, T, h, w)
        actions = torch.randint(0, model.num_actions, (1, length))  # (1, T)
        times: dict[str, list[float]] = {"cached": [], "uncached": []}
        for i in range(warmup + iters):
            for name in times:
                seconds = call(video, actions, name == "cached")
                if i >= warmup:
                    times[name].append(seconds)
        entry = {"frames_so_far": length}
        for name, t in times.items():
            entry[f"{name}_ms"] = statistics.median(t) * 1e3
            entry[f"{name}_ms_min"] = min(t) * 1e3
        out["contexts"].append(entry)
    out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


CASES: dict[str, Callable[[list[str], int, int], dict]] = {
    "tokenizer_train_fp32": lambda o, w, i: case_tokenizer("train_fp32", o, w, i),
    "tokenizer_train_bf16": lambda o, w, i: case_tokenizer("train_bf16", o, w, i),
    "tokenizer_encode_bf16": lambda o, w, i: case_tokenizer("encode_bf16", o, w, i),
    "tokenizer_peer_size_train_fp32": lambda o, w, i: case_tokenizer("peer_train_fp32", o, w, i),
    "tokenizer_peer_size_train_bf16": lambda o, w, i: case_tokenizer("peer_train_bf16", o, w, i),
    "tokenizer_peer_size_encode_bf16": lambda o, w, i: case_tokenizer("peer_encode_bf16", o, w, i),
    "loader": case_loader,
    "lam_train_fp32": lambda o, w, i: case_lam("train_fp32", o, w, i),
    "lam_train_bf16": lambda o, w, i: case_lam("train_bf16", o, w, i),
    "dynamics_train_fp32": lambda o, w, i: case_dynamics("train_fp32", o, w, i),
    "dynamics_train_bf16": lambda o, w, i: case_dynamics("train_bf16", o, w, i),
    "dynamics_generate_fp32": lambda o, w, i: case_dynamics("generate_fp32", o, w, i),
    "dynamics_generate_bf16": lambda o, w, i: case_dynamics("generate_bf16", o, w, i),
    "var_vs_maskgit_generate_fp32": lambda o, w, i: case_var("generate_fp32", o, w, i),
    "muse_vs_fine_generate_fp32": lambda o, w, i: case_muse("generate_fp32", o, w, i),
    "muse_vs_fine_generate_bf16": lambda o, w, i: case_muse("generate_bf16", o, w, i),
    "play_demo": case_play,
    "play_web": case_play_web,
    "contention": case_contention,
    "stream": case_stream,
    "decode": case_decode,
    "cvivit_train_fp32": lambda o, w, i: case_cvivit("train_fp32", o, w, i),
    "cvivit_train_bf16": lambda o, w, i: case_cvivit("train_bf16", o, w, i),
    "cvivit_encode_fp32": lambda o, w, i: case_cvivit("encode_fp32", o, w, i),
    "cvivit_encode_bf16": lambda o, w, i: case_cvivit("encode_bf16", o, w, i),
    "phenaki_sample_fp32": lambda o, w, i: case_phenaki("sample_fp32", o, w, i),
    "phenaki_sample_bf16": lambda o, w, i: case_phenaki("sample_bf16", o, w, i),
    "phenaki_continue_cached_fp32": lambda o, w, i: case_phenaki("continue_cached_fp32", o, w, i),
    "phenaki_continue_cached_bf16": lambda o, w, i: case_phenaki("continue_cached_bf16", o, w, i),
    "phenaki_continue_full_fp32": lambda o, w, i: case_phenaki("continue_full_fp32", o, w, i),
    "perceiver_ar_train": lambda o, w, i: case_perceiver_ar("train", o, w, i),
    "perceiver_ar_generate": lambda o, w, i: case_perceiver_ar("generate", o, w, i),
    "teco_generate": case_teco,
}


def run_one(name: str, overrides: list[str], warmup: int, iters: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Python + torch
    result = CASES[name](overrides, warmup, iters)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": name,
        **result,
        "peak_rss_mb": peak_mb,
        "case_rss_mb": peak_mb - base_mb,  # what the case itself added to the process's peak
        "threads": threads,
        "iters": iters,
        "load_avg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.overrides, args.warmup, args.iters, args.threads)))
        return
    for name in args.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
        cmd = [
            sys.executable,
            "-m",
            "worldmodel.bench",
            "--one",
            name,
            "--warmup",
            str(args.warmup),
            "--iters",
            str(args.iters),
            "--threads",
            str(args.threads),
            "--overrides",
            *args.overrides,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"case": name, "error": out.stderr.strip().splitlines()[-1:]}))
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
