"""Tests for worldmodel/metrics.py, eval/metrics.py and eval/fvd.py against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from worldmodel import metrics as shared
from worldmodel.eval import metrics as M
from worldmodel.eval.fvd import (
    FeatureStats,
    I3DFeatures,
    RandomVideoFeatures,
    build_feature_net,
    frechet_distance,
    fvd,
    fvd_metric_name,
    load_i3d,
)
from worldmodel.eval.metrics import (
    MSE_FLOOR,
    LPIPSMetric,
    RunningMeans,
    action_agreement,
    action_mapping,
    action_onsets,
    bootstrap_ci,
    changing_mask,
    clustered_stderr,
    codebook_stats,
    confusion_matrix,
    delta_psnr,
    frame_mse,
    lam_alignment,
    load_lpips_network,
    load_lpips_weights,
    normalized_mutual_information,
    onset_mapping,
    paired_difference,
    pooled_psnr,
    psnr,
    psnr_from_mse,
    purity,
    rollout_errors,
    rollout_psnr_summary,
    rollout_psnr_vs_horizon,
    ssim,
)
from worldmodel.models.losses import psnr_per_frame


def _video(b=2, c=3, t=4, h=16, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, t, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_is_clamped_not_inf():
    torch.manual_seed(0)
    x = _video()
    value = psnr(x, x)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(10 * math.log10(4.0 / MSE_FLOOR), rel=1e-5)


def test_psnr_constant_offset_hand_computed():
    torch.manual_seed(0)
    x = _video() * 0.5
    # Offset 0.1 everywhere: MSE = 0.01, PSNR = 10 log10(4 / 0.01) = 26.0206 dB.
    assert psnr(x + 0.1, x).item() == pytest.approx(10 * math.log10(400.0), abs=1e-3)
    # Per-frame values and the mean over frames of per-frame PSNR (not PSNR of the mean MSE).
    pred = x.clone()
    pred[:, :, 0] += 0.1  # frame 0: 26.02 dB; frame 1..3: offset 0.2 -> 20.00 dB
    pred[:, :, 1:] += 0.2
    per_frame = psnr(pred, x, reduction="none")
    assert per_frame.shape == (2, 4)
    expected = torch.tensor([10 * math.log10(400.0)] + [10 * math.log10(100.0)] * 3)
    torch.testing.assert_close(per_frame, expected.expand(2, 4), atol=1e-3, rtol=0)
    assert psnr(pred, x).item() == pytest.approx(expected.mean().item(), abs=1e-3)


def test_psnr_mask_and_images():
    torch.manual_seed(0)
    x = _video() * 0.5
    pred = x.clone()
    pred[:, :, :2] += 0.1  # 26.02 dB
    pred[:, :, 2:] += 0.2  # 20.00 dB
    mask = torch.tensor([[True, True, False, False]] * 2)
    assert psnr(pred, x, mask=mask).item() == pytest.approx(10 * math.log10(400.0), abs=1e-3)
    images = psnr(pred[:, :, 0], x[:, :, 0], reduction="none")
    assert images.shape == (2,)


def test_rollout_psnr_vs_horizon():
    torch.manual_seed(0)
    x = _video(t=3) * 0.5
    pred = x.clone()
    for t, offset in enumerate([0.01, 0.1, 0.2]):
        pred[:, :, t] += offset
    curve = rollout_psnr_vs_horizon(pred, x)
    expected = torch.tensor([10 * math.log10(4.0 / o**2) for o in [0.01, 0.1, 0.2]])
    torch.testing.assert_close(curve, expected, atol=1e-3, rtol=0)


def test_ssim_identical_and_noisy():
    torch.manual_seed(0)
    x = _video(h=32, w=32)
    same = ssim(x, x, reduction="none")
    assert same.shape == (2, 4)
    torch.testing.assert_close(same, torch.ones(2, 4), atol=1e-5, rtol=0)
    noise = torch.randn_like(x)
    value = ssim((x + 0.3 * noise).clamp(-1, 1), x).item()
    noisier = ssim((x + 0.6 * noise).clamp(-1, 1), x).item()
    assert 0.0 < noisier < value < 0.95


def test_one_implementation_shared_by_training_and_eval():
    for name in ("psnr", "ssim", "frame_mse", "psnr_from_mse", "codebook_stats", "LPIPSMetric"):
        assert getattr(M, name) is getattr(shared, name)
    x = _video() * 0.5
    pred = x + 0.1
    frames = (pred[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(psnr_per_frame(*frames), psnr(*frames, reduction="none"))


def test_psnr_clamps_both_inputs_to_the_frame_range():
    x = torch.full((1, 3, 2, 8, 8), 0.9)
    # A decoder overshooting to 1.5 is scored as displayed (1.0): error 0.1, not 0.6.
    overshoot = torch.full_like(x, 1.5)
    assert psnr(overshoot, x).item() == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)
    torch.testing.assert_close(frame_mse(overshoot, x), torch.full((1, 2), 0.01))
    assert psnr_from_mse(0.01).item() == pytest.approx(10 * math.log10(400.0), abs=1e-4)
    assert psnr_from_mse(0.0).item() == pytest.approx(10 * math.log10(4.0 / MSE_FLOOR), rel=1e-5)


def test_ssim_matches_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = _video(h=24, w=20)
    noisy = (x + 0.4 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(noisy, x, reduction="none")  # (2, 4)
    frames = [v.transpose(1, 2).reshape(-1, 3, 24, 20).add(1).div(2) for v in (noisy, x)]
    ref = structural_similarity_index_measure(*frames, data_range=1.0, reduction="none")
    torch.testing.assert_close(ours.flatten(), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[..., :10], x[..., :10])


def test_running_means_weight_by_count():
    means = RunningMeans()
    means.add("psnr", torch.tensor(20.0), 3)
    means.add("psnr", 30.0, 1)
    means.update({"ssim": 0.5, "lpips": torch.tensor(0.2)}, n=2)
    means.add("skipped", 1.0, 0)
    assert means.result() == pytest.approx({"psnr": 22.5, "ssim": 0.5, "lpips": 0.2})


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips() -> LPIPSMetric:
    # AlexNet: building torchvision's VGG16 (with its 100M-parameter classifier) takes seconds.
    torch.manual_seed(0)
    return LPIPSMetric(net="alex", random_init=True)


def test_lpips_random_init_identical_and_different(random_lpips):
    torch.manual_seed(0)
    metric = random_lpips
    x = _video(b=2, t=2, h=32, w=32)
    same = metric(x, x, reduction="none")
    assert same.shape == (2, 2)
    assert same.abs().max().item() < 1e-6
    other = _video(b=2, t=2, h=32, w=32, seed=1)
    assert metric(other, x).item() > 1e-3


def test_lpips_missing_weights_names_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as info:
        LPIPSMetric(net="alex")
    assert "eval.lpips_weights" in str(info.value)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as info:
        LPIPSMetric(net="vgg", weights_path=str(tmp_path / "nope.pth"))
    assert "eval.lpips_weights" in str(info.value)
    assert "nope.pth" in str(info.value)


def test_lpips_weights_path_round_trip(tmp_path):
    """A torchvision AlexNet state dict saved here lands in lpips' backbone slices."""
    import torchvision

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)
    # Only the features are used; keep the file small but in torchvision's key layout.
    state = {k: v for k, v in alexnet.state_dict().items() if k.startswith("features.")}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # extra keys are ignored
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)

    metric = LPIPSMetric(net="alex", weights_path=str(path))
    loaded = metric.lpips.net
    for index, slice_name in [(0, "slice1"), (3, "slice2"), (6, "slice3"), (10, "slice5")]:
        conv = getattr(loaded, slice_name).get_submodule(str(index))
        torch.testing.assert_close(conv.weight, alexnet.features[index].weight)
        torch.testing.assert_close(conv.bias, alexnet.features[index].bias)
    x = _video(b=1, t=2, h=32, w=32)
    assert metric(x, x).abs().item() < 1e-6
    assert metric(_video(b=1, t=2, h=32, w=32, seed=3), x).item() > 1e-3

    # A whole lpips.LPIPS state dict round-trips too.
    full = tmp_path / "lpips_full.pth"
    torch.save(metric.lpips.state_dict(), full)
    again = load_lpips_network("alex", str(full))
    torch.testing.assert_close(
        again.net.slice2.get_submodule("3").weight, alexnet.features[3].weight
    )

    with pytest.raises(KeyError, match="features"):
        bad = tmp_path / "bad.pth"
        torch.save({"features.0.weight": state["features.0.weight"]}, bad)
        load_lpips_network("alex", str(bad))


