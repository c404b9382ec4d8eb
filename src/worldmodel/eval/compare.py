"""One table of every tokenizer and world model of a multi-stage run (`task=pipeline`).

`python -m worldmodel.eval.compare RUN_DIR [--out README.md]` reads each stage's `eval.json` and
checkpoint (steps, training minutes, parameters) and prints Markdown: tokenizers (PSNR, SSIM,
codebook use, tokens per frame) and world models (next-frame PSNR against the tokenizer's own
ceiling, ΔtPSNR at t = 4 with its standard error, rollout PSNR at horizon 8, the memory test's
PSNR on returns to a view seen 16+ frames earlier beside copying that view, generation speed).
With `--plots`, the curves of every world model, and of their long rollouts when evaluated with
`eval.long_horizon` (`rollout_psnr_long.png`).
Made for `experiment=compare`, which trains every model of the project on one CoinRun split
with one budget per kind; any pipeline run dir works.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodel.media import plot_curve
from worldmodel.train import checkpoint as ckpt

ROLLOUT_HORIZON = 8  # rollout PSNR is reported at this many generated pixel frames


@dataclass
class Stage:
    """One trained stage of a pipeline run: its eval.json and what its checkpoint records."""

    name: str
    result: dict[str, Any]
    params: int
    steps: int
    minutes: float
    config: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.result["model"])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result["metrics"]

    @property
    def kind(self) -> str:
        """tokenizer | lam | world (older eval.json files: told apart by their metrics)."""
        if "kind" in self.result:
            return str(self.result["kind"])
        return "tokenizer" if "tokens_per_frame" in self.metrics else "other"


def load_stage(folder: Path) -> Stage:
    """The stage in `folder` (eval.json and checkpoints/last.pt)."""
    result = json.loads((folder / "eval.json").read_text())
    state = ckpt.load(folder / "checkpoints" / "last.pt")
    params = sum(int(v.numel()) for v in state["model"].values() if v.is_floating_point())
    return Stage(
        folder.name,
        result,
        params,
        int(state.get("step", 0)),
        float(state.get("elapsed_s", 0.0)) / 60,
        state.get("config") or {},
    )


def load_stages(run_dir: Path) -> list[Stage]:
    """Every evaluated stage of a pipeline run, in the order they ran (stages.json when present)."""
    order_file = run_dir / "stages.json"
    names = list(json.loads(order_file.read_text())) if order_file.exists() else []
    found = sorted(p.parent.name for p in run_dir.glob("*/eval.json"))
    names = [n for n in names if n in found] + [n for n in found if n not in names]
    if not names:
        raise FileNotFoundError(
            f"{run_dir} has no <stage>/eval.json: not an evaluated pipeline run"
        )
    return [load_stage(run_dir / n) for n in names]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _tokenizer_of(stage: Stage, by_path: dict[str, str]) -> str:
    pipeline = (stage.config.get("model") or {}).get("pipeline") or {}
    path = str(pipeline.get("tokenizer_checkpoint") or "")
    return by_path.get(str(Path(path).resolve()), Path(path).parent.parent.name or "–")


def tokenizer_table(stages: list[Stage]) -> list[str]:
    rows = [
        "| stage | model | weights | steps | minutes | PSNR (dB) | SSIM | codes used | "
        "perplexity | tokens / latent frame | tokens / frame |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stages:
        m = s.metrics
        rows.append(
            f"| {s.name} | {s.model} | {_millions(s.params)} | {s.steps:,} | {s.minutes:.1f} | "
            f"{_fmt(m.get('psnr'))} | {_fmt(m.get('ssim'), 3)} | "
            f"{_fmt(100 * m.get('codebook/usage', 0), 1)}% | "
            f"{_fmt(m.get('codebook/perplexity'), 0)} | "
            f"{_fmt(m.get('tokens_per_frame'), 0)} | {_fmt(m.get('tokens_per_pixel_frame'), 1)} |"
        )
    return rows


def rollout_at(metrics: dict[str, Any], horizon: int = ROLLOUT_HORIZON) -> float | None:
    curve = metrics.get("rollout_psnr") or []
    return curve[horizon - 1] if len(curve) >= horizon else None


def _changing_at(metrics: dict[str, Any], key: str, horizon: int) -> float | None:
    """A per-horizon curve on changing frames at `horizon` (or its last point if shorter)."""
    curve = metrics.get(key) or []
    return curve[min(horizon, len(curve)) - 1] if curve else None


def memory_cell(metrics: dict[str, Any]) -> str:
    """The memory test of a world (`eval.memory`): PSNR of its return frames ± clustered
    standard error / copying the old view / copying the last real frame, and the pairs; "–"
    when the world was not given the test."""
    if "memory_psnr" not in metrics:
        return "no pair" if metrics.get("memory_pairs") == 0 else "–"
    return (
        f"{metrics['memory_psnr']:.2f} ± {metrics['memory_psnr_stderr']:.2f} / "
        f"{metrics['memory_copy_old_psnr']:.2f} / {metrics['memory_copy_last_psnr']:.2f} "
        f"({metrics['memory_pairs']} pairs)"
    )


def world_table(stages: list[Stage], by_path: dict[str, str]) -> list[str]:
    """World models beside the baselines a trivial model gets, on the frames that change:
    copying the last real (context) frame; ΔtPSNR with its episode-clustered error; control
    accuracy beside the inverse-dynamics model's accuracy on real transitions and chance; the
    memory test beside copying the old view and the last real frame."""
    rows = [
        "| stage | model | tokenizer | weights | steps | minutes | actions | "
        "rollout PSNR h=1 / copy (dB) | rollout PSNR h=4 / copy (dB) | ΔtPSNR t=4 (dB) | "
        "control acc. (real / chance) | memory PSNR / copy old / copy last (dB) | frames/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stages:
        m = s.metrics
        delta = m.get("delta_psnr")
        delta_s = (
            f"{delta:+.2f} ± {m.get('delta_psnr_stderr', 0):.2f}" if delta is not None else "–"
        )
        cells = []
        for h in (1, 4):
            model = _changing_at(m, "rollout_psnr_changing", h)
            copy = _changing_at(m, "copy_psnr_changing", h)
            cells.append(f"{_fmt(model)} / {_fmt(copy)}")
        control = m.get("control_accuracy")
        control_s = (
            f"{control:.2f} ({m.get('control_accuracy_real', 0):.2f} / "
            f"{m.get('control_chance', 0):.2f})"
            if control is not None
            else "–"
        )
        rows.append(
            f"| {s.name} | {s.model} | {_tokenizer_of(s, by_path)} | {_millions(s.params)} | "
            f"{s.steps:,} | {s.minutes:.1f} | {m.get('action_source', '–')} | {cells[0]} | "
            f"{cells[1]} | {delta_s} | {control_s} | {memory_cell(m)} | "
            f"{_fmt(m.get('gen_fps'), 1)} |"
        )
    return rows


def render(run_dir: Path) -> str:
    """The Markdown tables of a pipeline run."""
    stages = load_stages(run_dir)
    tokenizers = [s for s in stages if s.kind == "tokenizer"]
    worlds = [s for s in stages if "rollout_psnr" in s.metrics]
    by_path = {
        str((run_dir / s.name / "checkpoints" / "last.pt").resolve()): s.name for s in stages
    }
    clips = {s.result.get("num_clips") for s in stages}
    out = [f"Held-out clips per evaluation: {', '.join(str(c) for c in sorted(clips))}.", ""]
    if tokenizers:
        out += ["**Tokenizers**", "", *tokenizer_table(tokenizers), ""]
    if worlds:
        out += ["**World models**", "", *world_table(worlds, by_path), ""]
    return "\n".join(out)


def plot(run_dir: Path, out_dir: Path) -> list[Path]:
    """Rollout PSNR and ΔtPSNR against the horizon (pixel frames) of every world model, one
    picture each (`rollout_psnr.png`, `delta_psnr.png` in `out_dir`)."""

    worlds = [s for s in load_stages(run_dir) if "rollout_psnr" in s.metrics]
    if not worlds:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    horizon = max(len(s.metrics["rollout_psnr"]) for s in worlds)
    xs = list(range(1, horizon + 1))

    def padded(values: list[float]) -> list[float]:
        return list(values) + [float("nan")] * (horizon - len(values))

    label = {s.name: f"{s.name} ({s.steps} steps)" for s in worlds}
    return _long_plot(worlds, label, out_dir) + [
        plot_curve(
            xs,
            {label[s.name]: padded(s.metrics["rollout_psnr"]) for s in worlds},
            out_dir / "rollout_psnr.png",
            title="rollout PSNR after 1 real frame (recorded actions)",
        ),
        plot_curve(
            xs,
            {label[s.name]: padded(s.metrics["delta_psnr_curve"]) for s in worlds},
            out_dir / "delta_psnr.png",
            ylabel="ΔtPSNR (dB)",
            title="recorded minus random actions (± stderr)",
            yerr={label[s.name]: padded(s.metrics["delta_psnr_curve_stderr"]) for s in worlds},
        ),
    ]


def _long_plot(worlds: list[Stage], label: dict[str, str], out_dir: Path) -> list[Path]:
    """Long rollouts (`eval.long_horizon`) of the world models that have them, PSNR on the
    frames that change against the horizon, beside copying the context frame (the first
    stage's: the clips are the same for every world of one data config)."""
    long = [s for s in worlds if s.metrics.get("rollout_psnr_changing_long")]
    if not long:
        return []
    horizon = max(len(s.metrics["rollout_psnr_changing_long"]) for s in long)

    def padded(values: list[float]) -> list[float]:
        return list(values) + [float("nan")] * (horizon - len(values))

    curves = {label[s.name]: padded(s.metrics["rollout_psnr_changing_long"]) for s in long}
    curves["copy context frame"] = padded(long[0].metrics["copy_psnr_changing_long"])
    return [
        plot_curve(
            list(range(1, horizon + 1)),
            curves,
            out_dir / "rollout_psnr_long.png",
            ylabel="PSNR of pooled MSE (dB)",
            title="long rollouts on the frames that change",
        )
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a task=pipeline run dir (experiment=compare)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here")
    parser.add_argument(
        "--plots", type=Path, default=None, help="write the world models' curves here"
    )
    args = parser.parse_args(argv)
    text = render(args.run_dir)
    if args.plots is not None:
        plot(args.run_dir, args.plots)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
