"""Genie 2 variant: latent VQ + causal space-time transformer over frame codes, action sets,
classifier-free guidance, min-p / Gumbel sampling, KV cache, the latents pipeline through the real
loop, and the typed-action play loop."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from conftest import SMOKE_DATA, SMOKE_TOKENIZER, compose_config, save_checkpoint
from omegaconf import OmegaConf
from PIL import Image

from worldmodel.config import instantiate, validate
from worldmodel.eval.runner import evaluate
from worldmodel.models.genie2 import Genie2WorldModel, gumbel_sample, min_p_filter
from worldmodel.pipeline import PipelineError, build_datasets
from worldmodel.play import play
from worldmodel.play.typed import genie2_world, parse_actions, run_typed
from worldmodel.train.logging import read_metrics
from worldmodel.train.loop import train

A = 8  # actions; procgen's `right` is 7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _model(**kwargs) -> Genie2WorldModel:
    torch.manual_seed(0)
    sizes = dict(
        latent_dim=3,
        num_actions=A,
        grid=(4, 4),
        max_frames=4,
        codebook_size=32,
        code_dim=8,
        hidden_dim=16,
        dim=32,
        depth=2,
        heads=2,
        cond_mode="add",  # the action moves the logits from the first step (adaln starts at 0)
    )
    return Genie2WorldModel(**{**sizes, **kwargs}).eval()


def _codes(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32, (b, t, 4, 4), generator=torch.Generator().manual_seed(seed))


def _actions(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, A, (b, t), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_loss_on_latents_and_codes():
    model = _model().train()
    latents = torch.randn(2, 4, 4, 4, 3)
    batch = {"latents": latents, "actions": _actions(2, 4), "mask": torch.ones(2, 4).bool()}
    loss, metrics = model.loss(batch)
    loss.backward()
    for key in ("ce", "masked_acc", "rec_mse", "quantizer_loss", "codebook/usage"):
        assert torch.isfinite(metrics[key]), key
    assert 0 <= float(metrics["masked_acc"]) <= 1
    assert (
        model.code_emb.weight.grad is not None
        and model.latent_vq.to_code.conv.weight.grad is not None
    )
    model.eval()
    codes = model.encode(latents)
    assert codes.shape == (2, 4, 4, 4) and codes.dtype == torch.long
    assert model.decode_latents(codes).shape == (2, 4, 4, 4, 3)
    assert model.logits(codes, _actions(2, 4)).shape == (2, 4, 4, 4, 32)
    _, from_codes = model.loss({"tokens": codes, "actions": _actions(2, 4)})
    assert "rec_mse" not in from_codes and torch.isfinite(from_codes["ce"])
    assert model.generate_next(codes[:, :2], _actions(2, 2)).shape == (2, 4, 4)
    assert model.rollout(codes[:, :1], _actions(2, 6), horizon=6).shape == (2, 6, 4, 4)
    # the last step's action (leading out of the clip) may be unknown (-1): it conditions nothing
    acts = _actions(2, 4)
    acts[:, -1] = -1
    model.loss({"tokens": codes, "actions": acts})


def test_bad_inputs_raise_clear_errors():
    model = _model()
    codes = _codes(1, 2)
    with pytest.raises(ValueError, match=r"action ids must be in \[0, 8\)"):
        model.generate_next(codes, torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="multi-hot"):
        model.generate_next(codes, torch.full((1, 2, A), 2.0))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 32\)"):
        model.generate_next(codes + 32, _actions(1, 2))
    with pytest.raises(ValueError, match=r"\(h, w, D\) = \(4, 4, 3\)"):
        model.loss({"latents": torch.randn(1, 2, 4, 4, 5), "actions": _actions(1, 2)})
    with pytest.raises(ValueError, match="min_p"):
        min_p_filter(torch.zeros(3), 1.5)


def test_causality_of_the_latent_encoder_and_the_transformer():
    model = _model(temporal_kernel=2)
    latents = torch.randn(1, 4, 4, 4, 3)
    changed = latents.clone()
    changed[:, 2:] = torch.randn(1, 2, 4, 4, 3)
    # the causal temporal conv: codes of frames 0..1 never see frames 2..3
    assert torch.equal(model.encode(latents)[:, :2], model.encode(changed)[:, :2])
    # it does read the past: frame 1's pre-quantization features change with frame 0
    x = model.latent_vq.to_code(model.latent_vq.encoder(latents.permute(0, 1, 4, 2, 3)))
    y = model.latent_vq.to_code(model.latent_vq.encoder(changed.flip(1).permute(0, 1, 4, 2, 3)))
    assert not torch.allclose(x[:, 3], y[:, 3])

    codes, actions = _codes(1, 4), _actions(1, 4)
    future_codes, future_actions = codes.clone(), actions.clone()
    future_codes[:, 2:] = (codes[:, 2:] + 5) % 32
    future_actions[:, 2:] = (actions[:, 2:] + 3) % A
    a = model.logits(codes, actions)
    b = model.logits(future_codes, future_actions)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-5)
    assert not torch.allclose(a[:, 2:], b[:, 2:], atol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0},
        {"temperature": 0.0},
        {"temperature": 1.0, "cond_scale": 3.0, "min_p": 0.05},
    ],
)
def test_cached_and_uncached_sampling_agree(kwargs):
    model = _model()
    context, actions = _codes(2, 2), _actions(2, 9)
    # 2 context + 7 frames with max_frames=4: the window slides and the cache is rebuilt
    cached = model.rollout(
        context, actions, 7, generator=torch.Generator().manual_seed(3), **kwargs
    )
    plain = model.rollout(
        context,
        actions,
        7,
        generator=torch.Generator().manual_seed(3),
        use_cache=False,
        **kwargs,
    )
    assert torch.equal(cached, plain)
    assert len(cached.unique()) > (1 if kwargs["temperature"] == 0 else 8)  # real, varied samples

    # a cache carried across calls (as play does) gives the frames of a fresh one
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    cache = model.new_cache(context, actions[:, :1])
    first = model.generate_next(context, actions[:, :2], cache=cache, generator=gen(), **kwargs)
    grown = torch.cat([context, first[:, None]], dim=1)
    again = model.generate_next(grown, actions[:, :3], cache=cache, generator=gen(), **kwargs)
    fresh = model.generate_next(grown, actions[:, :3], use_cache=False, generator=gen(), **kwargs)
    assert torch.equal(again, fresh)


def test_cond_scale_one_is_plain_conditional_sampling_and_guidance_changes_it():
    model = _model()
    codes, actions = _codes(2, 3), _actions(2, 3)
    logits = model.logits(codes, actions)[:, -1].flatten(1, 2).float()  # (B, N, K)
    expected = gumbel_sample(logits, 1.0, torch.Generator().manual_seed(4)).view(2, 4, 4)
    got = model.generate_next(codes, actions, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, expected)
    # the guidance formula itself at scale 1 returns the conditional logits
    hidden = {
        s: model.forward(codes.flatten(2), model.action_cond(model.action_sets(actions), s == "u"))[
            :, -1
        ]
        for s in ("cond", "u")
    }
    hidden["uncond"] = hidden.pop("u")
    assert torch.allclose(model.guided_logits(hidden, 1.0), logits, atol=1e-5)
    guided = [
        model.generate_next(
            codes, actions, temperature=0.0, cond_scale=s, generator=torch.Generator()
        )
        for s in (1.0, 4.0)
    ]
    assert (guided[0] != guided[1]).float().mean() > 0.05


def _toy_batch(b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Clips where the action alone sets the next frame: every code of frame t+1 is 3 a_t."""
    actions = torch.randint(0, A, (b, 3), generator=gen)
    tokens = torch.randint(0, 32, (b, 3, 4, 4), generator=gen)
    tokens[:, 1:] = (3 * actions[:, :2])[:, :, None, None].expand(-1, -1, 4, 4)
    return {"tokens": tokens, "actions": actions}


