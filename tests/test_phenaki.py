"""Phenaki: text-conditioned MaskGIT over video tokens (guidance, frame masks, token critic,
continuation, make_video), the caption rule of the captioned procgen data, and a smoke run
through the real loop, the token pipeline and the text-video evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch
from conftest import compose_config
from einops import rearrange
from omegaconf import OmegaConf, open_dict

from worldmodel.build import load_model
from worldmodel.config import instantiate, validate
from worldmodel.data.captions import caption, captions_from_actions, motion
from worldmodel.eval.runner import evaluate
from worldmodel.eval.text_video import make_video
from worldmodel.models.phenaki import PhenakiModel, TokenCritic, prime_time_mask
from worldmodel.train.checkpoint import atomic_save
from worldmodel.train.logging import read_metrics
from worldmodel.train.loop import train

V, H, W, T = 8, 3, 3, 4
FAST = ["logger=none", "trainer.progress=false", "trainer.threads=1"]
TOKENIZER = {  # random weights: its tokens still follow the frames, which is all the test needs
    "_target_": "worldmodel.models.tokenizer.VideoTokenizer",
    "name": "tokenizer",
    "channels": [8, 16],
    "spatial_downsample": 8,  # 64x64 frames -> 8x8 tokens
    "num_res_blocks": 1,
    "num_mid_blocks": 1,
    "quantizer": {"kind": "fsq", "levels": [8, 5, 5, 5]},  # 1000 codes
}
DATA = [
    "data.train_frames_per_game=400",
    "data.val_frames_per_game=200",
    "data.num_envs=4",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs) -> PhenakiModel:
    torch.manual_seed(0)
    args = dict(
        vocab_size=V,
        grid=(H, W),
        max_frames=T,
        dim=32,
        depth=1,
        heads=2,
        text_dim=32,
        text_depth=1,
        text_max_len=16,
        games=["coinrun", "bigfish"],
        num_actions=30,
    )
    args.update(kwargs)
    return PhenakiModel(**args)


def text_task(b: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Clips whose every token is 1 for the text "one" and 2 for "two" (plus noise tokens)."""
    which = torch.randint(0, 2, (b,), generator=gen)
    tokens = (which + 1)[:, None, None, None].expand(b, T, H, W).clone()
    noise = torch.rand(tokens.shape, generator=gen) < 0.1
    tokens[noise] = torch.randint(3, V, (int(noise.sum()),), generator=gen)
    return tokens, ["one" if w == 0 else "two" for w in which.tolist()]


