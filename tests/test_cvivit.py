"""C-ViViT tokenizer: shapes, causality, images vs videos, the smoke run, eval, and the clip-wise
token pipeline for tokenizers that compress time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config

from worldmodel.build import load_model
from worldmodel.config import ConfigError, validate
from worldmodel.data.dataset import ClipDataset
from worldmodel.data.tokens import ClipwiseTokenDataset
from worldmodel.models.tokenizer_cvivit import CViViT
from worldmodel.pipeline import PipelineError, build_datasets
from worldmodel.tasks import run_task
from worldmodel.train.logging import read_metrics

FSQ = {"kind": "fsq", "levels": [8, 5, 5, 5]}
SMOKE = ["experiment=smoke_cvivit", "logger=none", "trainer.progress=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these small models gain nothing from two, and a shared machine stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs) -> CViViT:
    torch.manual_seed(0)
    cfg = dict(
        image_size=32,
        spatial_downsample=8,
        temporal_downsample=2,
        dim=32,
        heads=2,
        spatial_depth=1,
        temporal_depth=1,
        max_frames=9,
        quantizer=FSQ,
    )
    cfg.update(kwargs)
    return CViViT(**cfg).eval()


def video(b: int, t: int, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w) * 2 - 1


@pytest.mark.parametrize(
    ("size", "patch", "temporal"), [((32, 32), 8, 2), ((32, 48), 8, 2), ((16, 40), 4, 3)]
)
def test_shapes_square_and_rectangular(size: tuple[int, int], patch: int, temporal: int) -> None:
    H, W = size
    model = tiny(image_size=list(size), spatial_downsample=patch, temporal_downsample=temporal)
    T = 1 + 2 * temporal
    x = video(2, T, H, W)
    t, h, w = model.latent_shape(T, H, W)
    assert (t, h, w) == (3, H // patch, W // patch) and model.tokens_per_frame(H, W) == h * w
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 4, t, h, w)  # the FSQ's own width: 4 levels
        tokens = model.tokenize(x)
        assert tokens.shape == (2, t, h, w) and tokens.dtype == torch.long
        assert int(tokens.min()) >= 0 and int(tokens.max()) < model.codebook_size == 1000
        recon, idx = model.reconstruct(x)
        assert recon.shape == x.shape and torch.equal(idx, tokens)
        assert model.detokenize(tokens).shape == x.shape


def test_tokenize_detokenize_round_trip() -> None:
    """Indices -> codes -> indices is exact, and detokenize(tokenize(x)) is reconstruct(x)."""
    model = tiny(image_size=[32, 48])
    x = video(2, 5, 32, 48)
    with torch.no_grad():
        tokens = model.tokenize(x)
        codes = model.quantizer.indices_to_codes(tokens)  # (B, D, t, h, w)
        assert torch.equal(model.quantize(codes)[1], tokens)
        recon, _ = model.reconstruct(x)
        assert torch.allclose(model.detokenize(tokens), recon, atol=1e-5)
        # every token id decodes: random ids give a video of the right shape
        ids = torch.randint(0, model.codebook_size, tokens.shape)
        assert torch.isfinite(model.detokenize(ids)).all()


@pytest.mark.parametrize("temporal", [1, 2, 4])
def test_future_frames_never_change_past_tokens(temporal: int) -> None:
    model = tiny(temporal_downsample=temporal)
    T = 9
    x = video(1, T)
    with torch.no_grad():
        z = model.encode(x)
        tokens = model.tokenize(x)
        for cut in range(T - 1):  # change every frame after `cut`
            y = x.clone()
            y[:, :, cut + 1 :] = torch.rand_like(y[:, :, cut + 1 :]) * 2 - 1
            keep = cut // temporal + 1  # latent frames j with j * temporal <= cut
            z2 = model.encode(y)
            assert torch.allclose(z2[:, :, :keep], z[:, :, :keep], atol=1e-5)
            assert torch.equal(model.tokenize(y)[:, :keep], tokens[:, :keep])
            # not vacuous: the latent frames that hold changed frames do change
            assert (z2[:, :, keep:] - z[:, :, keep:]).abs().max() > 1e-3
        # the decoder is causal too: later latent frames never change earlier decoded frames
        codes = model.quantize(z)[0]
        late = codes.clone()
        late[:, :, 1:] = torch.randn_like(late[:, :, 1:])
        assert torch.allclose(
            model.decode(late)[:, :, :1], model.decode(codes)[:, :, :1], atol=1e-5
        )


def test_image_is_the_first_frame_of_a_video() -> None:
    """An image (a 1-frame clip) and a video starting with it share the first latent frame, so a
    model trained on images fine-tunes on video."""
    model = tiny(image_size=[32, 48])
    x = video(2, 5, 32, 48)
    with torch.no_grad():
        image = model.tokenize(x[:, :, :1])
        clip = model.tokenize(x)
        assert image.shape == (2, 1, 4, 6) and torch.equal(image, clip[:, :1])
        assert model.detokenize(image).shape == (2, 3, 1, 32, 48)
        assert torch.allclose(model.detokenize(image), model.detokenize(clip)[:, :, :1], atol=1e-5)
    # both kinds of clip train the same weights
    model.train()
    for clip_length in (1, 5):
        loss, metrics = model.loss({"video": x[:, :, :clip_length]})
        assert torch.isfinite(loss) and {"psnr", "codebook/usage"} <= set(metrics)
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "quantizer",
    [{"kind": "lfq", "codebook_size": 256}, {"kind": "vq", "codebook_size": 64, "codebook_dim": 8}],
)
def test_other_quantizers_and_the_gan_train(quantizer: dict) -> None:
    """LFQ / VQ through the shared adapter; the adaptive GAN weight reads the decoder's first-frame
    head, and the discriminator's own loss reaches only the discriminator."""
    model = tiny(quantizer=quantizer, gan_weight=0.5, disc_channels=8, disc_layers=2).train()
    batch = {"video": video(2, 5)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(batch, step=0)
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["gan/d_weight"]) > 0
    assert all(p.grad is None for p in model.discriminator.parameters())
    d_loss, _ = model.discriminator_loss(batch)
    d_loss.backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert int(model.tokenize(video(1, 3)).max()) < model.codebook_size


