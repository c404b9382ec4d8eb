"""Evaluation metrics: frame metrics, honest baselines, clustered errors, latent-action agreement.

Frame metrics (PSNR, SSIM, LPIPS, codebook statistics) are implemented once in
`worldmodel.metrics` and re-exported here, so `metrics.psnr` in an evaluation is the `psnr` the
models log in training. This module adds what only evaluation needs:

- Baselines and pooled PSNR: `changing_mask` finds the frames that differ from the previous real
  frame (about a fifth of consecutive CoinRun frames are identical, and a floored per-frame PSNR
  mean scores "copy the previous frame" at ~42 dB on them); `pooled_psnr` is the PSNR of the
  mean MSE over selected frames; `rollout_errors` / `rollout_psnr_summary` score a rollout beside
  the copy-previous-real-frame and copy-context-frame baselines on changing frames only.
- Uncertainty that respects the data: `clustered_stderr` (clips of one episode are not
  independent), `paired_difference` and `delta_psnr` (ΔtPSNR) with clustered errors, and
  `bootstrap_ci` over episodes.
- Latent actions against true actions: `confusion_matrix`, `action_mapping`,
  `action_agreement`, `normalized_mutual_information`, `purity`, and `lam_alignment`, which
  reports NMI and purity beside their chance levels.

Label arrays (latent codes, true actions) are integer tensors; negative labels mean "unknown"
(the batch convention for actions) and pairs holding one are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worldmodel.metrics import (
    DATA_RANGE,
    LPIPS_BACKBONE_FILES,
    MSE_FLOOR,
    LPIPSMetric,
    Reduction,
    RunningMeans,
    codebook_stats,
    frame_mse,
    load_lpips_network,
    load_lpips_weights,
    psnr,
    psnr_from_mse,
    ssim,
)

__all__ = [
    "CHANGE_EPS",
    "DATA_RANGE",
    "LPIPS_BACKBONE_FILES",
    "MSE_FLOOR",
    "LPIPSMetric",
    "Reduction",
    "RunningMeans",
    "action_agreement",
    "action_mapping",
    "bootstrap_ci",
    "changing_mask",
    "clustered_stderr",
    "codebook_stats",
    "confusion_matrix",
    "delta_psnr",
    "frame_mse",
    "lam_alignment",
    "load_lpips_network",
    "load_lpips_weights",
    "normalized_mutual_information",
    "paired_difference",
    "pooled_psnr",
    "psnr",
    "psnr_from_mse",
    "purity",
    "rollout_errors",
    "rollout_psnr_summary",
    "rollout_psnr_vs_horizon",
    "ssim",
]

# A frame "changes" when some pixel moves by more than half an 8-bit level (a level is 2/255 in
# [-1, 1]): exact repeats of a recorded frame stay unchanged through the uint8 -> float mapping.
CHANGE_EPS = 1.0 / 255.0


# --------------------------------------------------------------------------------------------
# Changing frames, pooled PSNR and trivial baselines
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def changing_mask(prev: Tensor, target: Tensor, eps: float = CHANGE_EPS) -> Tensor:
    """Which target frames differ from the frame before them.

    A frame changes when its largest absolute pixel difference to `prev` exceeds `eps`. Scoring
    only these frames keeps identical consecutive frames (where copying the previous frame is
    exact) from inflating every PSNR, the model's and the baselines' alike.

    Args:
        prev: the previous real frame of each target, same shape as `target`.
        target: (B, C, T, H, W) videos or (B, C, H, W) frames in [-1, 1].
    Returns:
        (B, T) bool for videos, (B,) for frames; True = the frame changes.
    """
    if prev.shape != target.shape:
        raise ValueError(f"prev {tuple(prev.shape)} and target {tuple(target.shape)} differ")
    if target.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, T, H, W) or (B, C, H, W), got {tuple(target.shape)}")
    diff = (target.float() - prev.float()).abs()
    dims = (1, 3, 4) if target.ndim == 5 else (1, 2, 3)
    return diff.amax(dim=dims) > eps


def pooled_psnr(mse: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """PSNR of the mean MSE over the selected frames (not the mean of per-frame PSNRs).

    One exact frame then cannot dominate a mean with its floored ~106 dB: every selected frame
    contributes its squared error. Accumulate per-frame MSEs (`frame_mse`) over the whole
    evaluation and call this once at the end.

    Args:
        mse: per-frame MSE, e.g. (N, T) over N clips and T horizons.
        mask: bool of the same shape, True = the frame counts (e.g. `changing_mask`).
        dim: None -> one value over all selected frames (0-d); an axis -> one value per index of
            the other axes (dim=0 on (N, T) gives the (T,) curve over horizons).
    Returns:
        PSNR in dB (float32); nan where no frame is selected.
    """
    mse = torch.as_tensor(mse).detach().double()
    weights = torch.ones_like(mse) if mask is None else torch.as_tensor(mask).to(mse)
    if weights.shape != mse.shape:
        raise ValueError(f"mask {tuple(weights.shape)} must match mse {tuple(mse.shape)}")
    total = (mse * weights).sum() if dim is None else (mse * weights).sum(dim)
    count = weights.sum() if dim is None else weights.sum(dim)
    return psnr_from_mse(total / count)  # 0 / 0 = nan where nothing is selected


@torch.no_grad()
def rollout_errors(
    pred: Tensor,
    video: Tensor,
    context: int,
    mask: Tensor | None = None,
    eps: float = CHANGE_EPS,
) -> dict[str, Tensor]:
    """Per-frame MSE of predicted frames and of two trivial baselines, and which frames change.

    `pred` (B, C, H, h, w) predicts the real frames `video[:, :, context : context + H]` (H
    horizons after `context` real frames; teacher-forced next-frame predictions are the case
    H = T - context with every prediction made from real frames).

    Returns (B, H) tensors:
        model: MSE of `pred`.
        copy_previous: MSE of the previous real frame (frame t-1 for target t), what a model
            that repeats its input frame gets when fed real frames.
        copy_context: MSE of the last context frame at every horizon, what a rollout that
            freezes gets.
        changing: bool, the target differs from its previous real frame (`changing_mask`),
            and, with a (B, T) frame `mask` of the video (False = padding), both are real.
    Concatenate them over batches (dim 0) and pass the result to `rollout_psnr_summary`.
    """
    horizon = pred.shape[2]
    if context < 1 or context + horizon > video.shape[2]:
        raise ValueError(
            f"{horizon} predicted frames after {context} context frames need a video of at "
            f"least {context + horizon} frames, got {video.shape[2]}"
        )
    real = video[:, :, context : context + horizon]
    prev = video[:, :, context - 1 : context + horizon - 1]
    last = video[:, :, context - 1 : context].expand_as(real)
    changing = changing_mask(prev, real, eps)  # (B, H)
    if mask is not None:
        mask = mask.to(changing.device, torch.bool)
        real_target = mask[:, context : context + horizon]
        changing &= real_target & mask[:, context - 1 : context + horizon - 1]
    return {
        "model": frame_mse(pred, real),
        "copy_previous": frame_mse(prev, real),
        "copy_context": frame_mse(last, real),
        "changing": changing,
    }


def rollout_psnr_summary(errors: dict[str, Tensor]) -> dict[str, Any]:
    """Pooled PSNR on changing frames of a rollout and its baselines, overall and per horizon.

    Args:
        errors: `rollout_errors` outputs concatenated over clips, each (N, H).
    Returns (plain floats and lists, ready for eval.json; nan where no frame changes):
        {name}_psnr and {name}_psnr_curve (H values) for name in model, copy_previous,
        copy_context; changing_fraction (share of frames that change), its per-horizon
        changing_fraction_curve, and changing_frames (their number).
    """
    changing = torch.as_tensor(errors["changing"]).bool()
    out: dict[str, Any] = {
        "changing_fraction": float(changing.double().mean()),
        "changing_fraction_curve": changing.double().mean(dim=0).tolist(),
        "changing_frames": int(changing.sum()),
    }
    for name in ("model", "copy_previous", "copy_context"):
        out[f"{name}_psnr"] = float(pooled_psnr(errors[name], changing))
        out[f"{name}_psnr_curve"] = pooled_psnr(errors[name], changing, dim=0).tolist()
    return out


@torch.no_grad()
def rollout_psnr_vs_horizon(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean per-frame PSNR over the batch at each frame index, (T,): the error growth of a rollout.

    Slice the context frames off before calling if they should not count as horizon 0. With a
    (B, T) mask, each horizon averages over the clips whose frame is real (nan if none is). For
    comparisons with baselines prefer `rollout_errors` (pooled MSE on changing frames).
    """
    values = psnr(pred, target, reduction="none")  # (B, T)
    if values.ndim != 2:
        raise ValueError("rollout_psnr_vs_horizon needs videos (B, C, T, H, W)")
    if mask is None:
        return values.mean(dim=0)
    weights = mask.to(values.device, values.dtype)
    return (values * weights).sum(dim=0) / weights.sum(dim=0)  # (T,), nan where no real frame