def test_lpips_whole_state_dict_is_loaded_strictly(random_lpips):
    net = load_lpips_network("alex", random_init=True)
    state = random_lpips.lpips.state_dict()
    load_lpips_weights(net, state)
    torch.testing.assert_close(net.net.slice1[0].weight, random_lpips.lpips.net.slice1[0].weight)
    incomplete = {k: v for k, v in state.items() if not k.startswith("lin0.")}
    with pytest.raises(RuntimeError, match="lin0"):
        load_lpips_weights(net, incomplete)
    with pytest.raises(RuntimeError, match="extra"):
        load_lpips_weights(net, {**state, "extra.weight": torch.zeros(1)})


def test_lpips_stays_in_eval_mode(random_lpips):
    torch.manual_seed(0)
    parent = nn.Sequential(random_lpips)
    parent.train()
    assert not random_lpips.lpips.training
    assert not any(p.requires_grad for p in random_lpips.parameters())


# ---------------------------------------------------------------- codebooks, control, agreement


def test_codebook_stats_hand_computed():
    torch.manual_seed(0)
    # 8 codes, 4 used with counts 4, 2, 1, 1 -> p = 1/2, 1/4, 1/8, 1/8; H = 1.75 bits.
    indices = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 3]])
    stats = codebook_stats(indices, codebook_size=8)
    assert stats["usage"].item() == pytest.approx(0.5)
    assert stats["dead_fraction"].item() == pytest.approx(0.5)
    assert stats["entropy_bits"].item() == pytest.approx(1.75)
    assert stats["perplexity"].item() == pytest.approx(2**1.75)
    uniform = codebook_stats(torch.arange(16).repeat(3), codebook_size=16)
    assert uniform["perplexity"].item() == pytest.approx(16.0)
    assert uniform["usage"].item() == 1.0
    with pytest.raises(ValueError):
        codebook_stats(torch.tensor([8]), codebook_size=8)


