"""Perceiver AR: causality through the cross-attention and the latent stack, cached sampling
against the uncached forward, a long context, learning, config checks, and the smoke recipe
trained, evaluated and played through `run.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_py, save_checkpoint
from omegaconf import OmegaConf
from test_world_eval import TOKENIZER

from worldmodel.config import ConfigError, validate
from worldmodel.models.perceiver_ar import PerceiverAR
from worldmodel.tasks import run_task

V, A, H, W = 16, 5, 3, 4
N = H * W
FAST = ["logger=none", "trainer.progress=false", "trainer.threads=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def tiny(**kwargs) -> PerceiverAR:
    torch.manual_seed(0)
    args = dict(
        vocab_size=V,
        num_actions=A,
        grid=[H, W],
        max_frames=6,
        latent_window=2 * N,
        dim=32,
        depth=2,
        heads=4,
    )
    args.update(kwargs)
    return PerceiverAR(**args).eval()


def clips(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, t, H, W), generator=gen)
    return tokens, torch.randint(0, A, (b, t), generator=gen)


def _bump(tokens: torch.Tensor, position: int) -> torch.Tensor:
    """`tokens` (B, T, h, w) with the token at raster position `position` changed."""
    out = tokens.clone()
    flat = out.view(out.shape[0], -1)
    flat[:, position] = (flat[:, position] + 1) % V
    return out


@pytest.mark.parametrize("stack", [True, False])
def test_window_logits_are_causal_through_cross_attention_and_stack(stack: bool) -> None:
    model = tiny()
    if not stack:  # silence the latent self-attention: only the cross-attention mixes positions
        for block in model.blocks:
            block.attn.proj.weight.data.zero_()
            block.attn.proj.bias.data.zero_()
    tokens, actions = clips(2, 5, seed=1)
    start = 5 * N - 2 * N  # the window: the last 2 frames' positions
    with torch.no_grad():
        logits = model.logits(tokens, actions)  # (B, 2N, V)
        assert logits.shape == (2, 2 * N, V)
        # a token inside the window (input of position j + 1) reaches positions > j only
        j = start + N + 3
        changed = model.logits(_bump(tokens, j), actions)
        i = j - start
        assert torch.equal(logits[:, : i + 1], changed[:, : i + 1])
        assert (logits[:, i + 1 :] - changed[:, i + 1 :]).abs().amax(-1).min() > 1e-6
        # a context token before the window reaches every latent (through the cross-attention)
        far = model.logits(_bump(tokens, 2), actions)
        assert (logits - far).abs().amax(-1).min() > 1e-6
        # the action after frame 3 conditions frame 4 (the window's second frame) onwards only
        other = actions.clone()
        other[:, 3] = (other[:, 3] + 1) % A
        moved = model.logits(tokens, other)
        assert torch.equal(logits[:, :N], moved[:, :N])
        assert (logits[:, N:] - moved[:, N:]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("window", [N, 2 * N + 5, 6 * N])  # one frame, not frame-aligned, all
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 4), (0.0, None)])
def test_cached_sampling_matches_the_uncached_forward(window: int, temperature, top_k) -> None:
    model = tiny(latent_window=window)
    tokens, actions = clips(3, 4, seed=3)
    kwargs = dict(temperature=temperature, top_k=top_k, steps=8)  # steps: ignored
    a = model.generate_next(tokens, actions, generator=torch.Generator().manual_seed(5), **kwargs)
    b = model.generate_next(
        tokens, actions, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs
    )
    assert a.shape == (3, H, W) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V
    assert torch.equal(a, b)

    # teacher forcing (evaluation): one cache, extended with the real frames, not the samples;
    # the cached logits equal the forward over the whole (t + 1)-frame sequence
    cache = model.new_cache(tokens[:, :1], actions[:, :0])
    for t in (1, 2, 3):
        cached = model.generate_next(tokens[:, :t], actions[:, :t], cache=cache, temperature=0)
        plain = model.generate_next(tokens[:, :t], actions[:, :t], use_cache=False, temperature=0)
        assert torch.equal(cached, plain), t
        assert cache.frames == t and cache.cross.length == t * N
    with torch.no_grad():  # the first token's logits, cached and not, to float precision
        x = tokens[:, :3].reshape(3, 3, N)
        inputs, cond = model._sequence(
            torch.cat([x, x[:, :1]], 1), model.frame_conditions(actions, 4)
        )
        start = max(0, 4 * N - window)
        full = model.head(model.forward(inputs, cond))[:, 3 * N - start]
        model._prepare_window(cache, inputs, cond, start, 3 * N)
        step = model.head(model._step(cache, inputs[:, 3 * N : 3 * N + 1], cond[:, 3 * N :], 3 * N))
    assert torch.allclose(full, step, atol=1e-5)
    with pytest.raises(ValueError, match="cache does not match"):
        other = tokens[:, :3].clone()
        other[:, 1] = (other[:, 1] + 1) % V
        model.generate_next(other, actions[:, :3], cache=model.new_cache(tokens[:, :2], actions))


def test_rollout_slides_its_context_and_matches_uncached() -> None:
    model = tiny()
    tokens, actions = clips(2, 9, seed=4)
    # 2 context frames + 7 generated with at most 5 context frames: the window slides
    kwargs = dict(horizon=7, temperature=1.0)
    a = model.rollout(tokens[:, :2], actions, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.rollout(
        tokens[:, :2],
        actions,
        generator=torch.Generator().manual_seed(7),
        use_cache=False,
        **kwargs,
    )
    assert a.shape == (2, 7, H, W) and torch.equal(a, b)


def test_a_long_context_of_64_frames() -> None:
    # 64 frames of 4x4 tokens = 1024 positions read by a 32-position latent window
    model = tiny(grid=[4, 4], max_frames=64, latent_window=32)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, V, (2, 64, 4, 4), generator=gen)
    actions = torch.randint(0, A, (2, 64), generator=gen)
    with torch.no_grad():
        logits = model.logits(tokens, actions)
        assert logits.shape == (2, 32, V) and torch.isfinite(logits).all()
        far = model.logits(_bump(tokens, 0), actions)  # the first token still reaches the window
    assert (logits - far).abs().amax() > 1e-6
    model.train()
    loss, metrics = model.loss({"tokens": tokens, "actions": actions})
    loss.backward()
    assert torch.isfinite(loss) and model.token_emb.weight.grad is not None
    model.eval()
    frame = model.generate_next(tokens[:, :63], actions, generator=torch.Generator().manual_seed(1))
    again = model.generate_next(
        tokens[:, :63], actions, generator=torch.Generator().manual_seed(1), use_cache=False
    )
    assert torch.equal(frame, again)


def test_a_few_training_steps_lower_the_loss() -> None:
    """Clips where every frame repeats the first: the next frame is in the context."""
    model = tiny().train()
    gen = torch.Generator().manual_seed(8)
    first = torch.randint(0, V, (16, 1, H, W), generator=gen)
    batch = {
        "tokens": first.repeat(1, 6, 1, 1),
        "actions": torch.randint(0, A, (16, 6), generator=gen),
        "mask": torch.ones(16, 6, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(metrics) == {"ce", "masked_acc"}
    # measured 2.9 -> 0.8 over 40 steps (chance: ln 16 = 2.77)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_bad_configs_and_inputs_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match=r"latent_window=20 exceeds the context of max_frames"):
        tiny(max_frames=1, latent_window=20)
    with pytest.raises(ValueError, match=r"latent_window=5 is smaller than one frame of tokens"):
        tiny(latent_window=5)
    cfg = compose_config(["experiment=smoke_perceiver_ar", "model.pipeline.tokenizer_checkpoint=x"])
    validate(cfg)
    for overrides, message in [
        (["model.latent_window=1024"], r"model.latent_window=1024 exceeds the context"),
        (["model.latent_window=32"], r"model.latent_window=32 is smaller than one frame"),
        (["data.clip_length=9"], r"data.clip_length=9 exceeds model.max_frames=8"),
    ]:
        bad = compose_config(
            ["experiment=smoke_perceiver_ar", "model.pipeline.tokenizer_checkpoint=x", *overrides]
        )
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    model = tiny()
    tokens, actions = clips(2, 4, seed=5)
    with pytest.raises(ValueError, match=r"grid \(3, 5\) does not match the model's grid \(3, 4\)"):
        model.loss({"tokens": torch.zeros(2, 4, 3, 5, dtype=torch.long), "actions": actions})
    with pytest.raises(ValueError, match=rf"ids must be in \[0, {V}\)"):
        model.loss({"tokens": tokens + V, "actions": actions})
    bad_actions = actions.clone()
    bad_actions[0, 1] = A
    with pytest.raises(ValueError, match=rf"actions must be in \[0, {A}\)"):
        model.loss({"tokens": tokens, "actions": bad_actions})
    with pytest.raises(ValueError, match="max_frames"):
        model.generate_next(*clips(1, 6, seed=6))


def test_smoke_recipe_trains_evaluates_and_plays_through_run_py(tmp_path: Path) -> None:
    # a random-weight tokenizer (8x8 tokens, FSQ 5,5,5): what is scored here is the plumbing
    data = OmegaConf.to_container(compose_config(["experiment=smoke_tokenizer"]).data, resolve=True)
    tokenizer = save_checkpoint(TOKENIZER, data, tmp_path / "tokenizer.pt")
    run_dir = tmp_path / "train"
    run_py(
        "experiment=smoke_perceiver_ar",
        f"model.pipeline.tokenizer_checkpoint={tokenizer}",
        "model.vocab_size=125",
        "trainer.max_steps=20",
        "trainer.val_every=10",
        "eval.after_train=true",
        "eval.control.enabled=false",  # the inverse-dynamics model is another test's
        f"hydra.run.dir={run_dir}",
        *FAST,
    )
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["model"] == "perceiver_ar" and result["step"] == 20
    metrics = result["metrics"]
    for key in ("ce", "masked_acc", "psnr", "token_acc", "rollout_psnr", "delta_psnr", "gen_fps"):
        assert key in metrics, key
    assert len(metrics["rollout_psnr"]) == 3
    # play headless: 10 actions, more than the 8-frame context holds (the window slides)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    play = ["task=play", f"checkpoint={checkpoint}", "play.actions=[1,1,7,7,5,5,5,5,5,5]", *FAST]
    run_task(validate(compose_config(play, run_dir=tmp_path / "play")))
    played = json.loads((tmp_path / "play" / "play.json").read_text())
    assert played["num_frames"] == 11 and (tmp_path / "play" / "play.gif").stat().st_size > 0