def test_different_actions_change_generated_frames():
    model = _model(action_drop_prob=0.2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(150):
        loss, metrics = model.loss(_toy_batch(16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # no action dropout: every next frame is determined by its action
    _, metrics = model.loss(_toy_batch(64, gen))
    assert metrics["masked_acc"] > 0.9, metrics
    context = _codes(1, 2)
    for a in range(A):
        # min-p cuts the sampled tail the short training leaves on the other codes
        frame = model.generate_next(
            context, torch.tensor([[1, a]]), min_p=0.2, generator=torch.Generator().manual_seed(a)
        )
        assert (frame == 3 * a).float().mean() > 0.9, (a, frame)
    # guidance keeps (and sharpens) the control the model learned
    guided = model.generate_next(context, torch.tensor([[1, 6]]), temperature=0.0, cond_scale=3.0)
    assert (guided == 18).all()


def test_min_p_keeps_only_codes_above_min_p_times_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = torch.isfinite(min_p_filter(logits, 0.4))  # threshold 0.4 * 0.5 = 0.2
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(min_p_filter(logits, 0.0)).all()
    assert torch.isfinite(min_p_filter(logits, 1.0)).tolist() == [True, False, False, False]
    draws = gumbel_sample(
        min_p_filter(logits.expand(4000, 4), 0.4), 1.0, torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(draws, minlength=4)
    assert counts[2:].sum() == 0
    # the kept codes keep their relative odds: 0.5 : 0.3 -> 62.5% code 0
    assert abs(counts[0].item() / 4000 - 0.625) < 0.04
    # temperature 0 is the argmax, with or without noise
    assert gumbel_sample(logits, 0.0).item() == 0


def test_action_sets_sum_embeddings_and_match_ids():
    model = _model()
    codes, ids = _codes(2, 3), _actions(2, 3)
    one_hot = torch.nn.functional.one_hot(ids, A).float()
    assert torch.equal(model.logits(codes, ids), model.logits(codes, one_hot))
    both = torch.zeros(1, 1, A)
    both[0, 0, [3, 5]] = 1.0
    w, b = model.action_emb.weight, model.action_emb.bias
    assert torch.allclose(model.action_cond(both)[0, 0], w[:, 3] + w[:, 5] + b, atol=1e-6)
    ctx = codes[:1, :2]
    sets = torch.zeros(1, 2, A)
    sets[0, 1, [3, 5]] = 1.0
    pair = model.logits(ctx, sets)[:, -1]
    for single in (3, 5):
        alone = model.logits(ctx, torch.tensor([[0, single]]))[:, -1]
        assert not torch.allclose(pair, alone, atol=1e-3)
    assert model.generate_next(ctx, sets).shape == (1, 4, 4)


def test_parse_actions():
    names = {"right": 7, "jump": 5}
    assert parse_actions("right\n", names, A) == [7]
    assert parse_actions("right+jump", names, A) == [5, 7]
    assert parse_actions("3 5", names, A) == [3, 5]
    assert parse_actions("", names, A) == []
    assert parse_actions(" Q ", names, A) is None
    with pytest.raises(ValueError, match="unknown action 'fly'"):
        parse_actions("right+fly", names, A)
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        parse_actions("9", names, A)


def _tokenizer(path, data_cfg) -> torch.nn.Module:
    """A randomly initialised tokenizer saved as a real checkpoint (its encoder is the frozen
    image encoder; nothing here needs it trained)."""
    torch.manual_seed(0)
    tokenizer = instantiate(OmegaConf.create(SMOKE_TOKENIZER)).eval()
    save_checkpoint(SMOKE_TOKENIZER, data_cfg, path, tokenizer)
    return tokenizer


def test_typed_loop_writes_a_frame_per_line(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tok.pt", {})
    model = _model(latent_dim=4, grid=(8, 8))
    prompt = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    world = genie2_world(model, tokenizer, prompt, temperature=1.0, cond_scale=2.0, min_p=0.1)
    script = io.StringIO("right\nright+jump\n3 5\nfly\n\n7\n1\nq\nright\n")
    printed = io.StringIO()
    result = run_typed(world, tmp_path / "play", script, {"right": 7, "jump": 5}, out=printed)
    # 6 steps (the typo is skipped; `q` ends before the last line), one more than max_frames=4
    assert result["actions"] == [[7], [5, 7], [3, 5], [], [7], [1]]
    assert result["num_frames"] == 7 and result["frames_per_s"] > 0
    pngs = sorted(p.name for p in (tmp_path / "play").glob("frame_*.png"))
    assert pngs == [f"frame_{i:04d}.png" for i in range(7)]
    with Image.open(tmp_path / "play" / "frame_0003.png") as image:
        assert image.size == (64, 64)
    with Image.open(tmp_path / "play" / "typed.gif") as gif:
        assert gif.n_frames >= 2  # Pillow merges identical consecutive frames
    text = printed.getvalue()
    assert "skipped 'fly'" in text and "fps" in text and text.count("step ") == 6


def test_smoke_run_learns_on_cached_latents(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(
        ["experiment=smoke_genie2", *SMOKE_DATA, "trainer.val_every=30"],
        run_dir=run_dir,
    )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    tok = tmp_path / "tokenizer.pt"
    _tokenizer(tok, data)
    cfg.model.pipeline.tokenizer_checkpoint = str(tok)
    train(validate(cfg))

    rows = read_metrics(run_dir / "metrics.jsonl")
    ce = [r["train/ce"] for r in rows if "train/ce" in r]
    rec = [r["train/rec_mse"] for r in rows if "train/rec_mse" in r]
    assert len(ce) >= 6
    # chance is ln(64) = 4.16 nats; the untrained model sits at it. The model's own codebook
    # still moves in 60 steps (k-means init, EMA, restarts), so the margins are moderate.
    assert ce[0] > 3.9 and sum(ce[-3:]) / 3 < ce[0] - 0.3, ce
    assert rec[-1] < 0.5 * rec[0], rec
    # ... and not by collapsing the codebook: the codes still carry the frames
    perplexity = [r["codebook/perplexity"] for r in rows if "train/ce" in r]
    assert perplexity[-1] > 4.0, perplexity
    val = [r["val/ce"] for r in rows if "val/ce" in r]
    assert val[0] > 4.0 and val[-1] < val[0] - 0.5, val

    # the pipeline cached float16 latents (N, h, w, D) beside the frames, and clips carry them
    train_ds, _ = build_datasets(cfg)
    assert train_ds.frames_path.name == "train_latents.npy"
    cached = np.load(train_ds.frames_path, mmap_mode="r")
    assert cached.dtype == np.float16 and cached.shape[1:] == (8, 8, 4)
    assert train_ds[0]["latents"].shape == (4, 8, 8, 4)
    bad = cfg.copy()
    bad.model.latent_dim = 5
    with pytest.raises(PipelineError, match="model.latent_dim=5"):
        build_datasets(bad)
    bad.model.pipeline.inputs = "pixels"
    with pytest.raises(PipelineError, match="model.pipeline.inputs='pixels'"):
        build_datasets(bad)
    assert math.isfinite(rows[-1].get("val/loss", 0.0))

    # task=play on the trained checkpoint goes through the typed loop: one frame per entry
    play_dir = tmp_path / "play"
    last = run_dir / "checkpoints" / "last.pt"
    overrides = ["task=play", f"checkpoint={last}", "++play.actions=[7,'7+5',3]"]
    play_cfg = compose_config(
        ["experiment=smoke_genie2", *SMOKE_DATA, *overrides], run_dir=play_dir
    )
    record = play(play_cfg)
    assert record["actions"] == [[7], [5, 7], [3]] and record["num_frames"] == 4
    assert len(list(play_dir.glob("frame_*.png"))) == 4 and (play_dir / "play.json").is_file()

    # task=eval runs the shared world-model evaluation on the cached latents: genie2's own codes
    # are decoded through its latent decoder and the frozen tokenizer
    eval_dir = tmp_path / "eval"
    overrides = ["task=eval", f"checkpoint={last}", "eval.batches=1", "eval.batch_size=4"]
    eval_cfg = compose_config(
        ["experiment=smoke_genie2", *SMOKE_DATA, *overrides], run_dir=eval_dir
    )
    result = evaluate(eval_cfg)
    m = result["metrics"]
    assert result["model"] == "genie2" and result["num_clips"] == 4
    assert len(m["rollout_psnr"]) == 3 and all(math.isfinite(v) for v in m["rollout_psnr"])
    assert math.isfinite(m["delta_psnr"]) and 0.0 <= m["masked_acc"] <= 1.0
    assert (eval_dir / "eval.json").is_file() and (eval_dir / "rollout.gif").is_file()