# --------------------------------------------------------------------------------------------
# Standard errors clustered by episode
# --------------------------------------------------------------------------------------------


def _cluster_index(clusters: Any, n: int) -> tuple[Tensor, int]:
    """Cluster ids of any hashable labels (ints, strings) -> (N,) long in [0, G), and G."""
    labels = np.asarray(clusters.cpu() if isinstance(clusters, Tensor) else clusters)
    if labels.shape != (n,):
        raise ValueError(f"clusters must be ({n},), got {labels.shape}")
    _, inverse = np.unique(labels, return_inverse=True)
    index = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    return index, int(index.max()) + 1 if n else 0


def clustered_stderr(values: Tensor, clusters: Any) -> Tensor:
    """Cluster-robust standard error of the mean of `values` over axis 0.

    Clips cut from one episode share its level, its agent and its frames, so they are not
    independent; treating them as such understates the error. With residuals e_i = v_i - mean
    and S_g the sum of the residuals of cluster g (G clusters, N values):

        SE^2 = G / (G - 1) * sum_g S_g^2 / N^2

    (the CR1 sandwich estimator of a mean). With every value its own cluster this is exactly the
    usual std (ddof 1) / sqrt(N).

    Args:
        values: (N,) or (N, ...) numbers, e.g. one per clip (or per clip and horizon).
        clusters: (N,) cluster labels (e.g. episode ids; ints or strings).
    Returns:
        float64 tensor of shape values.shape[1:]; nan with fewer than 2 clusters.
    """
    v = torch.as_tensor(values).detach().cpu().double()
    n = v.shape[0]
    index, g = _cluster_index(clusters, n)
    if g < 2:
        return torch.full(v.shape[1:], float("nan"), dtype=torch.float64)
    resid = v - v.mean(dim=0)
    sums = torch.zeros((g, *v.shape[1:]), dtype=torch.float64).index_add_(0, index, resid)
    return (g / (g - 1) * sums.pow(2).sum(dim=0) / n**2).sqrt()