def test_delta_psnr_hand_computed():
    inferred = torch.tensor([[20.0, 18.0], [22.0, 19.0], [21.0, 17.0]])
    random = torch.tensor([[19.0, 18.0], [20.0, 18.0], [21.0, 15.0]])
    # differences: t0 = [1, 2, 0] -> mean 1, std 1, stderr 1/sqrt(3); t1 = [0, 1, 2] -> same
    out = delta_psnr(inferred, random)
    assert out["n"] == 3
    torch.testing.assert_close(out["mean"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        out["stderr"], torch.full((2,), 1 / math.sqrt(3), dtype=torch.float64)
    )
    single = delta_psnr(inferred[:1], random[:1])
    assert single["n"] == 1 and torch.isnan(single["stderr"]).all()


def test_confusion_matrix_and_mapping():
    true = torch.tensor([0, 0, 0, 1, 1, 2, -1, 2])
    codes = torch.tensor([3, 3, 1, 0, 0, 2, 5, 2])
    conf = confusion_matrix(true, codes, num_a=4, num_b=4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 3], expected[0, 1], expected[1, 0], expected[2, 2] = 2, 1, 2, 2
    torch.testing.assert_close(conf, expected)  # the (-1, 5) pair is dropped
    assert action_mapping(conf) == {0: 3, 1: 0, 2: 2}  # action 3 never occurs
    assert action_agreement(conf) == pytest.approx(6 / 7)


def test_action_onsets_mark_where_an_action_starts_and_each_episode_start():
    # two episodes back to back: [5 5 7 7 7] and [7 7 4]
    actions = np.array([5, 5, 7, 7, 7, 7, 7, 4])
    onsets = action_onsets(actions, np.array([0, 5]))
    assert onsets.tolist() == [True, False, True, False, False, True, False, True]


def test_onset_mapping_takes_the_code_most_specific_to_each_action():
    # held moves share code 0 (the motion under way); action 1's own code is 2, rarer than 0
    conf = torch.tensor([[9, 0, 0], [6, 0, 3], [0, 4, 0]])
    assert action_mapping(conf) == {0: 0, 1: 0, 2: 1}  # the majority gives 0 and 1 one code
    assert onset_mapping(conf) == {0: 0, 1: 2, 2: 1}  # P(1 | code 2) = 1
    assert onset_mapping(torch.zeros(2, 3, dtype=torch.long)) == {}


def test_nmi_permutation_independent_and_hand_case():
    torch.manual_seed(0)
    a = torch.randint(0, 5, (200,))
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert normalized_mutual_information(a, perm[a]) == pytest.approx(1.0)
    # Independent by construction: every (i, j) pair appears exactly once.
    grid_a = torch.arange(4).repeat_interleave(4)
    grid_b = torch.arange(4).repeat(4)
    assert normalized_mutual_information(grid_a, grid_b) == pytest.approx(0.0, abs=1e-12)
    # a = [0,0,1,1], b = [0,0,0,1]: I = .5 ln(4/3) + .25 ln(2/3) + .25 ln 2,
    # H(a) = ln 2, H(b) = -(.75 ln .75 + .25 ln .25).
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_a = math.log(2)
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    value = normalized_mutual_information(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]))
    assert value == pytest.approx(mi / ((h_a + h_b) / 2), abs=1e-9)
    assert value == pytest.approx(0.34371, abs=1e-4)
    # Constant labelings: both constant -> 1, one constant -> 0.
    assert normalized_mutual_information(torch.zeros(5), torch.ones(5)) == 1.0
    assert normalized_mutual_information(torch.zeros(4), torch.tensor([0, 1, 0, 1])) == 0.0


