"""Training-mask strategies of the MaskGIT models (`model.mask_strategy`, models/masking.py):
`random` is the original per-token draw bit for bit, `block` hides exactly round(r * N) tokens
of a frame as one 4-connected region, `multiscale` hides exactly round(r * N) tokens with its
coarse part constant on whole 2x2 cells; every strategy trains the dynamics and Phenaki models,
bad names are rejected naming the key, and the ablation recipe composes and validates."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CONF, compose_config
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from scipy import ndimage

from worldmodel.config import ConfigError, validate
from worldmodel.models.dynamics import DynamicsModel
from worldmodel.models.masking import (
    MASK_STRATEGIES,
    MULTISCALE_CELL,
    block_mask,
    draw_mask,
    masked_count,
    multiscale_mask,
)
from worldmodel.models.phenaki import PhenakiModel
from worldmodel.models.text import encode_bytes
from worldmodel.tasks import pipeline

GRIDS = [(8, 8), (4, 6), (5, 7), (1, 9), (3, 3)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead
    yield
    torch.set_num_threads(threads)


def rates(b: int, t: int, gen: torch.Generator, per_frame: bool) -> torch.Tensor:
    """Rates in [0, 1] (B, T, 1) or (B, 1, 1), the ends included."""
    r = torch.rand(b, t if per_frame else 1, 1, generator=gen)
    r[0] = 1.0
    r[1] = 0.0
    return r


# --- random: the original draw -------------------------------------------------------------------


def test_random_is_the_original_draw_bit_for_bit():
    # computed with the code before strategies existed: seed 0, r ~ U(0.5, 1) per clip, then
    # torch.rand(x.shape) < r on a (2, 3, 6) batch; the flat indices of the masked tokens
    expected = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18]
    expected += [20, 21, 22, 23, 25, 26, 27, 28, 30, 31, 32, 33, 34]
    torch.manual_seed(0)
    rate = torch.empty(2, 1, 1).uniform_(0.5, 1.0)  # (B, 1, 1)
    masked = draw_mask(rate, (2, 3, 6), (2, 3), "random")  # (B, T, N)
    assert masked.reshape(-1).nonzero().flatten().tolist() == expected
    # and with a generator: the same as the plain draw from it
    gen = torch.Generator().manual_seed(3)
    rate = torch.rand(4, 5, 1)
    again = torch.rand((4, 5, 12), generator=torch.Generator().manual_seed(3)) < rate
    assert torch.equal(draw_mask(rate, (4, 5, 12), (3, 4), "random", gen), again)


def test_dynamics_loss_draws_the_original_random_mask():
    """The dynamics loss at a fixed seed masks what it masked before strategies existed (the
    mask rate 25/32 = 0.78125 was measured then: it depends on the mask alone)."""
    torch.manual_seed(0)
    model = DynamicsModel(
        vocab_size=16, num_actions=4, grid=(4, 4), max_frames=4, dim=32, depth=1, heads=2
    )
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (2, 4, 4, 4), generator=gen)
    actions = torch.randint(0, 4, (2, 4), generator=gen)
    torch.manual_seed(5)
    loss, metrics = model.loss({"tokens": tokens, "actions": actions})
    assert metrics["mask_rate"].item() == 0.78125
    assert loss.item() == pytest.approx(2.78905987739563, rel=1e-4)


# --- exact counts, contiguity, coarse cells -----------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("strategy", ["block", "multiscale"])
def test_block_and_multiscale_mask_exactly_round_r_n_tokens_per_frame(grid, per_frame, strategy):
    if strategy == "multiscale" and min(grid) < MULTISCALE_CELL:
        pytest.skip("multiscale needs a grid of at least one cell (rejected by the check)")
    gen = torch.Generator().manual_seed(0)
    b, t, n = 64, 3, grid[0] * grid[1]
    rate = rates(b, t, gen, per_frame)
    masked = draw_mask(rate, (b, t, n), grid, strategy, gen)  # (B, T, N)
    assert masked.shape == (b, t, n) and masked.dtype == torch.bool
    want = (rate.expand(b, t, 1)[..., 0] * n).round().long()  # (B, T)
    assert torch.equal(masked.sum(-1), want)
    assert torch.equal(masked_count(rate, (b, t, n)), want)
    assert bool(masked[0].all()) and not bool(masked[1].any())  # r = 1 and r = 0


def test_random_masks_r_n_tokens_on_average():
    """`random` is Bernoulli(r) per token: the count is Binomial(N, r), not exact."""
    gen = torch.Generator().manual_seed(0)
    rate = torch.full((4000, 1, 1), 0.3)
    masked = draw_mask(rate, (4000, 1, 64), (8, 8), "random", gen)
    counts = masked.sum(-1).float()  # (B, T)
    assert abs(counts.mean().item() - 0.3 * 64) < 4 * math.sqrt(64 * 0.3 * 0.7 / 4000)
    assert counts.std().item() > 1.0  # it varies from frame to frame


@pytest.mark.parametrize("grid", GRIDS)
def test_block_masks_are_one_contiguous_region(grid):
    gen = torch.Generator().manual_seed(1)
    b, t, n = 128, 2, grid[0] * grid[1]
    masked = block_mask(rates(b, t, gen, True), (b, t, n), grid, gen).view(-1, *grid)
    four = ndimage.generate_binary_structure(2, 1)  # 4-connectivity: no diagonal steps
    shapes = set()
    for frame in masked.numpy():
        if frame.any():
            _, components = ndimage.label(frame, structure=four)
            assert components == 1, frame.astype(int)
            rows, cols = frame.nonzero()
            shapes.add((rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
    assert len(shapes) > 3  # blocks of varied heights and widths, not one fixed shape


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (2, 6)])
def test_multiscale_coarse_part_is_constant_on_cells(grid):
    gen = torch.Generator().manual_seed(2)
    b, t, n = 128, 2, grid[0] * grid[1]
    s = MULTISCALE_CELL
    rate = rates(b, t, gen, True)
    masked, coarse = multiscale_mask(rate, (b, t, n), grid, generator=gen)  # (B, T, N) each
    assert bool((coarse <= masked).all())  # the coarse part is part of the mask
    hc, wc = grid[0] // s, grid[1] // s
    frames = coarse.view(-1, *grid)  # (F, h, w)
    assert not bool(frames[:, hc * s :].any()) and not bool(frames[:, :, wc * s :].any())
    cells = frames[:, : hc * s, : wc * s].reshape(-1, hc, s, wc, s)  # (F, hc, s, wc, s)
    first = cells[:, :, :1, :, :1]  # (F, hc, 1, wc, 1) one token per cell
    assert bool((cells == first).all())  # every token of a cell alike
    k = masked_count(rate, (b, t, n)).reshape(-1)  # (F,)
    assert torch.equal(frames.sum((1, 2)), k // (2 * s * s) * s * s)  # about half, whole cells
    fine_only = masked & ~coarse
    assert int(fine_only.sum()) > 0


# --- the models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_dynamics_trains_a_few_steps_with_each_strategy(strategy):
    torch.manual_seed(0)
    model = DynamicsModel(
        vocab_size=16,
        num_actions=4,
        grid=(4, 4),
        max_frames=4,
        dim=32,
        depth=1,
        heads=2,
        mask_strategy=strategy,
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (4, 4, 4, 4), generator=gen)  # (B, T, h, w)
    actions = torch.randint(0, 4, (4, 4), generator=gen)  # (B, T)
    batch = {"tokens": tokens, "actions": actions}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert 0.0 < metrics["mask_rate"].item() <= 1.0
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])  # it fits the fixed batch


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_phenaki_loss_uses_the_strategy(strategy):
    torch.manual_seed(0)
    model = PhenakiModel(
        vocab_size=16,
        grid=(4, 4),
        max_frames=3,
        dim=32,
        depth=1,
        heads=2,
        text_dim=32,
        text_depth=1,
        text_max_len=16,
        mask_strategy=strategy,
    )
    tokens = torch.randint(0, 16, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    loss, metrics = model.loss({"tokens": tokens, "text": encode_bytes(["one", "two"], 16)})
    loss.backward()
    assert math.isfinite(loss.item()) and 0.0 < metrics["mask_rate"].item() <= 1.0


def test_bad_strategies_are_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.mask_strategy='stripes'.*random, block"):
        DynamicsModel(grid=(4, 4), mask_strategy="stripes")
    with pytest.raises(ValueError, match=r"model\.mask_strategy='stripes'"):
        PhenakiModel(grid=(4, 4), dim=32, text_dim=32, mask_strategy="stripes")
    with pytest.raises(ValueError, match=r"model\.mask_strategy=multiscale needs"):
        DynamicsModel(grid=(1, 8), mask_strategy="multiscale")
    with pytest.raises(ValueError, match=r"mask_strategy='Block'"):
        draw_mask(torch.ones(1, 1, 1), (1, 1, 4), (2, 2), "Block")
    for model in ("dynamics", "phenaki"):
        with pytest.raises(ConfigError, match=r"model\.mask_strategy='stripes'"):
            validate(compose_config([f"model={model}", "model.mask_strategy=stripes"]))
        cfg = validate(compose_config([f"model={model}", "model.mask_strategy=block"]))
        assert cfg.model.mask_strategy == "block"
        assert compose_config([f"model={model}"]).model.mask_strategy == "random"


def test_ablation_recipe_composes_and_validates_one_stage_per_strategy(tmp_path, monkeypatch):
    """experiment=ablation_masks (not trained here: it costs CPU-minutes) is `task=check` clean:
    a tokenizer, then the dynamics model once per strategy on that tokenizer's tokens."""
    cfg = validate(compose_config(["experiment=ablation_masks"], run_dir=tmp_path))
    assert list(cfg.stages) == ["tokenizer"] + [f"dynamics_{s}" for s in MASK_STRATEGIES]
    monkeypatch.setattr(pipeline, "_command_line_overrides", lambda: [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        stages = pipeline.compose_stages(cfg)
    worlds = [s.cfg for s in stages if s.cfg.model.name == "dynamics"]
    assert [w.model.mask_strategy for w in worlds] == list(MASK_STRATEGIES)
    for world in worlds:
        validate(world)
        # the three rows differ in the mask strategy alone
        rest = OmegaConf.to_container(world.model, resolve=False)
        first = OmegaConf.to_container(worlds[0].model, resolve=False)
        rest.pop("mask_strategy"), first.pop("mask_strategy")
        assert rest == first
