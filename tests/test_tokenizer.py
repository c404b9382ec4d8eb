"""Tests for the causal video tokenizer: shapes, causality, losses, GAN/LPIPS paths, learning."""

import numpy as np
import pytest
import torch

from worldmodel.models.losses import psnr_per_frame
from worldmodel.models.tokenizer import VideoTokenizer

FSQ = {"kind": "fsq", "levels": [8, 5, 5, 5]}


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def tiny(**kwargs) -> VideoTokenizer:
    cfg = dict(
        channels=[16, 32], num_res_blocks=1, num_mid_blocks=1, decoder_mid_blocks=1, quantizer=FSQ
    )
    cfg.update(kwargs)
    return VideoTokenizer(**cfg)


def video(b: int = 2, t: int = 5, hw: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, t, hw, hw) * 2 - 1


def generator_params(model: VideoTokenizer) -> dict[str, torch.nn.Parameter]:
    return {
        n: p for n, p in model.named_parameters() if not n.startswith(("discriminator.", "lpips."))
    }


@pytest.mark.parametrize(
    ("spatial", "temporal", "channels"),
    [(4, 1, [16, 32]), (8, 2, [16, 32]), (16, 4, [8, 16, 32]), (4, 4, [16]), (16, 1, [16, 32])],
)
def test_shapes(spatial: int, temporal: int, channels: list[int]) -> None:
    torch.manual_seed(0)
    model = tiny(
        spatial_downsample=spatial,
        temporal_downsample=temporal,
        channels=channels,
        temporal_kernel=3,
    ).eval()
    T, H = 1 + 2 * temporal, 32
    x = video(2, T, H)
    t, h, w = model.latent_shape(T, H, H)
    assert (t, h, w) == (1 + (T - 1) // temporal, H // spatial, H // spatial)
    assert model.tokens_per_frame(H, H) == h * w
    z = model.encode(x)
    assert z.shape == (2, 4, t, h, w)
    codes, idx, aux, stats = model.quantize(z)
    assert codes.shape == z.shape and idx.shape == (2, t, h, w)
    assert model.decode(codes).shape == x.shape
    tokens = model.tokenize(x)
    assert tokens.shape == (2, t, h, w) and tokens.dtype == torch.long
    assert int(tokens.max()) < model.codebook_size == 1000
    assert model.detokenize(tokens).shape == x.shape
    x_hat, idx2 = model.reconstruct(x)
    assert x_hat.shape == x.shape and torch.equal(idx2, tokens)
    assert torch.allclose(model.detokenize(tokens), x_hat, atol=1e-4)


def test_bad_clip_length_and_size_raise() -> None:
    model = tiny(temporal_downsample=2)
    with pytest.raises(ValueError, match="T - 1"):
        model.encode(video(1, 4))
    with pytest.raises(ValueError, match="spatial_downsample"):
        model.encode(video(1, 5, 30))
    with pytest.raises(ValueError, match="channels"):
        tiny(channels=[8, 16, 32, 64], spatial_downsample=4)


@pytest.mark.parametrize(("temporal", "kernel"), [(1, 3), (2, 3), (2, 1), (4, 1)])
def test_causal_tokens(temporal: int, kernel: int) -> None:
    """Frames after t never change the tokens (or latents) of frames <= t."""
    torch.manual_seed(0)
    model = tiny(temporal_downsample=temporal, temporal_kernel=kernel).eval()
    T = 9
    x = video(1, T)
    with torch.no_grad():
        z = model.encode(x)
        tokens = model.tokenize(x)
        for cut in range(T - 1):  # change every frame after `cut`
            y = x.clone()
            y[:, :, cut + 1 :] = torch.rand_like(y[:, :, cut + 1 :]) * 2 - 1
            keep = cut // temporal + 1  # latents j with j * temporal <= cut
            z2 = model.encode(y)
            assert torch.allclose(z2[:, :, :keep], z[:, :, :keep], atol=1e-5)
            assert torch.equal(model.tokenize(y)[:, :keep], tokens[:, :keep])
            # not vacuous: the later latents do see the change
            assert (z2[:, :, keep:] - z[:, :, keep:]).abs().max() > 1e-3


@pytest.mark.parametrize("temporal", [1, 2, 4])
def test_first_frame_alone_equals_in_clip(temporal: int) -> None:
    torch.manual_seed(0)
    model = tiny(temporal_downsample=temporal, temporal_kernel=3).eval()
    x = video(2, 9)
    with torch.no_grad():
        alone = model.tokenize(x[:, :, :1])
        clip = model.tokenize(x)
        assert alone.shape == (2, 1, 8, 8)
        assert torch.equal(alone, clip[:, :1])
        # the first decoded frame is the same too: images and videos share one latent space
        assert torch.allclose(model.detokenize(alone), model.detokenize(clip)[:, :, :1], atol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_loss_backpropagates_to_all_generator_params(norm: str) -> None:
    torch.manual_seed(0)
    model = tiny(temporal_downsample=2, temporal_kernel=3, blur_pool=True, norm=norm)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding frames
    loss, metrics = model.loss({"video": video(2, 5), "mask": mask}, step=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    for key in ("rec_loss", "psnr", "codebook/usage", "codebook/perplexity"):
        assert key in metrics and metrics[key].ndim == 0 and not metrics[key].requires_grad
    assert 5 < float(metrics["psnr"]) < 30
    loss.backward()
    for name, p in generator_params(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padding_frames_do_not_count() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    x = video(1, 4)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        _, ref = model.loss({"video": x, "mask": mask})
        x[:, :, 2:] = 1.0  # padding content changes; real frames are unchanged (causal)
        _, out = model.loss({"video": x, "mask": mask})
    assert torch.allclose(ref["rec_loss"], out["rec_loss"], atol=1e-6)


@pytest.mark.parametrize(
    "quantizer",
    [
        {"kind": "lfq", "codebook_size": 256},
        {"kind": "vq", "codebook_size": 64, "codebook_dim": 8},
        {"kind": "rvq", "codebook_size": 32, "num_quantizers": 2, "codebook_dim": 8},
    ],
)
def test_other_quantizers_train(quantizer: dict) -> None:
    torch.manual_seed(0)
    model = tiny(quantizer=quantizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss({"video": video(2, 3)})
    loss.backward()
    assert torch.isfinite(loss)
    assert model.tokenize(video(1, 3)).max() < model.codebook_size


def test_gan_grads_are_separated() -> None:
    torch.manual_seed(0)
    model = tiny(gan_weight=0.5, gan_start_step=10, disc_channels=16, disc_layers=2)
    batch = {"video": video(2, 3)}
    gen = generator_params(model)

    # before gan_start_step: no adversarial term, discriminator untouched
    _, metrics = model.loss(batch, step=0)
    assert "gan/g_loss" not in metrics

    loss, metrics = model.loss(batch, step=10)
    assert torch.isfinite(metrics["gan/g_loss"]) and float(metrics["gan/d_weight"]) > 0
    loss.backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert all(p.grad is not None for p in gen.values())
    model.zero_grad(set_to_none=True)

    d_loss, d_metrics = model.discriminator_loss(batch)  # reuses the cached reconstruction
    assert torch.isfinite(d_loss) and "gan/logits_real" in d_metrics
    d_loss.backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert all(p.grad is None for p in gen.values())

    # no cached reconstruction for a new batch: recomputed without touching the generator
    model.zero_grad(set_to_none=True)
    d_loss, _ = model.discriminator_loss({"video": video(2, 3)}, step=10)
    d_loss.backward()
    assert all(p.grad is None for p in gen.values())
    # before the start step the discriminator loss is a zero that still backpropagates
    zero, _ = model.discriminator_loss(batch, step=0)
    zero.backward()
    assert float(zero.detach()) == 0.0


def test_no_discriminator_without_gan() -> None:
    model = tiny()
    assert model.discriminator is None
    with pytest.raises(RuntimeError, match="gan_weight"):
        model.discriminator_loss({"video": video(1, 1)})


def test_lpips_missing_weights_names_file_and_key(tmp_path) -> None:
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as err:
        tiny(lpips_weight=0.1, lpips_weights_path=str(missing))
    assert str(missing) in str(err.value) and "lpips_weights_path" in str(err.value)
    tiny(lpips_weight=0.0, lpips_weights_path=str(missing))  # off: nothing is loaded


def test_lpips_random_backbone_and_file_loading(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny(lpips_weight=0.5, lpips_random_backbone=True)
    loss, metrics = model.loss({"video": video(1, 2)})
    assert torch.isfinite(metrics["lpips"]) and float(metrics["lpips"]) > 0
    loss.backward()
    assert all(p.grad is None for p in model.lpips.parameters())
    assert all(p.grad is not None for p in generator_params(model).values())

    # a torchvision-style VGG16 `features.N.*` file is mapped onto the LPIPS trunk's slices
    trunk = model.lpips.net.net
    state = {
        f"features.{key}": torch.randn_like(value)
        for block in trunk.children()
        for key, value in block.state_dict().items()
    }
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model.lpips._load(torch.load(path, weights_only=True))  # the loader used for a real file
    assert torch.equal(trunk.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(trunk.slice5, "28").bias, state["features.28.bias"])


def coinrun_frames(n: int = 16) -> torch.Tensor:
    """n real CoinRun frames (random policy), as (1, 3, n, 64, 64) in [-1, 1]."""
    from procgen import ProcgenGym3Env

    env = ProcgenGym3Env(num=n, env_name="coinrun", start_level=0, num_levels=50, rand_seed=0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.act(rng.integers(0, 15, size=n))
    frames = torch.from_numpy(env.observe()[1]["rgb"].copy())  # (n, 64, 64, 3) uint8
    return (frames.permute(3, 0, 1, 2).float() / 127.5 - 1).unsqueeze(0)


def test_training_raises_psnr() -> None:
    """100 steps on 16 real frames: far above the start and above a mean-colour predictor."""
    torch.manual_seed(0)
    frames = coinrun_frames(16)
    x = frames[0].transpose(0, 1)  # (T, C, H, W)
    mean_colour = psnr_per_frame(x.mean(dim=(0, 2, 3), keepdim=True).expand_as(x), x).mean()
    model = VideoTokenizer(
        channels=[64], num_res_blocks=0, num_mid_blocks=1, decoder_mid_blocks=1, quantizer=FSQ
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = {"video": frames}
    with torch.no_grad():
        start = float(model.loss(batch)[1]["psnr"])
    for _ in range(100):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = float(model.loss(batch)[1]["psnr"])
    assert end > start + 5.0, (start, end)
    assert end > float(mean_colour) + 5.0, (float(mean_colour), end)


def test_the_previous_frame_refiner_starts_as_identity_and_trains() -> None:
    torch.manual_seed(0)
    tok = VideoTokenizer(
        channels=[16],
        spatial_downsample=8,
        quantizer={"kind": "fsq", "levels": [5, 5]},
        refiner_width=8,
    )
    video = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    indices = tok.tokenize(video)
    coarse = tok.detokenize(indices)
    assert torch.equal(tok.detokenize(indices, previous=video[:, :, 0]), coarse)  # zero-init
    loss, metrics = tok.loss({"video": video})
    assert "refine_l2" in metrics and "psnr_refined" in metrics
    loss.backward()
    assert tok.refiner.out.weight.grad.abs().sum() > 0  # the refiner learns from the loss
