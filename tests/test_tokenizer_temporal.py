"""The causal tokenizer at 4x (and 8x) temporal compression (experiment=tokenizer_t4 / _t8):
causality per group of 4 frames, the first frame encoded alone as an image, shapes of 1 + 4n
clips, bad clip lengths named, the smoke recipe through run.py, and a world model over its
latent frames (the clip-wise path) trained, evaluated and loaded as a World."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, run_py

from worldmodel.build import build_model
from worldmodel.config import ConfigError, validate
from worldmodel.data.tokens import ClipwiseTokenDataset
from worldmodel.models.tokenizer import VideoTokenizer
from worldmodel.pipeline import PipelineError, build_datasets
from worldmodel.tasks import run_task
from worldmodel.train.logging import read_metrics
from worldmodel.world import FrameLayout, World

SMOKE = "experiment=smoke_tokenizer_t4"


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def recipe_model(experiment: str, *overrides: str) -> VideoTokenizer:
    """The tokenizer a recipe builds (fresh weights, eval mode), at the smoke recipe's widths so
    the test stays fast: the temporal stages are the recipe's own."""
    torch.manual_seed(0)
    cfg = compose_config([f"experiment={experiment}", *overrides])
    model = build_model(cfg.model)
    assert isinstance(model, VideoTokenizer)
    return model.eval()


def video(b: int, t: int) -> torch.Tensor:
    return torch.rand(b, 3, t, 64, 64) * 2 - 1


SMALL = ["model.channels=[16,32]", "model.decoder_mid_blocks=1"]


@pytest.mark.parametrize("experiment", ["tokenizer_t4", "tokenizer_t8"])
def test_latent_frame_reads_no_pixel_frame_after_its_group(experiment: str) -> None:
    """Latent frame j of a k = 4 (8) tokenizer covers pixel frames (j - 1) k + 1 .. j k (frame 0
    alone): changing any frame after j k leaves latents, tokens and decoded frames <= j k as they
    were, and changes the later latent frames (the test is not vacuous)."""
    model = recipe_model(experiment, *SMALL)
    k = model.temporal_downsample
    T = 1 + 2 * k
    x = video(1, T)
    with torch.no_grad():
        z, tokens = model.encode(x), model.tokenize(x)
        decoded = model.decode(model.quantize(z)[0])
        for cut in range(T - 1):  # every frame after `cut` replaced
            y = x.clone()
            y[:, :, cut + 1 :] = torch.rand_like(y[:, :, cut + 1 :]) * 2 - 1
            keep = cut // k + 1  # latent frames j with j k <= cut
            z2 = model.encode(y)
            assert torch.allclose(z2[:, :, :keep], z[:, :, :keep], atol=1e-5), cut
            assert torch.equal(model.tokenize(y)[:, :keep], tokens[:, :keep]), cut
            assert (z2[:, :, keep:] - z[:, :, keep:]).abs().max() > 1e-3, cut
            # the decoder is causal in latent frames: frames up to (keep - 1) k are unchanged
            decoded2 = model.decode(model.quantize(z2)[0])
            span = (keep - 1) * k + 1
            assert torch.allclose(decoded2[:, :, :span], decoded[:, :, :span], atol=1e-5), cut


