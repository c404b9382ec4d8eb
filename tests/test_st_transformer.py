"""Space-time transformer: causal temporal attention, spatial mixing within frames, KV cache."""

import pytest
import torch

from worldmodel.models.st_transformer import COND_MODES, STTransformer

B, T, N, D = 2, 5, 6, 32


def make(cond_mode: str = "add", **kwargs) -> STTransformer:
    torch.manual_seed(0)
    model = STTransformer(
        dim=D, depth=2, heads=4, num_tokens=N, max_frames=8, cond_mode=cond_mode, **kwargs
    )
    if cond_mode == "adaln":
        # the modulation starts at zero (plain LayerNorm); give it weights so it is exercised
        for block in model.blocks:
            torch.nn.init.normal_(block.modulation.weight, std=0.1)
    return model.eval()


@pytest.mark.parametrize("cond_mode", COND_MODES)
def test_future_frames_do_not_change_the_past(cond_mode: str) -> None:
    model = make(cond_mode, grid=(2, 3), rel_pos_bias=True)
    torch.manual_seed(1)
    x, cond = torch.randn(B, T, N, D), torch.randn(B, T, D)
    t = 2
    x2, cond2 = x.clone(), cond.clone()
    x2[:, t + 1 :] = torch.randn(B, T - t - 1, N, D)  # perturb frames > t
    cond2[:, t + 1 :] = torch.randn(B, T - t - 1, D)
    with torch.no_grad():
        y, y2 = model(x, cond), model(x2, cond2)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert (y[:, t + 1 :] - y2[:, t + 1 :]).abs().max() > 1e-2  # the future itself did change


def test_spatial_attention_mixes_within_a_frame_only() -> None:
    model = make()
    torch.manual_seed(2)
    x = torch.randn(B, T, N, D)
    x2 = x.clone()
    x2[:, 2, 0] = torch.randn(B, D)  # one token of frame 2
    with torch.no_grad():
        y, y2 = model(x, None), model(x2, None)
    changed = (y - y2).abs().amax(dim=-1)  # (B, T, N)
    # every token of frame 2 (not only token 0) sees the change through spatial attention
    assert (changed[:, 2] > 1e-3).all()
    # frames before 2 are untouched (causal), later frames change through time attention
    assert (changed[:, :2] == 0).all()
    assert (changed[:, 3:] > 0).all()

    # with one block, temporal attention reads the same position only: after the spatial step
    # the change sits in every token of frame 2, so test the spatial step by itself
    block = model.blocks[0]
    with torch.no_grad():
        h = block.norm_space(x)
        out = block.attn_space(h.flatten(0, 1))
        h2 = block.norm_space(x2)
        out2 = block.attn_space(h2.flatten(0, 1))
    delta = (out - out2).abs().amax(dim=-1).view(B, T, N)
    assert (delta[:, 2] > 1e-4).all()  # within frame 2: every token mixed in the change
    assert (delta[:, [0, 1, 3, 4]] == 0).all()  # other frames: nothing


@pytest.mark.parametrize("cond_mode", COND_MODES)
def test_cached_forward_matches_uncached(cond_mode: str) -> None:
    model = make(cond_mode, grid=(2, 3), rel_pos_bias=True)
    torch.manual_seed(3)
    x, cond = torch.randn(B, T, N, D), torch.randn(B, T, D)
    with torch.no_grad():
        full = model(x, cond)
        cache = model.new_cache()
        parts = [model(x[:, :2], cond[:, :2], cache=cache)]  # a 2-frame prefill
        assert cache.length == 2
        parts.append(model(x[:, 2:3], cond[:, 2:3], cache=cache))  # one frame at a time
        # re-running a frame without committing it leaves the cache as it was
        again = model(x[:, 3:4], cond[:, 3:4], cache=cache, update_cache=False)
        assert cache.length == 3
        parts.append(model(x[:, 3:5], cond[:, 3:5], cache=cache))  # a 2-frame chunk
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full[:, 3:4], atol=1e-5, rtol=0)
    assert cache.length == T


def test_bad_shapes_raise() -> None:
    model = make()
    with pytest.raises(ValueError, match="max_frames"):
        model(torch.randn(1, 9, N, D))
    with pytest.raises(ValueError, match="expected tokens"):
        model(torch.randn(1, 2, N + 1, D))
    with pytest.raises(ValueError, match="cond_mode"):
        STTransformer(dim=D, depth=1, heads=4, num_tokens=N, max_frames=4, cond_mode="film")
    with pytest.raises(ValueError, match="grid"):
        STTransformer(dim=D, depth=1, heads=4, num_tokens=N, max_frames=4, grid=(2, 2))