def fit_text_task(model: PhenakiModel, steps: int = 80) -> PhenakiModel:
    from worldmodel.models.text import encode_bytes

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        tokens, texts = text_task(16, gen)
        loss, _ = model.loss({"tokens": tokens, "text": encode_bytes(texts, 16)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def fitted() -> PhenakiModel:
    torch.set_num_threads(1)
    return fit_text_task(tiny(cond_drop_prob=0.2))


def test_caption_rule_on_hand_made_actions() -> None:
    # procgen buttons: 1 left, 7 right, 5 up, 3 down, 2 up-left, 4 no-op, 9..14 letter keys
    assert motion([1, 1, 7]) == "moving left"
    assert motion([7, 1, 1, 7]) == "moving right"  # a tie goes to the direction reached first
    assert motion([4, 9, 14, 2]) == "standing still"
    assert motion([2, 2, 5]) == "moving up-left"
    assert caption("bigfish", [1, 1, 1]) == "bigfish, moving left"
    actions = torch.tensor([[15 + 7, 15 + 7, 15 + 1, 15 + 3], [1, 1, 7, 7]])  # joint ids
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    # row 0: bigfish, transitions 0..2 (the last action leads out of the clip)
    # row 1: coinrun, only the transition between its two real frames counts
    assert captions_from_actions(actions, ["coinrun", "bigfish"], mask) == [
        "bigfish, moving right",
        "coinrun, moving left",
    ]
    with pytest.raises(ValueError, match=r"joint action ids must be in \[0, 30\)"):
        captions_from_actions(torch.tensor([[31, 0]]), ["coinrun", "bigfish"])


def test_shapes_and_bad_inputs() -> None:
    model = tiny().eval()
    tokens = torch.randint(0, V, (2, T, H, W))
    actions = torch.tensor([[1, 1, 7, 7], [16, 16, 16, 16]])
    loss, metrics = model.loss({"tokens": tokens, "actions": actions})
    assert loss.ndim == 0 and {"ce", "masked_acc", "mask_rate"} <= set(metrics)
    assert model.logits(tokens, ["a", "b"]).shape == (2, T, H, W, V)
    assert model.sample(["a", "b"], 3, steps=2).shape == (2, 3, H, W)
    assert model.generate_next(tokens[:, :2], actions, steps=2).shape == (2, H, W)
    assert model.rollout(tokens[:, :2], actions, 5, steps=2).shape == (2, 5, H, W)
    with pytest.raises(ValueError, match="grid"):
        model.loss({"tokens": torch.zeros(2, T, H + 1, W, dtype=torch.long), "actions": actions})
    with pytest.raises(ValueError, match="text_encoder"):
        tiny(text_encoder="clip")
    with pytest.raises(ValueError, match=r"num_frames=5"):
        model.sample(["a"], 5)


def test_cond_scale_one_is_plain_conditional_and_guidance_and_text_change_output(fitted) -> None:
    model = fitted
    x = torch.randint(0, V, (2, T, H * W))
    x[:, 1:] = model.mask_id
    ctx = model.encode_text(["one", "two"])
    real = torch.ones(2, T, dtype=torch.bool)
    plain = model.all_logits(x, ctx.features, ctx.mask, real).float()
    # the two-pass guided formula at scale 1 is the conditional logits
    torch.testing.assert_close(model.guided_logits(x, ctx, real, 1.0), plain, atol=1e-5, rtol=0)

    def run(texts: list[str], **kw) -> torch.Tensor:
        return model.sample(texts, T, steps=4, generator=torch.Generator().manual_seed(1), **kw)

    # cond_scale=1 samples exactly like the default (plain conditional) sampler
    assert torch.equal(run(["one"] * 4, cond_scale=1.0), run(["one"] * 4))
    # the text decides the video: "one" -> mostly 1s, "two" -> mostly 2s
    one, two = run(["one"] * 4, temperature=0.0), run(["two"] * 4, temperature=0.0)
    assert (one == 1).float().mean() > 0.8 and (two == 2).float().mean() > 0.8
    # guidance changes the samples
    assert not torch.equal(run(["one"] * 4, cond_scale=4.0), run(["one"] * 4))


def test_video_frame_mask_excludes_masked_frames() -> None:
    model = tiny().eval()
    tokens = torch.randint(0, V, (2, T, H, W))
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % V
    changed[1, 2:] = (changed[1, 2:] + 3) % V
    texts = ["one", "two"]
    a = model.logits(tokens, texts, mask)
    b = model.logits(changed, texts, mask)
    for i in range(2):
        torch.testing.assert_close(a[i][mask[i]], b[i][mask[i]], atol=1e-6, rtol=0)
    assert not torch.allclose(model.logits(changed, texts)[0, :3], a[0, :3])  # unmasked: it does

    def loss(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)
        from worldmodel.models.text import encode_bytes

        return model.loss({"tokens": x, "video_frame_mask": mask, "text": encode_bytes(texts, 8)})[
            0
        ]

    assert torch.equal(loss(tokens), loss(changed))


def test_prime_frames_are_kept_and_continue_video(fitted) -> None:
    prime = torch.randint(0, V, (2, 2, H, W))
    out = fitted.sample(["one", "two"], T, prime, steps=3, critic="self")
    assert out.shape == (2, T, H, W) and torch.equal(out[:, :2], prime)
    long = torch.randint(0, V, (2, 5, H, W))
    cont = fitted.continue_video(long, ["one", "two"], T, prime_frames=1, steps=2)
    assert torch.equal(cont[:, :1], long[:, -1:])


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_prime_frames_sample_the_same_tokens(fitted, cond_scale: float) -> None:
    """Prime frames encoded once (PrimeCache) give the same video as running the whole clip at
    every step; the prime frames read only each other, so what follows cannot change them."""
    gen = torch.Generator().manual_seed(3)
    tokens, texts = text_task(3, gen)
    for k in (1, 2):
        kwargs = dict(steps=3, temperature=1.0, cond_scale=cond_scale)
        cached = fitted.sample(
            texts, T, tokens[:, :k], generator=torch.Generator().manual_seed(5), **kwargs
        )
        plain = fitted.sample(
            texts,
            T,
            tokens[:, :k],
            generator=torch.Generator().manual_seed(5),
            use_cache=False,
            **kwargs,
        )
        assert torch.equal(cached, plain), k
    x = rearrange(tokens, "b t h w -> b t (h w)")
    ctx = fitted.encode_text(texts)
    real = torch.ones(3, T, dtype=torch.bool)
    prime = prime_time_mask(torch.full((3,), 2), T)
    other = x.clone()
    other[:, 2:] = fitted.mask_id  # the frames after the primes change ...
    with torch.no_grad():
        a = fitted.all_logits(x, ctx.features, ctx.mask, real, prime)[:, :2]
        b = fitted.all_logits(other, ctx.features, ctx.mask, real, prime)[:, :2]
    assert torch.allclose(a, b, atol=1e-5)  # ... and the prime frames' outputs do not


def test_prime_time_mask() -> None:
    mask = prime_time_mask(torch.tensor([0, 2]), 3)
    assert mask[0].all()  # no prime frames: every frame reads every frame
    expect = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[1], expect)


def test_token_critic_trains_and_changes_what_is_remasked(fitted) -> None:
    torch.manual_seed(0)
    critic = TokenCritic(vocab_size=V, grid=(H, W), max_frames=T, dim=32, depth=1, heads=2)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(80):
        tokens, _ = text_task(16, gen)
        loss, metrics = critic.loss({"tokens": tokens})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(metrics["bce"]))
    # chance is ~0.69 nats; replaced tokens of these clips stand out once it has learned
    assert sum(losses[-10:]) / 10 < 0.45, losses[::10]
    critic.eval()

    def run(**kw) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        return fitted.sample(["one", "two"] * 2, T, steps=6, generator=g, **kw)

    assert not torch.equal(run(critic=critic), run())  # the critic re-masks other tokens
    # re-sampling with the generator itself is a valid corruption too
    critic.set_generator(fitted)
    tokens, texts = text_task(4, gen)
    from worldmodel.models.text import encode_bytes

    loss, _ = critic.loss({"tokens": tokens, "text": encode_bytes(texts, 8)})
    assert torch.isfinite(loss)


