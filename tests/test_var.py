"""VAR world model: the multi-scale residual quantizer, the block-causal mask, one network pass per
scale, cached == uncached sampling, learning, bad configs, and train + eval + play through the
tasks run.py dispatches to."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SMOKE_DATA, SMOKE_TOKENIZER, compose_config, save_checkpoint
from omegaconf import OmegaConf

from worldmodel.config import ConfigError, validate
from worldmodel.models.var import VARWorldModel, block_causal_mask, parse_scales
from worldmodel.tasks import run_task
from worldmodel.train.logging import read_metrics
from worldmodel.world import World

A = 8  # actions


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _model(**kwargs) -> VARWorldModel:
    torch.manual_seed(0)
    sizes = dict(
        latent_dim=3,
        num_actions=A,
        grid=(4, 4),  # scales 1, 2, 4: L = 1 + 4 + 16 = 21 codes per frame
        max_frames=4,
        codebook_size=32,
        code_dim=8,
        hidden_dim=16,
        dim=32,
        depth=2,
        heads=2,
        vq={"kmeans_init": False, "threshold_ema_dead_code": 1},
    )
    return VARWorldModel(**{**sizes, **kwargs}).eval()


def _actions(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, A, (b, t), generator=torch.Generator().manual_seed(seed))


def _smooth_latents(n: int, seed: int = 0) -> torch.Tensor:
    """Frame latents (n, D=3, 4, 4) with coarse structure plus detail, as real latents have."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 1, 1, generator=gen) * 2
    mid = torch.nn.functional.interpolate(torch.randn(n, 3, 2, 2, generator=gen), (4, 4))
    return coarse + mid + 0.3 * torch.randn(n, 3, 4, 4, generator=gen)


def test_residual_quantizer_sums_its_scales_and_improves_with_each():
    model = _model().train()
    q = model.quantizer
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    for i in range(60):
        z = _smooth_latents(64, seed=i)
        f_hat, _, commit, _ = q.quantize(q.encoder(z))
        loss = (q.decode(f_hat) - z).pow(2).mean() + commit
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        f = q.encoder(_smooth_latents(256, seed=999))
        f_hat, ids, _, _ = q.quantize(f)
        assert [tuple(i.shape[1:]) for i in ids] == [(1, 1), (2, 2), (4, 4)]
        terms = q.contributions(ids)
        # f_hat is exactly the sum of the scales' terms phi_k(up(lookup(r_k)))
        assert torch.equal(f_hat, terms[0] + terms[1] + terms[2])
        errors, partial = [], torch.zeros_like(f)
        for term in terms:
            partial = partial + term
            errors.append(float((partial - f).pow(2).mean()))
    assert errors[0] < float(f.pow(2).mean()), errors  # one 1x1 code beats nothing
    assert errors[0] > errors[1] > errors[2], errors  # every finer scale reconstructs better
    # the codes decode to latents through the model's own path, frame by frame
    codes = model.encode(_smooth_latents(2).permute(0, 2, 3, 1)[:, None])  # (2, 1, 1, 21)
    assert codes.shape == (2, 1, 1, 21) and model.decode_latents(codes).shape == (2, 1, 4, 4, 3)


def test_block_causal_attention_over_scales_and_frames():
    mask = block_causal_mask(torch.tensor([0, 1, 1, 2, 2, 2]), past=2)
    assert mask[:, :2].all()  # cached tokens are of earlier blocks: seen by all
    own = mask[:, 2:].int().tolist()
    assert own[0] == [1, 0, 0, 0, 0, 0]  # block 0 sees itself only
    assert own[1] == own[2] == [1, 1, 1, 0, 0, 0]  # block 1: block 0 and all of itself
    assert own[3] == own[5] == [1] * 6

    # in the model: a scale's logits do not move when a later scale or a later frame changes
    model = _model()
    codes = model.encode(torch.randn(1, 4, 4, 4, 3))
    actions = _actions(1, 4)
    base = model.logits(codes, actions)  # (1, 3, 21, 32): frames 1..3
    later_scale = codes.clone()
    later_scale[0, 2, 0, 5:] = (later_scale[0, 2, 0, 5:] + 7) % 32  # frame 2's 4x4 codes
    out = model.logits(later_scale, actions)
    assert torch.allclose(out[:, :2], base[:, :2], atol=1e-5)  # frames 1 and 2 ...
    # ... no query of frame 2 reads its own 4x4 codes (the last scale's inputs are the scales
    # before it); frame 3 does, through the previous frame's code embeddings
    assert not torch.allclose(out[:, 2], base[:, 2], atol=1e-4)
    later_frame = codes.clone()
    later_frame[0, 3] = (later_frame[0, 3] + 3) % 32
    assert torch.allclose(model.logits(later_frame, actions)[:, :2], base[:, :2], atol=1e-5)
    changed_scale1 = codes.clone()
    changed_scale1[0, 1, 0, 0] = (changed_scale1[0, 1, 0, 0] + 1) % 32
    out = model.logits(changed_scale1, actions)
    assert torch.allclose(out[:, 0, :1], base[:, 0, :1], atol=1e-5)  # scale 1 does not see r_1
    assert not torch.allclose(out[:, 0, 1:], base[:, 0, 1:], atol=1e-4)  # scale 2 does