def paired_difference(a: Tensor, b: Tensor, clusters: Any | None = None) -> dict[str, Any]:
    """Mean of a - b (paired: row i of both comes from one clip) with its clustered error.

    Args:
        a, b: (N,) or (N, ...) paired values.
        clusters: (N,) cluster labels (episode ids); None = every row its own cluster.
    Returns:
        mean and stderr (float64 tensors of shape a.shape[1:]), n (rows), clusters (G).
    """
    a = torch.as_tensor(a).detach().cpu().double()
    b = torch.as_tensor(b).detach().cpu().double()
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"need two arrays of one shape (N, ...), got {a.shape} and {b.shape}")
    diff = a - b
    n = diff.shape[0]
    labels = np.arange(n) if clusters is None else clusters
    _, g = _cluster_index(labels, n)
    return {
        "mean": diff.mean(dim=0),
        "stderr": clustered_stderr(diff, labels),
        "n": n,
        "clusters": g,
    }


def delta_psnr(
    psnr_inferred: Tensor, psnr_random: Tensor, clusters: Any | None = None
) -> dict[str, Any]:
    """Genie's controllability metric ΔtPSNR with its standard error.

    ΔtPSNR = PSNR(x_t, x̂_t) - PSNR(x_t, x̂'_t), where x̂ is generated with the inferred (or true)
    actions and x̂' with random actions from the same context. The difference is taken per clip
    (the two rollouts share a clip, so it is a paired comparison), then averaged over clips.

    Args:
        psnr_inferred, psnr_random: (N, T) per-clip PSNR at each horizon t.
        clusters: (N,) episode of each clip, for an error clustered by episode; None treats the
            clips as independent (then stderr = std (ddof 1) / sqrt(N)).
    Returns:
        mean: (T,) mean difference per horizon; stderr: (T,) its standard error, nan with fewer
        than 2 clusters; n: N, the number of clips; clusters: the number of clusters.
    """
    inferred = torch.as_tensor(psnr_inferred, dtype=torch.float64)
    random = torch.as_tensor(psnr_random, dtype=torch.float64)
    if inferred.shape != random.shape or inferred.ndim != 2:
        raise ValueError(f"need two (N, T) arrays, got {inferred.shape} and {random.shape}")
    return paired_difference(inferred, random, clusters)


