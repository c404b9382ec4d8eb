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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def _video(b: int = 2, t: int = 16, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, t, size, size) * 2 - 1  # (B, C, T, H, W)


def case_tokenizer(kind: str, overrides: list[str], warmup: int, iters: int) -> dict:
    from worldmodel.build import build_model

    cfg = _compose(["model=tokenizer", *overrides])
    model = build_model(cfg.model)
    video = _video()
    batch = {
        "video": video,
        "actions": torch.zeros(2, 16, dtype=torch.long),
        "mask": torch.ones(2, 16, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = kind.endswith("bf16")

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def encode() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.tokenize(video)

    fn = encode if "encode" in kind else train_step
    flops = _flops(fn)
    times = _timed(fn, warmup, iters)
    med = statistics.median(times)
    frames = video.shape[0] * video.shape[2]
    return {
        "ms": med * 1e3,
        "ms_min": min(times) * 1e3,
        "ms_max": max(times) * 1e3,
        "frames_per_s": frames / med,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop": flops / 1e9,
        "gflop_per_s": flops / 1e9 / med,
        "shape": list(video.shape),
        "precision": "bf16" if bf16 else "fp32",
    }


def case_loader(overrides: list[str], warmup: int, iters: int) -> dict:
    from torch.utils.data import DataLoader

    from worldmodel.config import instantiate

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


CASES: dict[str, Callable[[list[str], int, int], dict]] = {
    "tokenizer_train_fp32": lambda o, w, i: case_tokenizer("train_fp32", o, w, i),
    "tokenizer_train_bf16": lambda o, w, i: case_tokenizer("train_bf16", o, w, i),
    "tokenizer_encode_bf16": lambda o, w, i: case_tokenizer("encode_bf16", o, w, i),
    "loader": case_loader,
}


def run_one(name: str, overrides: list[str], warmup: int, iters: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    result = CASES[name](overrides, warmup, iters)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": name,
        **result,
        "peak_rss_mb": peak_mb,
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
