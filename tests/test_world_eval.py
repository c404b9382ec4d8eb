"""World-model evaluation on tiny real models and real recorded CoinRun clips.

The models are randomly initialised (nothing is trained here), small enough that a whole
evaluation runs in seconds, and saved as real checkpoints in the project's format; the data is a
tiny procgen recording made through the real data source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, save_checkpoint
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.data.tokens import latent_actions
from worldmodel.eval import lam as EL
from worldmodel.eval import world as W
from worldmodel.eval.clips import true_action_mapping
from worldmodel.eval.runner import evaluate
from worldmodel.pipeline import cache_key, lam_runs_bf16
from worldmodel.world import FrameLayout, World

DATA = [
    "data.train_frames=300",
    "data.val_frames=300",
    "data.num_envs=4",
    "data.train_num_levels=20",
    "data.clip_length=10",
    "trainer.progress=false",
    "trainer.threads=1",
    "logger=none",
]
TOKENIZER = {
    "_target_": "worldmodel.models.tokenizer.VideoTokenizer",
    "name": "tokenizer",
    "channels": [8, 16],
    "spatial_downsample": 8,  # 64x64 frames -> 8x8 tokens
    "num_res_blocks": 1,
    "num_mid_blocks": 1,
    "quantizer": {"kind": "fsq", "levels": [5, 5, 5]},
}
LAM = {
    "_target_": "worldmodel.models.lam.LatentActionModel",
    "name": "lam",
    "image_size": 64,
    "patch_size": 16,
    "max_frames": 10,
    "dim": 32,
    "enc_depth": 1,
    "dec_depth": 1,
    "heads": 2,
    "num_actions": 4,
    "code_dim": 8,
}
DYNAMICS = {
    "_target_": "worldmodel.models.dynamics.DynamicsModel",
    "name": "dynamics",
    "grid": [8, 8],
    "max_frames": 8,  # shorter than the 10-frame clips: windows slide in rollouts
    "dim": 32,
    "depth": 2,
    "heads": 2,
}


@dataclass
class TinyWorld:
    """Checkpoints of a tiny tokenizer, LAM and dynamics models, and the data they go with."""

    tokenizer: Path
    lam: Path
    dynamics_true: Path  # conditioned on the recorded (true) actions
    dynamics_latent: Path  # conditioned on the LAM's latent actions

    def config(self, checkpoint: Path, *overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config([*DATA, f"checkpoint={checkpoint}", *overrides], run_dir=run_dir)


def build_world(root: Path) -> TinyWorld:
    torch.manual_seed(0)
    cfg = compose_config(DATA)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    instantiate(cfg.data).datasets()  # record the clips once
    tokenizer = save_checkpoint(TOKENIZER, data, root / "tokenizer.pt")
    lam = save_checkpoint(LAM, data, root / "lam.pt")
    vocab = 5 * 5 * 5
    dynamics = []
    for source, num_actions in (("true", 15), ("latent", LAM["num_actions"])):
        pipeline = {
            "tokenizer_checkpoint": str(tokenizer),
            "lam_checkpoint": str(lam),
            "action_source": source,
        }
        dyn = {**DYNAMICS, "vocab_size": vocab, "num_actions": num_actions, "pipeline": pipeline}
        dynamics.append(save_checkpoint(dyn, data, root / f"dynamics_{source}.pt"))
    return TinyWorld(tokenizer, lam, *dynamics)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[TinyWorld]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield build_world(tmp_path_factory.mktemp("world"))
    torch.set_num_threads(threads)


def _finite(value) -> bool:
    return all(math.isfinite(v) for v in np.ravel(value))


def test_evaluate_dynamics_reports_every_metric_and_media(world, tmp_path):
    torch.manual_seed(0)
    cfg = world.config(world.dynamics_true, "eval.batches=2", "eval.batch_size=4", run_dir=tmp_path)
    metrics, media, n = W.evaluate_dynamics(World.load(cfg.checkpoint), cfg, tmp_path)

    assert n == 8
    horizon = 8  # eval.horizon default; the 10-frame clips hold 1 context + 8 frames
    for key in (
        "psnr",
        "ssim",
        "token_acc",
        "masked_acc",
        "ce",
        "next_frame_psnr_changing",
        "next_frame_copy_psnr_changing",
        "tokenizer_psnr",
    ):
        assert _finite(metrics[key]), key
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1
    assert 0 <= metrics["token_acc"] <= 1 and 0 <= metrics["masked_acc"] <= 1
    # a random model cannot beat copying the previous real frame on the frames that change
    assert metrics["next_frame_copy_psnr_changing"] > metrics["next_frame_psnr_changing"] + 5
    assert len(metrics["rollout_psnr"]) == len(metrics["rollout_psnr_random"]) == horizon
    assert metrics["rollout_psnr"] != metrics["rollout_psnr_random"]  # random actions were used
    for t in range(1, horizon + 1):
        assert _finite([metrics[f"delta_psnr_t{t}"], metrics[f"delta_psnr_t{t}_stderr"]])
        assert abs(metrics[f"delta_psnr_t{t}"]) < 5  # an untrained model: no control either way
        assert metrics[f"delta_psnr_t{t}_stderr"] > 0
    assert metrics["delta_psnr_horizon"] == 4 and metrics["delta_psnr"] == metrics["delta_psnr_t4"]
    assert metrics["delta_psnr_clips"] == n
    assert metrics["delta_psnr_clusters"] == 4  # 8 clips from the 4 episodes of the val split
    assert metrics["fvd_random_features"] > 0  # real clips vs noise-like generated ones
    assert metrics["gen_fps"] > 0
    json.dumps(metrics)  # eval.json-ready

    assert set(media) == {
        "next_frame_grid",
        "rollout_psnr_plot",
        "delta_psnr_plot",
        "rollout_gif",
        "rollout_mp4",
    }
    for path in media.values():
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    with Image.open(media["rollout_gif"]) as gif:
        # 4 clips stacked, each 64 px high at scale 2, real | generated side by side
        assert gif.size == (2 * (2 * 64 + 2), 4 * 64 * 2)
        assert gif.n_frames == 1 + horizon


def test_evaluate_dynamics_is_deterministic_and_clamps_the_horizon(world, tmp_path, caplog):
    torch.manual_seed(0)
    overrides = ("eval.batches=1", "eval.batch_size=3", "++eval.horizon=12", "++eval.steps=2")
    results = []
    for i in range(2):
        cfg = world.config(world.dynamics_true, *overrides, run_dir=tmp_path / str(i))
        world_ = World.load(cfg.checkpoint)
        torch.manual_seed(i)  # the global RNG must not matter
        metrics, _, _ = W.evaluate_dynamics(world_, cfg, tmp_path / str(i))
        metrics.pop("gen_fps")
        results.append(metrics)
    assert results[0] == results[1]
    assert len(results[0]["rollout_psnr"]) == 9  # 10-frame clips after 1 context frame
    assert "does not fit clips" in caplog.text


def test_evaluate_lam_reports_codes_and_agreement_with_true_actions(world, tmp_path):
    torch.manual_seed(0)
    cfg = world.config(world.lam, "eval.batches=2", "eval.batch_size=4", run_dir=tmp_path)
    model, _, _ = load_model(cfg.checkpoint)
    metrics, media, n = EL.evaluate_lam(model, cfg, tmp_path)

    assert n == 8
    for key in (
        "psnr",
        "ssim",
        "random_action_psnr",
        "delta_psnr",
        "next_frame_psnr_changing",
        "next_frame_copy_psnr_changing",
    ):
        assert _finite(metrics[key]), key
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1
    assert 0 < metrics["changing_fraction"] <= 1
    # 8 clips of 10 frames: 9 transitions each, one code per transition
    fractions = metrics["codebook/fraction"]
    assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0)
    assert 0 < metrics["codebook/usage"] <= 1 and 1 <= metrics["codebook/perplexity"] <= 4
    assert metrics["action_pairs"] == 8 * 9
    assert "action_agreement" not in metrics  # a collapsed LAM scored 1.0 on it
    for key in ("action_nmi", "action_nmi_chance", "action_purity", "action_purity_chance"):
        assert 0 <= metrics[key] <= 1, key
    confusion = np.array(metrics["action_confusion"])
    assert confusion.shape == (15, 4) and confusion.sum() == 8 * 9
    for action, code in metrics["action_mapping"].items():  # the most frequent code per action
        assert confusion[int(action)].argmax() == code
    json.dumps(metrics)
    assert set(media) == {"next_frame_grid", "action_confusion"}
    assert all(Path(p).is_file() for p in media.values())


def test_alignment_of_codes_with_true_actions(tmp_path):
    """Codes that rename the true actions align perfectly; codes independent of them, or one
    code for everything, score their chance levels."""
    torch.manual_seed(0)
    true = torch.randint(0, 6, (2000,))
    true[:10] = -1  # unknown actions are left out
    renamed = torch.tensor([3, 0, 4, 1, 5, 2])[true.clamp_min(0)]
    metrics, path = EL.action_alignment(true, renamed, 6, 6, tmp_path / "confusion.png")
    assert metrics["action_nmi"] == pytest.approx(1.0) and metrics["action_purity"] == 1.0
    assert metrics["action_nmi_chance"] < 0.05 and metrics["action_purity_chance"] < 0.3
    assert metrics["action_mapping"] == {"0": 3, "1": 0, "2": 4, "3": 1, "4": 5, "5": 2}
    assert metrics["action_pairs"] == 1990 and path.is_file()
    noise = torch.randint(0, 6, (2000,))
    metrics, _ = EL.action_alignment(true, noise, 6, 6, tmp_path / "noise.png")
    assert metrics["action_nmi"] < 0.05 and metrics["action_purity"] < 0.3
    assert metrics["action_purity"] == pytest.approx(metrics["action_purity_chance"], abs=0.05)
    collapsed, _ = EL.action_alignment(true, torch.zeros_like(true), 6, 6, tmp_path / "one.png")
    assert collapsed["action_nmi"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["action_nmi_chance"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["action_purity"] == pytest.approx(collapsed["action_purity_chance"])
    assert collapsed["action_purity"] < 0.3
    assert EL.action_alignment(torch.full((5,), -1), noise[:5], 6, 6, tmp_path / "none.png") == (
        {},
        None,
    )


def test_evaluate_dynamics_on_latent_actions(world, tmp_path):
    """A dynamics model on LAM actions: its token clips carry the LAM's codes, and the LAM's
    mapping of true actions to codes can be read from the cache."""
    torch.manual_seed(0)
    cfg = world.config(
        world.dynamics_latent, "eval.batches=1", "eval.batch_size=2", run_dir=tmp_path
    )
    parts = World.load(cfg.checkpoint)
    metrics, _, n = W.evaluate_dynamics(parts, cfg, tmp_path)
    assert n == 2 and _finite(metrics["delta_psnr"]) and _finite(metrics["psnr"])

    assert parts.action_source == "latent" and parts.lam is not None
    pixels = W.pixel_val(cfg.data)
    tokens = W.token_val(parts, pixels)
    clip = tokens[0]["actions"][:-1]
    assert clip.min() >= 0 and clip.max() < 4  # LAM codes, not the 15 true actions
    confusion, mapping = true_action_mapping(pixels, tokens, 4)
    assert confusion.shape == (15, 4) and set(mapping.values()) <= set(range(4))
    assert int(confusion.sum()) == pixels.num_frames - pixels.num_episodes  # one per transition


@pytest.mark.parametrize(
    "k, pixels, latents, spans",
    [
        (1, 4, 4, {(0, 1): (0, 1), (1, 4): (1, 4)}),
        (2, 9, 5, {(0, 1): (0, 1), (1, 2): (1, 3), (1, 5): (1, 9), (2, 4): (3, 7)}),  # C-ViViT
        (4, 8, 2, {(0, 1): (0, 4), (1, 2): (4, 8)}),  # a VQ-VAE encoding groups of 4
    ],
)
def test_frame_layout_maps_latent_frames_to_pixel_frames(k, pixels, latents, spans) -> None:
    tokenizer = torch.nn.Module()
    tokenizer.temporal_downsample = k
    layout = FrameLayout.of(tokenizer, pixels, latents)
    for (j0, j1), (a, b) in spans.items():
        assert layout.span(j0, j1) == slice(a, b), (j0, j1)


def test_frame_layout_refuses_clips_it_cannot_cover() -> None:
    tokenizer = torch.nn.Module()
    tokenizer.temporal_downsample = 2
    with pytest.raises(ValueError, match="cannot cover 12 pixel frames"):
        FrameLayout.of(tokenizer, 12, 5)


def test_eval_clip_length_sets_the_scored_clips_of_a_world(world, tmp_path):
    """`eval.clip_length` scores clips of another length than training's (here shorter than
    the data's 10 frames; the demo scores 9-frame clips with an 8-frame window)."""
    cfg = world.config(
        world.dynamics_true,
        "eval.batches=1",
        "eval.batch_size=2",
        "eval.clip_length=6",
        "++eval.steps=1",
        "eval.control.enabled=false",
        run_dir=tmp_path,
    )
    result = evaluate(cfg)
    assert result["data"]["clip_length"] == 6
    assert len(result["metrics"]["rollout_psnr_changing"]) == 5  # 1 context frame + 5
    assert cfg.data.clip_length == 10  # the caller's config is left as it was