def test_minilm_text_encoder_loads_offline_and_stays_out_of_checkpoints(monkeypatch, tmp_path):
    from worldmodel.models.text import encode_bytes

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        tiny(text_encoder="minilm", text_encoder_path=str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: the weights come from the package
    model = tiny(text_encoder="minilm")
    left, _ = model.text_encoder(["coinrun, moving left"])
    right, _ = model.text_encoder(["coinrun, moving right"])
    assert left.shape[-1] == 384 and not torch.allclose(left, right)
    assert not any(k.startswith("text_encoder") for k in model.state_dict())
    tokens = torch.randint(0, V, (2, T, H, W))
    texts = encode_bytes(["coinrun, moving left", "bigfish, moving up"], 32)
    loss, _ = model.loss({"tokens": tokens, "text": texts})
    loss.backward()
    assert model.text_proj.weight.grad is not None  # the projection trains, MiniLM does not


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, object]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("phenaki")
    torch.manual_seed(0)
    tokenizer = instantiate(OmegaConf.create(TOKENIZER)).eval()
    tok_path = root / "tokenizer.pt"
    atomic_save(
        {"model": tokenizer.state_dict(), "step": 0, "config": {"model": TOKENIZER, "data": {}}},
        tok_path,
    )
    run_dir = root / "run"
    overrides = [
        "experiment=smoke_phenaki",
        *FAST,
        *DATA,
        f"model.pipeline.tokenizer_checkpoint={tok_path}",
    ]
    cfg = validate(compose_config(overrides, run_dir=run_dir))
    train(cfg)
    return run_dir, cfg


def test_smoke_run_learns_and_evaluates(smoke_run, tmp_path: Path) -> None:
    run_dir, cfg = smoke_run
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/ce" in r]
    first, last = val[0], val[-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["val/ce"] < first["val/ce"] - 1.0, (first, last)  # chance: ln 1000 = 6.9

    with open_dict(cfg):
        cfg.task = "eval"
        cfg.checkpoint = str(run_dir / "checkpoints" / "last.pt")
        cfg.run_dir = str(tmp_path / "eval")
    evaluate(cfg)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"] == "phenaki" and result["step"] == 60
    m = result["metrics"]
    for key in ("ce", "masked_acc", "next_frame_token_acc", "classifier_val_acc"):
        assert 0 <= m[key] < 10, key
    assert 0 <= m["text_game_recognition"] <= 1 and "text_game_recognition_cfg3" in m
    assert (tmp_path / "eval" / result["media"]["make_video_mp4"]).is_file()


def test_make_video_writes_an_mp4_of_all_scenes(smoke_run, tmp_path: Path) -> None:
    run_dir, _ = smoke_run
    model, mcfg, _ = load_model(run_dir / "checkpoints" / "last.pt")
    tokenizer, _, _ = load_model(mcfg.model.pipeline.tokenizer_checkpoint)
    texts = ["coinrun, moving right", "bigfish, moving left", "bigfish, moving up"]
    path, video = make_video(
        model,
        tokenizer,
        texts,
        tmp_path / "scenes.mp4",
        frames_per_scene=4,
        prime_frames=1,
        steps=2,
        cond_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = 4 + 2 * (4 - 1)  # each later scene adds its frames after the primed one
    assert video.shape[1] == expected
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == expected