def _count_passes(model: VARWorldModel) -> list[int]:
    calls = [0]
    model.transformer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_one_network_pass_per_scale_and_cached_equals_uncached():
    model = _model()
    calls = _count_passes(model)
    codes, actions = model.encode(torch.randn(2, 2, 4, 4, 3)), _actions(2, 9)
    cache = model.new_cache(codes, actions[:, :1])
    calls[0] = 0
    frame = model.generate_next(codes, actions[:, :2], cache=cache)
    assert calls[0] == len(model.scales) == 3 and frame.shape == (2, 1, 21)
    grown = torch.cat([codes, frame[:, None]], dim=1)
    calls[0] = 0
    model.generate_next(grown, actions[:, :3], cache=cache)  # the new frame rides in pass 1
    assert calls[0] == 3

    for temperature in (1.0, 0.0):

        def gen() -> torch.Generator:
            return torch.Generator().manual_seed(3)

        # 2 context + 5 frames with max_frames=4: the window slides and the cache is rebuilt
        kw = {"temperature": temperature, "generator": gen()}
        cached = model.rollout(codes, actions, 5, **kw)
        plain = model.rollout(codes, actions, 5, use_cache=False, **{**kw, "generator": gen()})
        assert torch.equal(cached, plain) and cached.shape == (2, 5, 1, 21)
        assert len(cached.unique()) > (1 if temperature == 0 else 8)
    # teacher forcing through one cache (as the evaluation runs): real frames replace the
    # generated ones, whose speculative query blocks are then recomputed
    real = model.encode(torch.randn(2, 4, 4, 4, 3))
    cache = model.new_cache(real[:, :1], actions[:, :0])
    for t in range(1, 4):
        a = model.generate_next(real[:, :t], actions[:, :t], cache=cache, temperature=0.0)
        b = model.generate_next(real[:, :t], actions[:, :t], use_cache=False, temperature=0.0)
        assert torch.equal(a, b), t
    with pytest.raises(ValueError, match="cache does not match"):
        model.generate_next(real[:, :3].flip(1), actions[:, :3], cache=cache)


def _toy_batch(b: int, gen: torch.Generator, model: VARWorldModel) -> dict[str, torch.Tensor]:
    """Code clips where the action alone sets the next frame: every code of frame t+1 is 3 a_t."""
    actions = torch.randint(0, A, (b, 3), generator=gen)
    tokens = torch.randint(0, 32, (b, 3, 1, model.code_len), generator=gen)
    tokens[:, 1:] = (3 * actions[:, :2])[:, :, None, None].expand(-1, -1, 1, model.code_len)
    return {"tokens": tokens, "actions": actions}


def test_training_lowers_the_loss_and_actions_control_the_frames():
    model = _model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(80):
        loss, metrics = model.loss(_toy_batch(16, gen, model))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], (losses[0], losses[-5:])
    model.eval()
    context = model.encode(torch.randn(1, 1, 4, 4, 3))
    for a in (1, 6):
        frame = model.generate_next(context, torch.tensor([[a]]), temperature=0.0)
        assert (frame == 3 * a).float().mean() > 0.9, (a, frame)
    # latents train the quantizer too (reconstruction + commitment)
    model.train()
    latents = torch.randn(2, 3, 4, 4, 3)
    loss, metrics = model.loss({"latents": latents, "actions": _actions(2, 3)})
    loss.backward()
    for key in ("ce", "masked_acc", "rec_mse", "quantizer_loss", "codebook/usage"):
        assert torch.isfinite(metrics[key]), key
    assert model.quantizer.encoder[0].weight.grad is not None
    assert model.quantizer.phi[0].weight.grad is not None


