"""VideoGPT: the VQ-VAE (shapes, axial attention, learning through the loop) and the GPT prior
(causality, cached sampling, conditioning, learning and evaluation through the pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict

from worldmodel.config import ConfigError, validate
from worldmodel.eval.runner import evaluate
from worldmodel.models.videogpt import VideoGPT
from worldmodel.models.videogpt_vqvae import AxialAttention, VideoGPTVQVAE
from worldmodel.train.logging import read_metrics
from worldmodel.train.loop import train

V, A, H, W = 16, 5, 3, 4
FAST = ["logger=none", "trainer.progress=false", "trainer.threads=1"]


def tiny_vqvae(**kwargs) -> VideoGPTVQVAE:
    torch.manual_seed(0)
    args = dict(
        channels=16,
        num_res_blocks=1,
        latent_dim=8,
        resolution=32,
        max_frames=4,
        quantizer={"kind": "vq", "codebook_size": 32},
    )
    args.update(kwargs)
    return VideoGPTVQVAE(**args)


def tiny_prior(**kwargs) -> VideoGPT:
    torch.manual_seed(0)
    args = dict(
        vocab_size=V,
        num_actions=A,
        grid=[H, W],
        max_frames=4,
        dim=32,
        depth=2,
        heads=4,
        dropout=0.0,
        attn_dropout=0.0,
        cond_frames=1,
        cond_channels=8,
        cond_blocks=1,
    )
    args.update(kwargs)
    return VideoGPT(**args).eval()


def clips(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t, H, W), generator=gen), torch.randint(
        0, A, (b, t), generator=gen
    )


# ------------------------------------------------------------------------------------ VQ-VAE


@pytest.mark.parametrize("spatial,temporal", [(2, 4), (4, 2), (8, 1)])
def test_vqvae_shapes(spatial: int, temporal: int) -> None:
    model = tiny_vqvae(spatial_downsample=spatial, temporal_downsample=temporal)
    video = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    recon, indices = model.reconstruct(video)
    assert recon.shape == video.shape
    assert indices.shape == (2, 4 // temporal, 32 // spatial, 32 // spatial)
    assert indices.dtype == torch.long and int(indices.max()) < model.codebook_size == 32
    assert model.detokenize(indices).shape == video.shape
    assert model.temporal_downsample == temporal
    loss, metrics = model.loss({"video": video, "mask": torch.ones(2, 4, dtype=torch.bool)})
    assert loss.dim() == 0 and torch.isfinite(loss)
    for key in ("psnr", "codebook/usage", "codebook/perplexity", "rec_loss"):
        assert metrics[key].dim() == 0, key
    if temporal > 1:
        with pytest.raises(ValueError, match=f"T % {temporal} == 0"):
            model.encode(video[:, :, :3])
    else:  # per-frame tokens: a single frame is a clip
        assert model.tokenize(video[:, :, :1]).shape == (2, 1, 32 // spatial, 32 // spatial)
    with pytest.raises(ValueError, match="spatial_downsample must be 2, 4 or 8"):
        tiny_vqvae(spatial_downsample=16)


@pytest.mark.parametrize("axis", ["t", "h", "w"])
def test_axial_attention_mixes_only_along_its_axis(axis: str) -> None:
    torch.manual_seed(0)
    attn = AxialAttention(16, 2, (4, 5, 6)).eval()
    with torch.no_grad():  # silence the other two axes: the output is this axis' attention
        for other in {"t", "h", "w"} - {axis}:
            getattr(attn, f"attn_{other}").proj.weight.zero_()
            getattr(attn, f"attn_{other}").proj.bias.zero_()
    x = torch.randn(2, 16, 4, 5, 6)
    y = x.clone()
    y[:, :, 1, 2, 3] += 1.0
    with torch.no_grad():
        changed = (attn(x) - attn(y)).abs().amax(dim=(0, 1)) > 1e-6  # (T, H, W)
    line = torch.zeros(4, 5, 6, dtype=torch.bool)
    if axis == "t":
        line[:, 2, 3] = True
    elif axis == "h":
        line[1, :, 3] = True
    else:
        line[1, 2, :] = True
    assert torch.equal(changed, line)


def test_config_rejects_clips_the_vqvae_cannot_split(tmp_path: Path) -> None:
    cfg = compose_config(
        ["experiment=smoke_videogpt_vqvae", "model.temporal_downsample=4", "data.clip_length=6"]
    )
    with pytest.raises(ConfigError, match="data.clip_length=6 is not a multiple of"):
        validate(cfg)
    validate(compose_config(["experiment=smoke_videogpt_vqvae", "model.temporal_downsample=4"]))


# ------------------------------------------------------------------------------------ prior


def test_prior_is_causal_and_conditioned_on_its_prompt() -> None:
    model = tiny_prior()
    tokens, actions = clips(2, 4, seed=1)
    n = H * W
    i = (2 - 1) * n + 5  # frame 2, token 5; frame 0 is the prompt, not in the sequence
    changed = tokens.clone()
    changed.view(2, 4, n)[:, 2, 5] = (tokens.view(2, 4, n)[:, 2, 5] + 1) % V
    with torch.no_grad():
        logits, logits2 = model.logits(tokens, actions), model.logits(changed, actions)
    assert logits.shape == (2, 3 * n, V)
    assert torch.equal(logits[:, : i + 1], logits2[:, : i + 1])  # positions <= i never see x_i
    assert (logits[:, i + 1 :] - logits2[:, i + 1 :]).abs().amax(-1).min() > 1e-5

    prompt = tokens.clone()
    prompt[:, 0] = (prompt[:, 0] + 1) % V  # the prompt frame reaches every position
    with torch.no_grad():
        logits3 = model.logits(prompt, actions)
    assert (logits - logits3).abs().amax(-1).min() > 1e-5


def test_conditional_norms_make_the_action_change_its_frame_only() -> None:
    model = tiny_prior()
    tokens, actions = clips(2, 4, seed=2)
    n = H * W
    other = actions.clone()
    other[:, 1] = (other[:, 1] + 1) % A  # the action after frame 1 conditions frame 2
    with torch.no_grad():
        logits, logits2 = model.logits(tokens, actions), model.logits(tokens, other)
    frame2 = slice((2 - 1) * n, 2 * n)
    assert torch.equal(logits[:, : frame2.start], logits2[:, : frame2.start])
    assert (logits[:, frame2] - logits2[:, frame2]).abs().amax(-1).min() > 1e-5

    plain = tiny_prior(action_cond=False)
    with torch.no_grad():
        assert torch.equal(plain.logits(tokens, actions), plain.logits(tokens, other))


@pytest.mark.parametrize("cond_frames", [0, 1])
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 4), (0.0, None)])
def test_cached_and_uncached_sampling_agree(cond_frames: int, temperature: float, top_k) -> None:
    model = tiny_prior(cond_frames=cond_frames)
    tokens, actions = clips(3, 3, seed=3)
    kwargs = dict(temperature=temperature, top_k=top_k, steps=8)  # steps: ignored
    a = model.generate_next(tokens, actions, generator=torch.Generator().manual_seed(5), **kwargs)
    b = model.generate_next(
        tokens, actions, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs
    )
    assert a.shape == (3, H, W) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V
    assert torch.equal(a, b)
    if temperature > 0:  # different draws give a different frame
        c = model.generate_next(tokens, actions, generator=torch.Generator().manual_seed(6))
        assert not torch.equal(a, c)


def test_rollout_and_teacher_forced_cache_match_uncached() -> None:
    model = tiny_prior()
    tokens, actions = clips(2, 8, seed=4)
    # 2 context frames + 5 generated in a window of 4 frames: the window slides 3 times
    kwargs = dict(horizon=5, temperature=1.0)
    a = model.rollout(tokens[:, :2], actions, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.rollout(
        tokens[:, :2],
        actions,
        generator=torch.Generator().manual_seed(7),
        use_cache=False,
        **kwargs,
    )
    assert a.shape == (2, 5, H, W) and torch.equal(a, b)

    # evaluation's teacher forcing: one cache, the next context frame is the real one, not the
    # sample; the cache is extended with it and matches the uncached result
    cache = model.new_cache(tokens[:, :1], actions[:, :0])
    for t in (1, 2, 3):
        cached = model.generate_next(tokens[:, :t], actions[:, :t], cache=cache, temperature=0)
        plain = model.generate_next(tokens[:, :t], actions[:, :t], use_cache=False, temperature=0)
        assert torch.equal(cached, plain), t
        assert cache.frames == t and cache.kv.length == (t - 1) * H * W
    with pytest.raises(ValueError, match="cache does not match"):
        other = tokens[:, :3].clone()
        other[:, 1] = (other[:, 1] + 1) % V
        model.generate_next(other, actions[:, :3], cache=cache)


def test_prior_bad_inputs_raise_clear_errors() -> None:
    model = tiny_prior()
    tokens, actions = clips(2, 4, seed=5)
    with pytest.raises(ValueError, match=r"grid \(3, 5\) does not match the model's grid \(3, 4\)"):
        model.loss({"tokens": torch.zeros(2, 4, 3, 5, dtype=torch.long), "actions": actions})
    with pytest.raises(ValueError, match=rf"ids must be in \[0, {V}\)"):
        model.loss({"tokens": tokens + V, "actions": actions})
    bad = actions.clone()
    bad[0, 1] = A
    with pytest.raises(ValueError, match=rf"actions must be in \[0, {A}\)"):
        model.loss({"tokens": tokens, "actions": bad})
    with pytest.raises(ValueError, match="max_frames"):
        model.generate_next(tokens, actions)


# ------------------------------------------------------------------------------------ end to end


def smoke_vqvae(root: Path, *overrides: str) -> Path:
    """The smoke VQ-VAE trained through the real loop (30 steps): its run dir."""
    run_dir = root / "vqvae"
    cfg = ["experiment=smoke_videogpt_vqvae", *FAST, "trainer.max_steps=30", *overrides]
    train(validate(compose_config(cfg, run_dir=run_dir)))
    return run_dir


def test_vqvae_smoke_loss_falls_through_the_loop(tmp_path: Path) -> None:
    run_dir = smoke_vqvae(tmp_path)  # 4-frame clips, time x2, space x8
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 30
    first, last = val[0], val[-1]
    # measured 0.30 -> 0.18 MSE, 11.4 -> 14.0 dB PSNR after 30 steps
    assert last["val/loss"] < 0.75 * first["val/loss"], (first, last)
    assert last["val/psnr"] > first["val/psnr"] + 1.5
    assert last["codebook/usage"] > 0.25  # the EMA codebook is in use, not collapsed


def test_prior_smoke_run_learns_and_evaluates(tmp_path: Path) -> None:
    # per-frame tokens: the pipeline encodes each frame alone, so the VQ-VAE trains on frames
    vqvae = smoke_vqvae(tmp_path, "model.temporal_downsample=1", "data.clip_length=1")
    run_dir = tmp_path / "prior"
    overrides = [
        "experiment=smoke_videogpt",
        *FAST,
        f"model.pipeline.tokenizer_checkpoint={vqvae / 'checkpoints' / 'last.pt'}",
    ]
    cfg = validate(compose_config(overrides, run_dir=run_dir))
    train(cfg)
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/ce" in r]
    first, last = val[0], val[-1]
    assert last["val/ce"] < first["val/ce"] - 1.0, (first, last)  # chance: ln 64 = 4.16
    assert last["val/masked_acc"] > first["val/masked_acc"] + 0.1

    with open_dict(cfg):
        cfg.task = "eval"
        cfg.checkpoint = str(run_dir / "checkpoints" / "last.pt")
        cfg.run_dir = str(tmp_path / "eval")
    evaluate(cfg)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"] == "videogpt" and result["step"] == 60
    metrics = result["metrics"]
    for key in ("ce", "masked_acc", "psnr", "token_acc", "rollout_psnr", "delta_psnr", "gen_fps"):
        assert key in metrics, key
    assert len(metrics["rollout_psnr"]) == 3 and 0 < metrics["psnr"] < 100
