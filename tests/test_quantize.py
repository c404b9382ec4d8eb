"""Tests for the quantizer adapter: each kind round-trips, reports stats, rejects bad configs."""

import math

import pytest
import torch

from worldmodel.models.quantize import _code_stats, build_quantizer

KINDS = {
    "fsq": {"levels": [8, 5, 5, 5]},
    "lfq": {"codebook_size": 256},
    "vq": {"codebook_size": 32, "codebook_dim": 4},
    "rvq": {"codebook_size": 16, "num_quantizers": 3},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these small models gain nothing from two, and a shared machine stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_range_and_stats(kind: str) -> None:
    torch.manual_seed(0)
    q = build_quantizer(kind, 8, **KINDS[kind])
    z = torch.randn(2, 8, 3, 4, 4, requires_grad=True)  # (B, D, t, h, w)

    # training mode: gradients reach the input (straight-through / rotation trick)
    codes, idx, aux, stats = q(z)
    (codes.square().sum() + aux).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.isfinite(aux) and aux.ndim == 0

    q.eval()
    codes, idx, aux, stats = q(z.detach())
    assert codes.shape == z.shape
    assert idx.shape == (2, 3, 4, 4) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < q.codebook_size
    assert torch.allclose(q.indices_to_codes(idx), codes, atol=1e-5)
    assert set(stats) >= {"perplexity", "usage"}
    assert 0 < float(stats["usage"]) <= 1
    assert 1 <= float(stats["perplexity"]) <= q.codebook_size
    assert not stats["usage"].requires_grad


def test_codebook_sizes() -> None:
    assert build_quantizer("fsq", 6, levels=[8, 8, 8, 5, 5, 5]).codebook_size == 64000
    assert build_quantizer("lfq", 14, codebook_size=2**14).codebook_size == 2**14
    assert build_quantizer("rvq", 8, codebook_size=16, num_quantizers=3).codebook_size == 16**3


def test_stats_values() -> None:
    # 4 of 8 codes used equally: perplexity exactly 4, usage exactly 0.5
    idx = torch.tensor([0, 1, 2, 3] * 5)
    stats = _code_stats(idx, 8)
    assert math.isclose(float(stats["perplexity"]), 4.0, rel_tol=1e-5)
    assert math.isclose(float(stats["usage"]), 0.5)
    # one code only: perplexity 1
    assert math.isclose(float(_code_stats(torch.zeros(9, dtype=torch.long), 8)["perplexity"]), 1)


def test_quantization_ignores_bf16_autocast() -> None:
    """Codes are picked in fp32 even under CPU bf16 autocast (the library only disables CUDA's)."""
    torch.manual_seed(0)
    q = build_quantizer("vq", 8, codebook_size=64, kmeans_init=False).eval()
    z = torch.randn(2, 8, 16, 16)
    _, ref, _, _ = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx, _, _ = q(z)
    assert torch.equal(idx, ref)


def test_vq_ema_moves_codebook_in_training() -> None:
    torch.manual_seed(0)
    q = build_quantizer("vq", 4, codebook_size=16, kmeans_init=False, decay=0.5)
    before = q.impl.codebook.clone()
    q(torch.randn(4, 4, 8, 8) + 3.0)
    assert (q.impl.codebook - before).abs().max() > 0.1


@pytest.mark.parametrize(
    ("kind", "kwargs", "key"),
    [
        ("fsqq", {"levels": [8, 5]}, "kind"),
        ("fsq", {}, "levels"),
        ("fsq", {"levels": [8, 2, 5]}, "levels"),
        ("fsq", {"levels": [8, 5], "codebook_size": 40}, "codebook_size"),
        ("lfq", {"codebook_size": 1000}, "codebook_size"),
        ("lfq", {}, "codebook_size"),
        ("vq", {"codebook_size": 1}, "codebook_size"),
        ("vq", {"codebook_size": 64, "decay": 1.5}, "decay"),
        ("vq", {"codebook_size": 64, "codebok_dim": 4}, "codebok_dim"),
        ("vq", {"codebook_size": 64, "codebook_dim": 0}, "codebook_dim"),
        ("rvq", {"codebook_size": 64, "num_quantizers": 0}, "num_quantizers"),
        ("rvq", {"codebook_size": 2**20, "num_quantizers": 4}, "num_quantizers"),
    ],
)
def test_bad_configs_name_the_key(kind: str, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        build_quantizer(kind, 8, **kwargs)