def test_bad_scales_and_inputs_are_rejected_clearly():
    assert parse_scales(None, (8, 8)) == ((1, 1), (2, 2), (4, 4), (8, 8))
    assert parse_scales(None, (6, 8))[-1] == (6, 8)
    assert parse_scales([1, [2, 3], [4, 6]], (4, 6)) == ((1, 1), (2, 3), (4, 6))
    with pytest.raises(ValueError, match="the last scale must be the grid 8x8, got 4x4"):
        parse_scales([1, 2, 4], (8, 8))
    with pytest.raises(ValueError, match="scales must increase"):
        parse_scales([1, 4, 2, 8], (8, 8))
    with pytest.raises(ValueError, match="scales must increase"):
        parse_scales([1, 2, 2, 8], (8, 8))
    with pytest.raises(ValueError, match="outside the 8x8 grid"):
        parse_scales([1, 16], (8, 8))
    with pytest.raises(ValueError, match="the last scale must be the grid"):
        _model(scales=[1, 2])
    cfg = compose_config(["experiment=smoke_var", "model.scales=[1,4,2,8]"])
    cfg.model.pipeline.tokenizer_checkpoint = "unused.pt"
    with pytest.raises(ConfigError, match=r"model.scales=\[1, 4, 2, 8\]: scales must increase"):
        validate(cfg)
    model = _model()
    with pytest.raises(ValueError, match=r"codes \(B, T, 1, L=21"):
        model.generate_next(torch.zeros(1, 1, 4, 4, dtype=torch.long), _actions(1, 1))
    with pytest.raises(ValueError, match=r"action ids must be in \[0, 8\)"):
        model.generate_next(torch.zeros(1, 1, 1, 21, dtype=torch.long), torch.tensor([[8]]))
    with pytest.raises(ValueError, match="exceeds max_frames=4"):
        model.generate_next(torch.zeros(1, 4, 1, 21, dtype=torch.long), _actions(1, 4))


def test_smoke_trains_evaluates_and_plays_through_the_tasks(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(["experiment=smoke_var", *SMOKE_DATA], run_dir=run_dir)
    torch.manual_seed(0)  # a random tokenizer: its encoder is the frozen image encoder
    data = OmegaConf.to_container(cfg.data, resolve=True)
    tok = save_checkpoint(SMOKE_TOKENIZER, data, tmp_path / "tokenizer.pt")
    cfg.model.pipeline.tokenizer_checkpoint = str(tok)
    run_task(validate(cfg))

    rows = read_metrics(run_dir / "metrics.jsonl")
    ce = [r["train/ce"] for r in rows if "train/ce" in r]
    rec = [r["train/rec_mse"] for r in rows if "train/rec_mse" in r]
    assert len(ce) >= 6
    # chance is ln(64) = 4.16 nats. The shared codebook fills up while the transformer learns
    # (perplexity ~7 -> ~45 in 60 steps), so the targets get harder: the CE also beats the
    # entropy of the codes' own histogram (what predicting their frequencies alone scores)
    perplexity = [r["codebook/perplexity"] for r in rows if "train/ce" in r]
    assert ce[0] > 3.5 and sum(ce[-3:]) / 3 < ce[0] - 0.25, ce
    assert sum(ce[-3:]) / 3 < math.log(perplexity[-1]) - 0.2, (ce, perplexity)
    assert rec[-1] < 0.5 * rec[0], rec
    val = [r["val/ce"] for r in rows if "val/ce" in r]
    assert val[-1] < val[0] - 0.25, val

    # task=eval: the shared world-model evaluation, the same eval.json keys as every model
    last = run_dir / "checkpoints" / "last.pt"
    eval_dir = tmp_path / "eval"
    overrides = ["task=eval", f"checkpoint={last}", "eval.batches=1", "eval.batch_size=4"]
    eval_cfg = compose_config(["experiment=smoke_var", *SMOKE_DATA, *overrides], run_dir=eval_dir)
    run_task(validate(eval_cfg))
    result = json.loads((eval_dir / "eval.json").read_text())
    m = result["metrics"]
    assert result["model"] == "var" and result["num_clips"] == 4
    assert len(m["rollout_psnr"]) == 3 and all(math.isfinite(v) for v in m["rollout_psnr"])
    assert math.isfinite(m["delta_psnr"]) and 0.0 <= m["masked_acc"] <= 1.0

    # task=play, headless: one frame per scripted step
    play_dir = tmp_path / "play"
    overrides = ["task=play", f"checkpoint={last}", "++play.actions=[7,7,3,5,7]"]
    play_cfg = compose_config(["experiment=smoke_var", *SMOKE_DATA, *overrides], run_dir=play_dir)
    record = run_task(validate(play_cfg))
    assert record["num_frames"] == 6 and (play_dir / "play.json").is_file()
    assert len(list(play_dir.glob("frame_*.png"))) == 6

    # the World: reset on a picture, step through more frames than the window holds
    world = World.load(last)
    world.configure(temperature=0.0)
    prompt = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    video = world.rollout([7, 3, 7, 5, 7, 7], prompt)
    assert video.shape == (7, 64, 64, 3) and video.dtype == np.uint8