# ---------------------------------------------------------------- honest baselines


def test_changing_mask_finds_repeated_frames():
    video = _video(b=2, t=4)
    video[0, :, 2] = video[0, :, 1]  # an exact repeat
    video[1, :, 3] = video[1, :, 2] + 0.5 / 255  # below half an 8-bit level: unchanged
    video[1, 0, 1, 3, 3] = video[1, 0, 0, 3, 3] + 0.5  # one pixel moves: changed
    mask = changing_mask(video[:, :, :-1], video[:, :, 1:])
    assert mask.tolist() == [[True, False, True], [True, True, False]]
    assert changing_mask(video[:, :, 0], video[:, :, 2]).shape == (2,)


def test_pooled_psnr_is_psnr_of_mean_mse():
    mse = torch.tensor([[0.01, 0.0], [0.03, 0.04]])
    mask = torch.tensor([[True, False], [True, True]])
    # Frames 0.01, 0.03, 0.04 -> mean MSE 0.08 / 3; the exact frame is left out.
    expected = 10 * math.log10(4 / (0.08 / 3))
    assert pooled_psnr(mse, mask).item() == pytest.approx(expected, abs=1e-4)
    curve = pooled_psnr(mse, mask, dim=0)  # per horizon: mean(0.01, 0.03), 0.04
    torch.testing.assert_close(
        curve, torch.tensor([10 * math.log10(4 / 0.02), 10 * math.log10(4 / 0.04)])
    )
    # With the exact frame, a per-frame PSNR mean is dominated by the floored ~106 dB.
    assert psnr_from_mse(mse).mean().item() > 40 > pooled_psnr(mse).item()
    assert torch.isnan(pooled_psnr(mse, torch.zeros_like(mask)))
    assert torch.isnan(pooled_psnr(mse, torch.tensor([[False, False], [True, False]]), 0)[1])


def test_rollout_errors_and_summary_on_a_static_scene():
    """Half the frames repeat: copying the previous frame looks perfect on the floored per-frame
    mean, but on changing frames it scores what it really gets."""
    torch.manual_seed(0)
    b, t, context = 4, 6, 2
    video = _video(b=b, t=t) * 0.5
    video[:, :, 2] = video[:, :, 1]  # horizon 0 repeats the last context frame
    video[:, :, 4] = video[:, :, 3]  # horizon 2 repeats horizon 1
    pred = video[:, :, context:] + 0.05  # a model that is 0.05 off everywhere
    errors = rollout_errors(pred, video, context)
    assert errors["changing"].tolist() == [[False, True, False, True]] * b
    torch.testing.assert_close(errors["model"], torch.full((b, 4), 0.0025))
    assert errors["copy_previous"][:, 0].max().item() == 0.0 == errors["copy_context"][:, 0].max()
    assert (errors["copy_context"][:, 1:] > 0).all()
    summary = rollout_psnr_summary(errors)
    assert summary["changing_fraction"] == pytest.approx(0.5)
    assert summary["changing_frames"] == 2 * b
    assert summary["model_psnr"] == pytest.approx(10 * math.log10(4 / 0.0025), abs=1e-3)
    copy_changing = errors["copy_previous"][:, 1::2].double().mean().item()
    assert summary["copy_previous_psnr"] == pytest.approx(10 * math.log10(4 / copy_changing), 1e-4)
    floored_mean = psnr(video[:, :, 1:-1], video[:, :, 2:]).item()
    assert summary["copy_previous_psnr"] < 15 < 42 < floored_mean
    assert math.isnan(summary["model_psnr_curve"][0])
    assert len(summary["copy_context_psnr_curve"]) == 4
    # Padding frames never count as changing.
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 5:] = False
    changing = rollout_errors(pred, video, context, mask=mask)["changing"]
    assert changing[0].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="at least"):
        rollout_errors(pred, video[:, :, :5], context)