def bootstrap_ci(
    values: Tensor,
    clusters: Any,
    statistic: Callable[[Tensor], Tensor | float] | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a statistic, resampling whole clusters.

    Each resample draws G clusters (episodes) with replacement and keeps all their rows, so the
    interval carries the dependence inside an episode. It suits statistics without a simple
    standard error, e.g. the pooled PSNR on changing frames: with rows
    `torch.stack([(mse * changing).sum(1), changing.sum(1)], 1)` per clip, use
    `statistic=lambda r: psnr_from_mse(r[:, 0].sum() / r[:, 1].sum())`.

    Args:
        values: (N, ...) rows, one per clip.
        clusters: (N,) cluster labels (episode ids).
        statistic: rows (M, ...) -> a number; default the mean of 1-D values.
        num_resamples, level, seed: resamples drawn, coverage, and the generator's seed
            (the same inputs and seed give the same interval).
    Returns:
        (low, high); nan when a resample's statistic is nan.
    """
    v = torch.as_tensor(values).detach().cpu()
    index, g = _cluster_index(clusters, v.shape[0])
    if g < 2:
        raise ValueError("bootstrap_ci needs at least 2 clusters")
    stat = statistic if statistic is not None else (lambda rows: rows.double().mean())
    members = [torch.nonzero(index == c).flatten() for c in range(g)]
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(num_resamples):
        picked = torch.randint(0, g, (g,), generator=gen)
        draws.append(float(stat(v[torch.cat([members[int(c)] for c in picked])])))
    probs = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    low, high = torch.tensor(draws, dtype=torch.float64).quantile(probs).tolist()
    return low, high


# --------------------------------------------------------------------------------------------
# Latent actions against true actions
# --------------------------------------------------------------------------------------------


def _valid_pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(a).detach().flatten().long().cpu()
    b = torch.as_tensor(b).detach().flatten().long().cpu()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in size: {a.numel()} vs {b.numel()}")
    keep = (a >= 0) & (b >= 0)
    return a[keep], b[keep]


def confusion_matrix(a: Tensor, b: Tensor, num_a: int, num_b: int) -> Tensor:
    """Counts (num_a, num_b) long: entry [i, j] = number of positions with a == i and b == j.

    For latent actions, pass true actions as `a` and latent codes as `b` (rows = true actions,
    the layout `action_mapping` expects). Pairs with a negative label are dropped.
    """
    a, b = _valid_pairs(a, b)
    if a.numel() and (int(a.max()) >= num_a or int(b.max()) >= num_b):
        raise ValueError(f"labels exceed the matrix size ({num_a}, {num_b})")
    flat = a * num_b + b  # (N,) row-major cell index
    return torch.bincount(flat, minlength=num_a * num_b).reshape(num_a, num_b)


def normalized_mutual_information(a: Tensor, b: Tensor) -> float:
    """NMI between two labelings with arithmetic-mean normalization: I(a;b) / ((H(a)+H(b))/2).

    The same definition as sklearn's `normalized_mutual_information_score` default: 1 for
    labelings equal up to a permutation, 0 for independent ones; two constant labelings give 1,
    one constant and one not gives 0. Labels can be any non-negative integers; pairs with a
    negative label (unknown action) are dropped.
    """
    a, b = _valid_pairs(a, b)
    if a.numel() == 0:
        raise ValueError("no labeled pairs")
    _, a_idx = torch.unique(a, return_inverse=True)
    _, b_idx = torch.unique(b, return_inverse=True)
    num_a, num_b = int(a_idx.max()) + 1, int(b_idx.max()) + 1
    if num_a == 1 and num_b == 1:
        return 1.0
    joint = confusion_matrix(a_idx, b_idx, num_a, num_b).double()
    joint = joint / joint.sum()  # (A, B) joint distribution
    p_a, p_b = joint.sum(dim=1), joint.sum(dim=0)

    def entropy(p: Tensor) -> Tensor:
        p = p[p > 0]
        return -(p * p.log()).sum()

    nz = joint > 0
    outer = p_a[:, None] * p_b[None, :]  # (A, B) product of marginals
    mi = (joint[nz] * (joint[nz] / outer[nz]).log()).sum()
    norm = (entropy(p_a) + entropy(p_b)) / 2.0
    if norm <= 0:
        return 0.0
    return float((mi / norm).clamp(0.0, 1.0))


def action_mapping(confusion: Tensor) -> dict[int, int]:
    """Most frequent latent code for each true action that occurs.

    `confusion` is (num_actions, num_codes) with rows = true actions (see `confusion_matrix`).
    Ties go to the lowest code index.
    """
    confusion = torch.as_tensor(confusion)
    return {
        int(action): int(confusion[action].argmax())
        for action in range(confusion.shape[0])
        if confusion[action].sum() > 0
    }


def onset_mapping(confusion: Tensor) -> dict[int, int]:
    """For each true action that occurs, the latent code most specific to it: the highest
    P(action | code) (ties to the lowest code index).

    Meant for the confusion of key onsets (`action_onsets`): where a key starts, the code
    describes the change the key makes; while it is held the code also describes the motion
    already under way (CoinRun's momentum, a wall), which the majority of `action_mapping`
    follows instead.
    """
    confusion = torch.as_tensor(confusion).double()
    posterior = confusion / confusion.sum(dim=0, keepdim=True).clamp_min(1)  # (A, K) P(a | code)
    return {
        int(action): int(posterior[action].argmax())
        for action in range(confusion.shape[0])
        if confusion[action].sum() > 0
    }


def action_onsets(actions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(N,) bool: frame t starts its action (`actions` (N,) of episodes back to back, each
    starting at one of `offsets`): the first frame of an episode, or an action other than the
    frame before's."""
    onset = np.ones(len(actions), dtype=bool)
    onset[1:] = actions[1:] != actions[:-1]
    onset[np.asarray(offsets, dtype=np.int64)] = True
    return onset


def action_agreement(confusion: Tensor) -> float:
    """Fraction of samples whose latent code is the most frequent code of their true action."""
    confusion = torch.as_tensor(confusion)
    total = confusion.sum()
    if total == 0:
        raise ValueError("empty confusion matrix")
    return float(confusion.max(dim=1).values.sum() / total)


def purity(true: Tensor, codes: Tensor) -> float:
    """Share of samples whose true action is the most frequent true action of their code.

    Each code is read as predicting its majority action. A LAM that puts everything in one code
    gets the majority-class share; one code per action, 1. More codes than actions inflate it
    (a code per sample scores 1), so read it beside its chance level (`lam_alignment`).
    """
    a, b = _valid_pairs(true, codes)
    if a.numel() == 0:
        raise ValueError("no labeled pairs")
    _, a_idx = torch.unique(a, return_inverse=True)
    _, b_idx = torch.unique(b, return_inverse=True)
    counts = confusion_matrix(b_idx, a_idx, int(b_idx.max()) + 1, int(a_idx.max()) + 1)
    return float(counts.max(dim=1).values.sum() / a.numel())  # rows = codes


def lam_alignment(
    true: Tensor, codes: Tensor, num_shuffles: int = 20, seed: int = 0
) -> dict[str, float | int]:
    """NMI and purity of latent codes against true actions, each beside its chance level.

    The chance levels are the mean NMI and purity after shuffling the codes across samples
    (`num_shuffles` random permutations from a generator seeded with `seed`): the same code
    and action frequencies with the association between them removed. A collapsed LAM (one code
    for everything) gets NMI 0 and purity = majority_share, both equal to their chance levels;
    only the margin over chance says a LAM found the actions.

    Returns:
        nmi, nmi_chance, purity, purity_chance, majority_share (share of the most frequent true
        action) and pairs (the number of labeled pairs).
    """
    a, b = _valid_pairs(true, codes)
    if a.numel() == 0:
        raise ValueError("no labeled pairs")
    gen = torch.Generator().manual_seed(seed)
    nmi_chance = purity_chance = 0.0
    for _ in range(num_shuffles):
        shuffled = b[torch.randperm(b.numel(), generator=gen)]
        nmi_chance += normalized_mutual_information(a, shuffled) / num_shuffles
        purity_chance += purity(a, shuffled) / num_shuffles
    return {
        "nmi": normalized_mutual_information(a, b),
        "nmi_chance": nmi_chance,
        "purity": purity(a, b),
        "purity_chance": purity_chance,
        "majority_share": float(torch.bincount(a).max() / a.numel()),
        "pairs": int(a.numel()),
    }