def test_first_frame_alone_is_the_image_encoding() -> None:
    """An image (a 1-frame clip) is the first latent frame of any clip that starts with it, in
    tokens and in the decoded frame: images and videos share one latent space."""
    model = recipe_model("tokenizer_t4", *SMALL)
    x = video(2, 9)
    with torch.no_grad():
        image = model.tokenize(x[:, :, :1])
        clip = model.tokenize(x)
        assert image.shape == (2, 1, 8, 8) and torch.equal(image, clip[:, :1])
        first = model.detokenize(image)
        assert first.shape == (2, 3, 1, 64, 64)
        assert torch.allclose(first, model.detokenize(clip)[:, :, :1], atol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_shapes_of_one_plus_4n_frames(n: int) -> None:
    model = recipe_model("tokenizer_t4", *SMALL)
    T = 1 + 4 * n
    x = video(2, T)
    assert model.latent_shape(T, 64, 64) == (1 + n, 8, 8)
    with torch.no_grad():
        tokens = model.tokenize(x)
        assert tokens.shape == (2, 1 + n, 8, 8) and tokens.dtype == torch.long
        assert int(tokens.max()) < model.codebook_size == 1000
        recon, idx = model.reconstruct(x)
        assert recon.shape == x.shape and torch.equal(idx, tokens)
        assert model.detokenize(tokens).shape == x.shape
    # the tokens a clip costs per pixel frame: 64 for the first frame, then 64 per 4 frames
    assert tokens[0].numel() / T == 64 * (1 + n) / T


def test_bad_clip_lengths_are_named() -> None:
    """A clip that is not 1 + 4n frames is refused by the model, and by validate before any work,
    naming data.clip_length (training) or eval.clip_length (scoring)."""
    model = recipe_model("tokenizer_t4", *SMALL)
    with pytest.raises(ValueError, match=r"temporal_downsample=4 needs \(T - 1\) % 4 == 0"):
        model.encode(video(1, 8))
    for override, message in [
        ("data.clip_length=8", "data.clip_length=8 does not fit model.temporal_downsample=4"),
        ("data.clip_length=16", "data.clip_length=16 does not fit model.temporal_downsample=4"),
        ("eval.clip_length=6", "eval.clip_length=6 does not fit model.temporal_downsample=4"),
        ("model.temporal_downsample=3", "model.temporal_downsample=3: expected 1, 2, 4 or 8"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_config([SMOKE, override]))
    with pytest.raises(ConfigError, match="data.clip_length=13 does not fit model.temporal_down"):
        validate(compose_config(["experiment=tokenizer_t8", "data.clip_length=13"]))
    for experiment in ("tokenizer_t4", "tokenizer_t8", "smoke_tokenizer_t4"):
        validate(compose_config([f"experiment={experiment}"]))  # the recipes as written


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python run.py experiment=smoke_tokenizer_t4 eval.after_train=true` (60 steps, 5-frame
    clips), then `task=eval` of its checkpoint on 9-frame clips."""
    run_dir = tmp_path_factory.mktemp("t4") / "train"
    run_py(SMOKE, f"hydra.run.dir={run_dir}", "logger=none", "eval.after_train=true")
    return run_dir


def test_smoke_recipe_trains_and_evaluates_through_run_py(smoke_run, tmp_path) -> None:
    val = [r for r in read_metrics(smoke_run / "metrics.jsonl") if "val/psnr" in r]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val/psnr"] > val[0]["val/psnr"] + 3.0, val  # ~10 dB untrained
    m = json.loads((smoke_run / "eval.json").read_text())["metrics"]
    assert m["tokens_per_frame"] == 64  # per latent frame
    assert m["tokens_per_pixel_frame"] == 64 * 2 / 5  # 5 frames -> 2 latent frames
    assert 10 < m["psnr"] < 60 and 0 < m["ssim"] <= 1

    # task=eval of the checkpoint on 9-frame clips (in process: run.py's own path is above)
    ckpt = smoke_run / "checkpoints" / "last.pt"
    scored = ["task=eval", f"checkpoint={ckpt}", SMOKE, "logger=none", "trainer.progress=false"]
    eval_dir = tmp_path / "eval9"
    run_task(validate(compose_config([*scored, "eval.clip_length=9"], run_dir=eval_dir)))
    result = json.loads((eval_dir / "eval.json").read_text())
    assert result["data"]["clip_length"] == 9 and result["step"] == 60
    assert result["metrics"]["tokens_per_pixel_frame"] == 64 * 3 / 9
    bad = compose_config([*scored, "eval.clip_length=8"], run_dir=tmp_path / "eval8")
    with pytest.raises(ValueError, match="eval.clip_length=8 does not fit the tokenizer"):
        run_task(validate(bad))


def test_world_model_over_t4_latent_frames(smoke_run, tmp_path) -> None:
    """The Genie dynamics model over the t4 tokenizer's latent frames: 9-frame clips tokenized
    whole (3 latent frames, the action at the last pixel frame of each), trained through the
    loop, scored by the shared world evaluation in pixel frames (2 latent frames -> 8 pixel
    frames), and loaded as a World that decodes generated latent frames after their context."""
    ckpt = smoke_run / "checkpoints" / "last.pt"
    overrides = [
        "experiment=smoke_dynamics",
        "logger=none",
        "trainer.progress=false",
        f"model.pipeline.tokenizer_checkpoint={ckpt}",
        "model.max_frames=3",
        "data.clip_length=9",
        "data.clip_stride=7",
        "trainer.max_steps=20",
        "trainer.val_every=20",
        "trainer.ckpt_every=20",
        "trainer.media_every=20",
        "eval.after_train=true",
        "eval.batch_size=4",
        "eval.horizon=2",
        "eval.temperature=0",
        "eval.control.enabled=false",
    ]
    cfg = compose_config(overrides, run_dir=tmp_path / "dynamics")
    train, _ = build_datasets(cfg)
    assert isinstance(train, ClipwiseTokenDataset)
    item = train[0]
    assert item["tokens"].shape == (3, 8, 8) and item["actions"].shape == (3,)

    run_task(validate(cfg))
    m = json.loads((tmp_path / "dynamics" / "eval.json").read_text())["metrics"]
    assert len(m["rollout_psnr"]) == 8 and m["delta_psnr_horizon"] == 4  # pixel frames
    assert 5 < m["tokenizer_psnr"] < 60 and 5 < m["psnr"] < 60 and m["gen_fps"] > 0

    world = World.load(tmp_path / "dynamics")
    assert world.frames_per_latent == 4
    layout = FrameLayout.of(world.tokenizer, 9, 3)
    assert [layout.last(j) for j in range(3)] == [0, 4, 8]
    context = item["tokens"][None, :1]  # (1, 1, h, w): the first frame alone
    new = world.dynamics.rollout(context, item["actions"][None], 2, steps=2, temperature=0.0)
    assert new.shape == (1, 2, 8, 8)
    frames = world.decode_after(context, new)
    assert frames.shape == (1, 3, 8, 64, 64)  # 2 latent frames -> 8 pixel frames
    with pytest.raises(ValueError, match="compresses time"):
        world.reset(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy())

    cfg.data.clip_length = 8  # a clip the t4 tokenizer cannot split, refused naming the key
    with pytest.raises(PipelineError, match="data.clip_length=8 does not fit the tokenizer"):
        build_datasets(cfg)
