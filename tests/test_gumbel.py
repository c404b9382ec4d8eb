"""Gumbel-softmax quantization (`kind: gumbel`): hard codes in eval that decode from their
indices, gradients through the soft sample, the temperature schedule and its checkpointed step,
the KL term, learning inside a tokenizer, config checks, and a world model over its codes."""

import math

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from worldmodel.build import load_model
from worldmodel.config import ConfigError, instantiate, validate
from worldmodel.models.quantize import GumbelQuantize, build_quantizer
from worldmodel.models.tokenizer import VideoTokenizer
from worldmodel.pipeline import check_parts, load_frozen
from worldmodel.train import checkpoint as ckpt

GUMBEL = {"kind": "gumbel", "codebook_size": 64, "tau_anneal_steps": 100, "kl_weight": 0.01}


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these small models gain nothing from two, and a shared machine stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quantizer(**kwargs):
    torch.manual_seed(0)
    settings = {k: v for k, v in GUMBEL.items() if k != "kind"}
    settings.update(kwargs)
    return build_quantizer("gumbel", 8, **settings)


def to_container(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


def moving_squares(b: int, t: int, gen: torch.Generator, size: int = 32, side: int = 8):
    """Clips (B, 3, T, H, W) in [-1, 1]: one square of a random colour moving by 4 pixels a
    frame in a random direction over a plain background of another random colour."""
    bg = torch.rand(b, 3, 1, 1, 1, generator=gen) * 0.6 - 0.8
    fg = torch.rand(b, 3, generator=gen) * 0.6 + 0.2
    video = bg.expand(b, 3, t, size, size).clone()
    pos = torch.randint(0, size - side + 1, (b, 2), generator=gen)
    step = torch.randint(-1, 2, (b, 2), generator=gen) * 4
    for i in range(t):
        for j in range(b):
            y, x = pos[j].tolist()
            video[j, :, i, y : y + side, x : x + side] = fg[j][:, None, None]
        pos = (pos + step).clamp(0, size - side)
    return video


def test_eval_codes_are_hard_and_decode_from_indices() -> None:
    q = quantizer().eval()
    z = torch.randn(2, 8, 3, 4, 4)  # (B, D, t, h, w)
    codes, idx, aux, stats = q(z)
    assert codes.shape == z.shape
    assert idx.shape == (2, 3, 4, 4) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < q.codebook_size == 64
    # each code is exactly the codebook row of its index, and the same again on a second call
    assert torch.equal(q.indices_to_codes(idx), codes)
    assert torch.equal(q(z)[1], idx)
    rows = q.impl.codebook.weight[idx]  # (B, t, h, w, D)
    assert torch.equal(codes, rows.permute(0, 4, 1, 2, 3))
    assert aux.ndim == 0 and float(aux.detach()) >= 0
    assert 0 < float(stats["usage"]) <= 1 and 1 <= float(stats["perplexity"]) <= 64


@pytest.mark.parametrize("straight_through", [False, True])
def test_gradients_reach_the_encoder_through_the_soft_sample(straight_through: bool) -> None:
    q = quantizer(straight_through=straight_through)
    encoder = torch.nn.Conv2d(3, 8, 1)
    x = torch.randn(2, 3, 4, 4)
    codes, idx, aux, _ = q(encoder(x))
    if straight_through:  # the forward value is the hard one-hot's codebook row
        assert torch.allclose(codes, q.indices_to_codes(idx), atol=1e-6)
    (codes.square().sum() + aux).backward()
    for name, p in [*encoder.named_parameters(), *q.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_temperature_schedule_and_checkpoint_round_trip(tmp_path) -> None:
    q = quantizer(tau_start=1.0, tau_end=1 / 16, tau_anneal_steps=100)
    tau = q.impl.tau
    assert tau(0) == 1.0 and math.isclose(tau(50), (1 + 1 / 16) / 2)
    assert tau(100) == tau(1000) == 1 / 16
    taus = [tau(s) for s in range(0, 120, 5)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))  # cosine: never rises
    assert quantizer(tau_anneal_steps=0).impl.tau(0) == 1 / 16  # no anneal: tau_end throughout

    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    for _ in range(7):  # training forwards count
        q(z)
    with torch.no_grad():  # a recomputation without gradients does not
        q(z)
    q.eval()
    q(z)  # nor does an eval forward (validation)
    q.train()
    assert int(q.impl.step) == 7 and tau() == tau(7) < 1.0

    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    resumed = quantizer(tau_start=1.0, tau_end=1 / 16, tau_anneal_steps=100)
    assert int(resumed.impl.step) == 0
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert int(resumed.impl.step) == 7 and resumed.impl.tau() == tau()


def test_kl_to_uniform_prior() -> None:
    q = quantizer(kl_weight=1.0).eval()
    z = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        q.impl.proj.weight.zero_()
        q.impl.proj.bias.zero_()  # flat logits: q(z|x) is the uniform prior
        assert abs(float(q(z)[2])) < 1e-6
        q.impl.proj.bias[3] = 50.0  # all mass on code 3: KL = log K
        _, idx, kl, _ = q(z)
    assert math.isclose(float(kl), math.log(64), rel_tol=1e-4) and bool((idx == 3).all())
    assert float(quantizer(kl_weight=0.0)(z)[2].detach()) == 0.0


def test_tokenizer_with_gumbel_learns_moving_squares() -> None:
    """Hard-code (eval) reconstructions of moving squares improve over 60 Adam steps, with
    gradients reaching the encoder through the quantizer; like the other kinds' tokenizers."""
    torch.manual_seed(0)
    model = VideoTokenizer(
        channels=[16, 32],
        num_res_blocks=1,
        num_mid_blocks=1,
        decoder_mid_blocks=1,
        latent_dim=8,
        quantizer={**GUMBEL, "tau_anneal_steps": 60},
    )
    gen = torch.Generator().manual_seed(0)
    val = {"video": moving_squares(8, 2, gen)}

    def val_l2() -> float:
        model.eval()
        with torch.no_grad():
            _, metrics = model.loss(val)
        model.train()
        return float(metrics["l2"])

    before = val_l2()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(60):
        loss, metrics = model.loss({"video": moving_squares(8, 2, gen)})
        opt.zero_grad()
        loss.backward()
        if i == 0:
            assert all(p.grad is not None for p in model.encoder.parameters())
            assert model.encoder.parameters().__next__().grad.abs().sum() > 0
        opt.step()
    after = val_l2()
    assert int(model.quantizer.impl.step) == 60 and model.quantizer.impl.tau() == 1 / 16
    assert after < 0.5 * before, (before, after)
    assert model.tokenize(val["video"]).max() < model.codebook_size
    assert {"codebook/usage", "codebook/perplexity", "quantizer_loss"} <= set(metrics)


@pytest.mark.parametrize(
    "model, recipe",
    [
        ("tokenizer", "model=tokenizer"),
        ("tokenizer_cvivit", "experiment=smoke_cvivit"),  # its clips fit the C-ViViT's 2x time
        ("videogpt_vqvae", "model=videogpt_vqvae"),
    ],
)
def test_every_tokenizer_composes_validates_and_builds(model: str, recipe: str) -> None:
    cfg = validate(compose_config([recipe, "model/quantizer=gumbel"]))
    assert cfg.model.name == model
    assert cfg.model.quantizer.kind == "gumbel" and cfg.model.quantizer.codebook_size == 1024
    if model == "tokenizer":  # a narrower copy: enough to see the quantizer is built
        cfg.model.channels = [8]
    tokenizer = instantiate(cfg.model)
    assert tokenizer.codebook_size == 1024 and tokenizer.quantizer.kind == "gumbel"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.quantizer.codebook_size=1", "model.quantizer.codebook_size"),
        ("model.quantizer.tau_start=0", "model.quantizer.tau_start"),
        ("model.quantizer.tau_end=-0.5", "model.quantizer.tau_end"),
        ("model.quantizer.tau_anneal_steps=-1", "model.quantizer.tau_anneal_steps"),
        ("model.quantizer.kl_weight=-0.1", "model.quantizer.kl_weight"),
        ("model.quantizer.straight_through=maybe", "model.quantizer.straight_through"),
        ("+model.quantizer.levels=[8,5]", "model.quantizer.levels"),
    ],
)
def test_bad_settings_are_rejected_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(["experiment=smoke_gumbel", override]))


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"codebook_size": 1}, "codebook_size"),
        ({"codebook_size": 8, "tau_end": 0.0}, "tau_end"),
        ({"codebook_size": 8, "tau_anneal_steps": 1.5}, "tau_anneal_steps"),
        ({"codebook_size": 8, "kl_weight": -1}, "kl_weight"),
        ({"codebook_size": 8, "straight_through": "yes"}, "straight_through"),
        ({"codebook_size": 8, "decay": 0.9}, "decay"),
    ],
)
def test_build_rejects_bad_settings_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        build_quantizer("gumbel", 8, **settings)