# ---------------------------------------------------------------- clustered errors


def test_clustered_stderr_hand_computed():
    # mean 3, residuals -2, 0, -1, 3; cluster sums -2, 2; SE^2 = 2/1 * 8 / 16 = 1.
    values = torch.tensor([1.0, 3.0, 2.0, 6.0])
    assert clustered_stderr(values, ["a", "a", "b", "b"]).item() == pytest.approx(1.0)
    # Every value its own cluster: the usual std (ddof 1) / sqrt(N).
    torch.manual_seed(0)
    x = torch.randn(30, 3)
    torch.testing.assert_close(
        clustered_stderr(x, torch.arange(30)), x.double().std(0) / math.sqrt(30)
    )
    # Duplicated clips of an episode add no information: same SE as the episode means.
    means = torch.tensor([1.0, 3.0, 2.5])
    dup = means.repeat_interleave(4)
    episodes = torch.arange(3).repeat_interleave(4)
    assert clustered_stderr(dup, episodes).item() == pytest.approx(
        means.double().std().item() / math.sqrt(3)
    )
    assert clustered_stderr(dup, episodes).item() > 1.5 * dup.double().std().item() / math.sqrt(12)
    assert torch.isnan(clustered_stderr(values, [7, 7, 7, 7]))


def test_paired_difference_and_clustered_delta_psnr():
    a = torch.tensor([[20.0, 18.0], [22.0, 19.0], [21.0, 17.0], [23.0, 16.0]])
    b = torch.tensor([[19.0, 18.0], [20.0, 18.0], [21.0, 15.0], [21.0, 15.0]])
    out = paired_difference(a, b, clusters=[0, 0, 1, 1])
    assert out["n"] == 4 and out["clusters"] == 2
    # horizon 0: differences 1, 2, 0, 2 -> mean 1.25, residuals -.25, .75, -1.25, .75,
    # cluster sums .5, -.5 -> SE^2 = 2 * .5 / 16.
    torch.testing.assert_close(out["mean"][0], torch.tensor(1.25, dtype=torch.float64))
    assert out["stderr"][0].item() == pytest.approx(math.sqrt(2 * 0.5 / 16))
    delta = delta_psnr(a, b, clusters=[0, 0, 1, 1])
    torch.testing.assert_close(delta["stderr"], out["stderr"])
    assert delta["clusters"] == 2
    assert delta_psnr(a, b)["clusters"] == 4  # default: every clip its own cluster


def test_bootstrap_ci_by_episode():
    torch.manual_seed(0)
    episode_means = torch.randn(40)
    values = (episode_means.repeat_interleave(5) + 0.1 * torch.randn(200)).double()
    episodes = torch.arange(40).repeat_interleave(5)
    low, high = bootstrap_ci(values, episodes, num_resamples=400, seed=1)
    assert low < values.mean().item() < high
    assert bootstrap_ci(values, episodes, num_resamples=400, seed=1) == (low, high)
    # The width follows the episode-level spread (~1.96 * 2 * SE), not the naive per-clip one.
    se = clustered_stderr(values, episodes).item()
    assert 0.7 * 3.92 * se < high - low < 1.3 * 3.92 * se
    # Any statistic of whole rows, e.g. a pooled PSNR over (sum of MSE, frame count) rows.
    rows = torch.stack([torch.full((200,), 0.02), torch.ones(200)], dim=1)
    low, high = bootstrap_ci(
        rows, episodes, statistic=lambda r: psnr_from_mse(r[:, 0].sum() / r[:, 1].sum())
    )
    assert low == pytest.approx(10 * math.log10(200), abs=1e-3) == high


# ---------------------------------------------------------------- latent actions vs chance