def test_bad_input_raises_clear_errors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"temporal_downsample=2 needs \(T - 1\)"):
        model.encode(video(1, 4))
    with pytest.raises(ValueError, match="image_size=\\[32, 32\\].*got frames of 32x48"):
        model.encode(video(1, 3, 32, 48))
    with pytest.raises(ValueError, match="more than max_frames=9"):
        model.encode(video(1, 19))
    with pytest.raises(ValueError, match="must divide image_size=30x32"):
        tiny(image_size=[30, 32])
    with pytest.raises(ValueError, match="image_size"):
        tiny(image_size=[32, 32, 3])
    with pytest.raises(ValueError, match="spatial_depth=0"):
        tiny(spatial_depth=0)
    # the config is rejected before any work, naming the keys
    for override, message in [
        ("data.clip_length=4", "data.clip_length=4 does not fit model.temporal_downsample=2"),
        ("data.resolution=60", "data.resolution=[60, 60] is not divisible by model.spatial"),
        ("model.image_size=[64,48]", "model.image_size=[64, 48] must equal data.resolution"),
        ("eval.clip_length=13", "eval.clip_length=13 makes 7 latent frames"),
        ("eval.clip_length=8", "eval.clip_length=8 does not fit model.temporal_downsample=2"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            validate(compose_config([*SMOKE, override]))
    validate(compose_config(["experiment=demo_cvivit"]))  # the demo recipe is valid as written


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke recipe trained through the one loop (30 steps), then evaluated (task=eval)."""
    run_dir = tmp_path_factory.mktemp("cvivit") / "train"
    overrides = [*SMOKE, "trainer.max_steps=30", "trainer.val_every=30", "eval.after_train=true"]
    run_task(validate(compose_config(overrides, run_dir=run_dir)))
    return run_dir


def test_smoke_run_learns_and_evaluates(smoke_run) -> None:
    rows = read_metrics(smoke_run / "metrics.jsonl")
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [0, 30]
    # the MSE of an untrained C-ViViT on CoinRun is ~0.3 (~11 dB); 30 steps cut it to ~0.1
    assert val[-1]["val/loss"] < 0.6 * val[0]["val/loss"], val
    assert val[-1]["val/psnr"] > val[0]["val/psnr"] + 3.0, val
    result = json.loads((smoke_run / "eval.json").read_text())
    assert result["model"] == "tokenizer_cvivit" and result["step"] == 30
    for key in ("psnr", "ssim", "codebook/usage", "codebook/perplexity", "tokens_per_frame"):
        assert key in result["metrics"], key
    assert result["metrics"]["tokens_per_frame"] == 64  # 8x8 tokens per latent frame
    assert 10 < result["metrics"]["psnr"] < 100
    for rel in result["media"].values():
        assert (smoke_run / rel).stat().st_size > 0


def test_clip_wise_pipeline_aligns_tokens_and_actions(smoke_run) -> None:
    """A tokenizer that compresses time is run on whole clips: (T', h, w) tokens per clip, equal
    to tokenizing that pixel clip, with the action at the last pixel frame of each latent frame."""
    ckpt = smoke_run / "checkpoints" / "last.pt"
    cfg = compose_config(
        [
            "experiment=smoke_dynamics",
            f"model.pipeline.tokenizer_checkpoint={ckpt}",
            "model.max_frames=3",
            "data.clip_length=5",
            "data.clip_stride=8",
        ]
    )
    train, val = build_datasets(cfg)
    pixels_train, pixels_val = compose_pixels(cfg)
    assert isinstance(train, ClipwiseTokenDataset) and len(train) == len(pixels_train)
    assert len(val) == len(pixels_val)
    tokenizer, _, _ = load_model(ckpt)
    for tokens, pixels in ((train, pixels_train), (val, pixels_val)):
        picks = [0, len(tokens) // 2, len(tokens) - 1]
        items = [tokens[i] for i in picks]
        clips = [pixels[i] for i in picks]
        for item, clip in zip(items, clips):
            assert item["tokens"].shape == (3, 8, 8) and item["tokens"].dtype == torch.long
            assert item["actions"].shape == (3,) and item["mask"].all()
            # latent frame j ends at pixel frame 2 j: its action leads into latent frame j + 1
            assert torch.equal(item["actions"], clip["actions"][[0, 2, 4]])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expect = tokenizer.tokenize(torch.stack([c["video"] for c in clips]))
        assert torch.equal(torch.stack([i["tokens"] for i in items]), expect)

    # a clip the tokenizer cannot split is refused, naming the key
    cfg.data.clip_length = 4
    with pytest.raises(PipelineError, match="data.clip_length=4 does not fit the tokenizer"):
        build_datasets(cfg)


def compose_pixels(cfg) -> tuple[ClipDataset, ClipDataset]:
    from worldmodel.config import instantiate

    return instantiate(cfg.data).datasets()


def test_grouped_tokens_take_the_action_ending_each_group(tmp_path) -> None:
    """Tokenizers that encode whole groups (VideoGPT: T' = T / k) end latent frame j at pixel
    frame (j + 1) k - 1; the alignment counts back from the clip's last frame."""
    cfg = compose_config(["experiment=smoke_cvivit", "data.clip_length=4"])
    _, pixels = compose_pixels(cfg)
    tokens_path = tmp_path / "tokens.npy"
    np.save(tokens_path, np.zeros((len(pixels), 2, 8, 8), dtype=np.int32))  # T' = 4 / 2
    clips = ClipwiseTokenDataset(pixels, tokens_path, pixels.actions_path, temporal_downsample=2)
    for i in (0, len(pixels) - 1):
        item = clips[i]
        assert item["tokens"].shape == (2, 8, 8) and item["mask"].shape == (2,)
        assert torch.equal(item["actions"], pixels[i]["actions"][[1, 3]])


def test_world_model_over_clip_wise_tokens_is_scored_in_pixel_frames(smoke_run, tmp_path) -> None:
    """Phenaki over C-ViViT tokens trains through the loop and is scored by the shared
    world-model evaluation: generated latent frames are decoded after their real context as one
    clip and compared with the pixel frames they cover (2 latent frames -> 4 pixel frames)."""
    ckpt = smoke_run / "checkpoints" / "last.pt"
    overrides = [
        "model=phenaki",
        "logger=none",
        "trainer.progress=false",
        f"model.pipeline.tokenizer_checkpoint={ckpt}",
        "model.vocab_size=1000",
        "model.num_actions=15",
        "model.games=[coinrun]",
        "model.max_frames=3",
        "optim.lr=3e-3",
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.text_dim=32",
        "model.text_depth=1",
        "model.text_max_len=32",
        "data.clip_length=5",
        "data.clip_stride=4",
        "data.num_envs=8",
        "data.train_frames=3000",
        "data.val_frames=640",
        "trainer.max_steps=40",
        "trainer.batch_size=8",
        "trainer.warmup_steps=10",
        "trainer.log_every=5",
        "trainer.val_every=40",
        "trainer.val_batches=2",
        "trainer.ckpt_every=40",
        "trainer.media_every=40",
        "eval.after_train=true",
        "eval.batches=1",
        "eval.batch_size=8",
        "eval.horizon=2",
        "eval.steps=2",
        "eval.temperature=0",
    ]
    run_dir = tmp_path / "phenaki"
    run_task(validate(compose_config(overrides, run_dir=run_dir)))
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/ce" in r]
    assert val[-1]["val/ce"] < val[0]["val/ce"] - 1.0, val  # chance: ln 1000 = 6.9
    m = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert len(m["rollout_psnr"]) == 4 and len(m["delta_psnr_curve"]) == 4  # pixel frames
    assert m["delta_psnr_horizon"] == 4 and m["delta_psnr_clips"] == 8
    assert 10 < m["tokenizer_psnr"] < 60 and 5 < m["psnr"] < 60
    assert m["gen_fps"] > 0 and 0 <= m["token_acc"] <= 1

    # the comparison table reads both stages as a pipeline run dir would hold them
    from worldmodel.eval.compare import plot, render

    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "cvivit").symlink_to(smoke_run)
    (pipeline / "phenaki").symlink_to(run_dir)
    table = render(pipeline)
    tok = json.loads((smoke_run / "eval.json").read_text())["metrics"]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert f"| {tok['psnr']:.2f} |" in rows["| cvivit"]
    assert f"| {tok['tokens_per_pixel_frame']:.1f} |" in rows["| cvivit"]  # 3 x 64 / 5 = 38.4
    assert "| phenaki | cvivit |" in rows["| phenaki"]  # its tokenizer, found by checkpoint
    assert f"{m['delta_psnr']:+.2f} ± {m['delta_psnr_stderr']:.2f}" in rows["| phenaki"]
    assert f"| {m['gen_fps']:.1f} |" in rows["| phenaki"]
    for picture in plot(pipeline, tmp_path / "plots"):  # rollout PSNR and ΔtPSNR curves
        assert picture.stat().st_size > 1000


def test_decode_clip_slides_past_the_tokenizer_window() -> None:
    """A token clip longer than the tokenizer's max_latent_frames is decoded through a sliding
    window: the first window as one clip, then the 2 pixel frames of each newer latent frame."""
    from worldmodel.world import decode_clip

    model = tiny(max_frames=3)
    tokens = torch.randint(0, 1000, (1, 5, 4, 4))
    video = decode_clip(model, tokens, bf16=False)
    assert video.shape == (1, 3, 9, 32, 32)
    with torch.no_grad():
        head = model.detokenize(tokens[:, :3]).clamp(-1, 1)  # frames 0..4
        tail = model.detokenize(tokens[:, 2:5]).clamp(-1, 1)[:, :, -2:]  # frames 7, 8
    assert torch.allclose(video[:, :, :5], head, atol=1e-5)
    assert torch.allclose(video[:, :, -2:], tail, atol=1e-5)