def test_bf16_lam_labels_under_autocast_with_its_own_cache_key(world, tmp_path):
    """A LAM trained in bf16 labels the frames under bf16 autocast, and the token cache's key
    says so (fp32 and bf16 labels never share a folder); its codes are the LAM's codes."""
    lam, lam_cfg, _ = load_model(world.lam)
    assert not lam_runs_bf16(lam_cfg) and not lam_runs_bf16(None)
    bf16_cfg = OmegaConf.merge(lam_cfg, {"trainer": {"precision": "bf16"}})
    assert lam_runs_bf16(bf16_cfg)

    state = torch.load(world.dynamics_latent, weights_only=True)
    p = OmegaConf.create(state["config"]["model"]["pipeline"])
    assert cache_key(p, True, True) != cache_key(p, True, False) == cache_key(p, True)
    assert cache_key(p, False, True) == cache_key(p, False)  # no LAM: nothing to label

    clips = instantiate(world.config(world.dynamics_latent).data).split("val")
    frames = np.load(clips.frames_path, mmap_mode="r")
    fp32 = latent_actions(lam, frames, clips.episodes, 4)
    bf16 = latent_actions(lam, frames, clips.episodes, 4, bf16=True)
    assert fp32.shape == bf16.shape == (len(frames),)
    assert np.array_equal(fp32 < 0, bf16 < 0)  # the same transitions are labelled
    assert bf16.max() < lam.num_actions and (bf16 >= 0).mean() > 0.5
    assert (fp32 == bf16).mean() > 0.5  # a random-init LAM's codes mostly survive bf16

    parts = World.load(world.dynamics_latent)
    assert not parts.lam_bf16 and parts.cache_key == cache_key(p, True)