def test_purity_and_lam_alignment_with_chance_levels():
    torch.manual_seed(0)
    true = torch.randint(0, 4, (400,))
    true[:100] = 0  # action 0 is the majority
    majority = torch.bincount(true).max().item() / 400
    collapsed = lam_alignment(true, torch.zeros(400, dtype=torch.long))
    assert collapsed["nmi"] == 0.0 == collapsed["nmi_chance"]
    assert collapsed["purity"] == pytest.approx(majority) == collapsed["purity_chance"]
    assert collapsed["majority_share"] == pytest.approx(majority)
    perfect = lam_alignment(true, (true + 2) % 4)
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["purity"] == 1.0
    assert perfect["nmi_chance"] < 0.05 and perfect["purity_chance"] < majority + 0.05
    # Many codes for few samples: purity is high by chance alone, the chance level shows it.
    many = lam_alignment(true[:40], torch.arange(40) % 32)
    assert many["purity"] > 0.8 and many["purity_chance"] > 0.8
    # Unknown actions are dropped; purity reads codes -> majority action.
    assert purity(torch.tensor([0, 0, 1, -1]), torch.tensor([5, 5, 5, 2])) == pytest.approx(2 / 3)
    assert lam_alignment(true, true, seed=3) == lam_alignment(true, true, seed=3)


# ---------------------------------------------------------------- FVD


def test_frechet_distance_closed_forms():
    torch.manual_seed(0)
    mu = torch.randn(6)
    a = torch.randn(6, 6)
    sigma = a @ a.T + 0.1 * torch.eye(6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s.
    d = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), [[9.0]])
    assert d == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)
    # Diagonal: sum over dimensions of the 1-D formula.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    got = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-9)
    # Singular (rank-deficient) covariances are handled without nan.
    low_rank = torch.randn(6, 2)
    sing = low_rank @ low_rank.T
    assert frechet_distance(mu, sing, mu, sing) == pytest.approx(0.0, abs=1e-6)


def test_feature_stats_match_torch_cov():
    torch.manual_seed(0)
    feats = torch.randn(50, 5, dtype=torch.float64) * 3 + 1
    stats = FeatureStats()
    for chunk in feats.split(7):
        stats.update(chunk)
    assert stats.n == 50
    torch.testing.assert_close(stats.mean, feats.mean(0))
    torch.testing.assert_close(stats.cov, torch.cov(feats.T))


def test_fvd_random_features_ranks_shift():
    torch.manual_seed(0)
    net = RandomVideoFeatures(seed=0)
    assert fvd_metric_name(net) == "fvd_random_features"
    n, shape = 48, (3, 4, 16, 16)

    def sample(seed: int, shift: float = 0.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        # Smooth random blobs plus noise, then a brightness shift for the "fake" set.
        base = torch.rand(n, *shape, generator=g) * 1.2 - 0.6
        return (base + shift).clamp(-1, 1)

    real, same, shifted = sample(1), sample(2), sample(3, shift=0.3)
    d_same = fvd(real, same, net, batch_size=16)
    d_shift = fvd(real, shifted, net, batch_size=16)
    assert d_shift > 5 * d_same
    # Iterables of batches give the same stats as one tensor.
    assert fvd(list(real.split(10)), same, net, batch_size=16) == pytest.approx(d_same, rel=1e-6)
    # Seeded: a second instance computes the same features.
    torch.testing.assert_close(RandomVideoFeatures(seed=0)(real[:2]), net(real[:2]))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_load_i3d_missing_and_scripted(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(FileNotFoundError, match="eval.fvd_weights") as info:
        load_i3d(tmp_path / "i3d_torchscript.pt")
    assert "i3d_torchscript.pt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="eval.fvd_weights"):
        build_feature_net(str(tmp_path / "missing.pt"))
    assert isinstance(build_feature_net(None), RandomVideoFeatures)

    class FakeDetector(nn.Module):
        """Same call signature as the I3D export; features = per-channel means."""

        def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool):
            assert x.shape[-1] == 224 and x.shape[-2] == 224
            return x.mean(dim=(2, 3, 4))

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(path))
    net = load_i3d(path)
    assert isinstance(net, I3DFeatures) and fvd_metric_name(net) == "fvd"
    small = net(_video(b=2, c=1, t=9, h=8, w=8))  # resized to 224, gray repeated to RGB
    assert small.shape == (2, 3)
    torch.testing.assert_close(small[:, 0], small[:, 2])
    video = _video(b=2, c=3, t=9, h=224, w=224)
    torch.testing.assert_close(net(video), video.mean(dim=(2, 3, 4)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="9 frames"):
        net(_video(t=8))