def test_world_model_runs_over_a_frozen_gumbel_tokenizer(tmp_path) -> None:
    """The pipeline's frozen-part loading: a gumbel tokenizer checkpoint (weights_only) loads,
    fits a dynamics model whose vocab_size is its codebook_size, and its codes train it."""
    cfg = validate(compose_config(["experiment=smoke_gumbel"], run_dir=tmp_path))
    torch.manual_seed(0)
    tokenizer = instantiate(cfg.model)
    tokenizer.quantizer.impl.step.fill_(5)
    path = tmp_path / "tokenizer.pt"
    state = {"model": tokenizer.state_dict(), "config": to_container(cfg)}
    ckpt.atomic_save({"format": ckpt.FORMAT_VERSION, **state}, path)
    frozen, _ = load_frozen(str(path), "tokenizer", "model.pipeline.tokenizer_checkpoint")
    assert isinstance(frozen.quantizer.impl, GumbelQuantize) and not frozen.training
    assert int(frozen.quantizer.impl.step) == 5 and frozen.codebook_size == 256
    assert load_model(path)[0].codebook_size == 256

    dyn = compose_config(
        ["experiment=smoke_dynamics", f"model.pipeline.tokenizer_checkpoint={path}"]
    ).model
    h = 64 // frozen.spatial_downsample
    with open_dict(dyn):
        dyn.update(vocab_size=frozen.codebook_size, grid=[h, h], max_frames=3)
    check_parts(dyn, frozen, (64, 64), int(dyn.num_actions), "recorded")

    gen = torch.Generator().manual_seed(0)
    video = moving_squares(2, 3, gen, size=64, side=16)
    with torch.no_grad():
        tokens = frozen.tokenize(video)  # (B, T, h, w)
        assert torch.equal(frozen.detokenize(tokens), frozen.reconstruct(video)[0])
    assert tokens.shape == (2, 3, h, h) and int(tokens.max()) < 256
    world = instantiate(dyn)
    actions = torch.randint(0, int(dyn.num_actions), (2, 3), generator=gen)
    loss, _ = world.loss({"tokens": tokens, "actions": actions})
    loss.backward()
    assert torch.isfinite(loss)
