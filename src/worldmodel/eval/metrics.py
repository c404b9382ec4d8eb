"""Evaluation metrics on video tensors: PSNR, SSIM, LPIPS, codebook statistics, controllability.

Conventions shared by every function here:

- Videos are (B, C, T, H, W) float tensors in [-1, 1]; a (B, C, H, W) tensor is read as single
  frames. Frame metrics are computed per frame and then averaged, so `reduction="none"` gives
  (B, T) (or (B,) for images) and `reduction="mean"` gives the mean over frames of the per-frame
  values (not the metric of the pooled error), optionally over the frames where `mask` is True.
- Metrics run without autograd and in float32, so their results are detached and can go straight
  into a model's metrics dict; losses that need gradients live in `models/losses.py`.
- Label arrays (latent codes, true actions) are integer tensors; negative labels mean "unknown"
  (the batch convention for actions) and pairs holding one are dropped.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

Reduction = Literal["mean", "none"]

# Floor on the per-frame MSE: identical frames then score a finite 10*log10(4 / 1e-10) ~ 106 dB
# (for data_range 2) instead of inf, so a single perfect frame cannot turn a mean into inf.
MSE_FLOOR = 1e-10


def _as_frames(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Flatten videos (B, C, T, H, W) or images (B, C, H, W) into frames (N, C, H, W)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.ndim == 5:
        b, _, t, _, _ = pred.shape
        pred = rearrange(pred, "B C T H W -> (B T) C H W")
        target = rearrange(target, "B C T H W -> (B T) C H W")
        return pred.float(), target.float(), (b, t)
    if pred.ndim == 4:
        return pred.float(), target.float(), (pred.shape[0],)
    raise ValueError(f"expected (B, C, T, H, W) or (B, C, H, W), got {tuple(pred.shape)}")


def _reduce(values: Tensor, reduction: Reduction, mask: Tensor | None) -> Tensor:
    """Reduce per-frame values (B, T) or (B,) to their mean over (valid) frames, or keep them."""
    if reduction == "none":
        return values
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if mask is None:
        return values.mean()
    mask = mask.to(values.device, torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match per-frame values {values.shape}")
    if not mask.any():
        raise ValueError("mask selects no frame")
    return values[mask].mean()


@torch.no_grad()
def psnr(
    pred: Tensor,
    target: Tensor,
    data_range: float = 2.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Peak signal-to-noise ratio in dB, per frame, then averaged.

    `mean` is the mean over frames of the per-frame PSNR (the convention of video papers), not
    the PSNR of the mean squared error. The per-frame MSE is clamped at `MSE_FLOOR` (1e-10), so
    identical frames give 10*log10(data_range**2 / 1e-10) (~106 dB for data_range 2), never inf.
    Inputs are not clamped: clamp predictions to [-1, 1] first if the decoder may overshoot.

    Args:
        pred, target: (B, C, T, H, W) videos or (B, C, H, W) images; data_range 2.0 for [-1, 1].
        reduction: "mean" -> scalar; "none" -> (B, T) for videos, (B,) for images.
        mask: optional (B, T) bool, True = real frame; only those enter the mean.
    """
    pred_f, target_f, lead = _as_frames(pred, target)
    mse = (pred_f - target_f).pow(2).mean(dim=(1, 2, 3)).clamp_min(MSE_FLOOR)  # (N,)
    values = 10.0 * torch.log10(data_range**2 / mse)
    return _reduce(values.reshape(lead), reduction, mask)  # (B, T) or (B,) before reduction


@torch.no_grad()
def ssim(
    pred: Tensor,
    target: Tensor,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Structural similarity per frame (torchmetrics, Gaussian 11x11 window, sigma 1.5), averaged.

    Frames are mapped from [-1, 1] to [0, 1] and clamped there (SSIM's constants assume the data
    range), then scored with data_range 1. Reduction and mask work as in `psnr`. Frames must be
    at least 11 pixels on each side.
    """
    # Imported here: torchmetrics takes seconds to import and most users of this module never
    # call ssim. Its import warns about its own deprecated aliases, which is not our concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torchmetrics.functional.image import structural_similarity_index_measure

    pred_f, target_f, lead = _as_frames(pred, target)
    pred_01 = ((pred_f + 1.0) / 2.0).clamp(0.0, 1.0)
    target_01 = ((target_f + 1.0) / 2.0).clamp(0.0, 1.0)
    values = structural_similarity_index_measure(
        pred_01, target_01, data_range=1.0, reduction="none"
    )  # (N,)
    return _reduce(values.reshape(lead), reduction, mask)


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------

# The torchvision ImageNet checkpoints lpips would download for its backbone.
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_TORCHVISION_BUILDERS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _missing_lpips_weights(net: str, weights_path: str | None, config_key: str) -> str:
    name = LPIPS_BACKBONE_FILES[net]
    where = "no path is configured" if weights_path is None else f"{weights_path} does not exist"
    return (
        f"LPIPS ({net}) needs the ImageNet backbone weights {name}, but {where}. Nothing is "
        f"downloaded at run time. On a machine with internet, fetch "
        f"https://download.pytorch.org/models/{name} (or run "
        f"`torchvision.models.{_TORCHVISION_BUILDERS[net]}(weights='IMAGENET1K_V1')`, which "
        f"caches it in ~/.cache/torch/hub/checkpoints/{name}), copy it here and set "
        f"{config_key}=/path/to/{name}."
    )


def _backbone_state_dict(lpips_backbone: nn.Module, tv_state: dict[str, Tensor]) -> dict:
    """Map a torchvision state dict onto the `sliceK.<index>` layout of lpips' backbone.

    lpips splits torchvision's `features` Sequential into slices but keeps each layer's original
    index as its name (slice2 holds `features.3` as `slice2.3`), so the mapping is by index.
    """
    features = {k.removeprefix("features."): v for k, v in tv_state.items()}
    mapped = {}
    for key in lpips_backbone.state_dict():
        _, rest = key.split(".", 1)  # "slice2.3.weight" -> "3.weight"
        if rest not in features:
            raise KeyError(f"backbone weights have no entry for features.{rest}")
        mapped[key] = features[rest]
    return mapped


def load_lpips_network(
    net: str = "alex",
    weights_path: str | None = None,
    random_init: bool = False,
    config_key: str = "eval.lpips_weights",
) -> nn.Module:
    """Build an `lpips.LPIPS` module without any network access.

    The packaged linear heads (v0.1) are always loaded. The backbone comes from `weights_path`
    (a torchvision ImageNet state dict, see `LPIPS_BACKBONE_FILES`, or a whole `lpips.LPIPS`
    state dict with `net.sliceK.*` keys), or is random when `random_init=True` — that only
    exercises code paths and is not a perceptual metric.

    Raises:
        FileNotFoundError: no weights and not random_init; the message names the file expected,
            where to get it and `config_key`, the setting to point at it.
    """
    import lpips

    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    if not random_init and (weights_path is None or not Path(weights_path).is_file()):
        raise FileNotFoundError(_missing_lpips_weights(net, weights_path, config_key))
    # pnet_rand=True keeps lpips from fetching the backbone; the real weights are loaded below.
    # torchvision warns about lpips' use of its deprecated `pretrained` argument: not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if not random_init:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if any(k.startswith("net.slice") for k in state):
            # A whole lpips.LPIPS state dict (backbone and heads), e.g. saved from a trained one.
            model.load_state_dict(state, strict=True)
        else:
            model.net.load_state_dict(_backbone_state_dict(model.net, state), strict=True)
    model.eval().requires_grad_(False)
    return model


class LPIPSMetric(nn.Module):
    """Per-frame LPIPS distance (lower = more similar) for videos in [-1, 1].

    `LPIPSMetric(net="alex", weights_path="/path/alexnet-owt-7be5be79.pth")` is the real metric
    (AlexNet is the variant the LPIPS authors recommend for evaluation). Without weights a
    FileNotFoundError says which file to provide and to set `eval.lpips_weights`.
    `random_init=True` uses a random backbone with the packaged linear heads: for tests only,
    its numbers mean nothing.
    """

    def __init__(
        self,
        net: str = "alex",
        weights_path: str | None = None,
        random_init: bool = False,
        frames_per_chunk: int = 64,
    ) -> None:
        super().__init__()
        self.net_name = net
        self.random_init = random_init
        self.frames_per_chunk = frames_per_chunk
        self.lpips = load_lpips_network(net, weights_path, random_init)

    def train(self, mode: bool = True) -> LPIPSMetric:
        # The metric has dropout in its heads: it must stay in eval mode whatever the parent does.
        return super().train(False)

    @torch.no_grad()
    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        reduction: Reduction = "mean",
        mask: Tensor | None = None,
    ) -> Tensor:
        """LPIPS per frame; `reduction` and `mask` as in `psnr`. Grayscale is repeated to RGB."""
        pred_f, target_f, lead = _as_frames(pred, target)
        if pred_f.shape[1] == 1:
            pred_f, target_f = pred_f.expand(-1, 3, -1, -1), target_f.expand(-1, 3, -1, -1)
        values = torch.cat(
            [
                self.lpips(p, t).flatten()  # (n, 1, 1, 1) -> (n,)
                for p, t in zip(
                    pred_f.split(self.frames_per_chunk), target_f.split(self.frames_per_chunk)
                )
            ]
        )
        return _reduce(values.reshape(lead), reduction, mask)


# --------------------------------------------------------------------------------------------
# Codebooks, controllability and agreement of latent actions with true actions
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage statistics of code indices (any shape; negative entries are ignored).

    Returns 0-d float tensors:
        usage: fraction of the codebook used at least once.
        dead_fraction: 1 - usage.
        entropy_bits: entropy of the empirical code distribution, in bits (max log2(K)).
        perplexity: 2**entropy_bits, the effective number of codes (1..K).
    """
    flat = indices.detach().flatten().long()
    flat = flat[flat >= 0]
    if flat.numel() and int(flat.max()) >= codebook_size:
        raise ValueError(f"index {int(flat.max())} out of range for codebook of {codebook_size}")
    counts = torch.bincount(flat, minlength=codebook_size).double()  # (K,)
    total = counts.sum().clamp_min(1.0)
    probs = counts / total
    nonzero = probs[probs > 0]
    entropy_bits = -(nonzero * torch.log2(nonzero)).sum()
    usage = (counts > 0).double().mean()
    return {
        "usage": usage.float(),
        "perplexity": torch.exp2(entropy_bits).float(),
        "dead_fraction": (1.0 - usage).float(),
        "entropy_bits": entropy_bits.float(),
    }


def delta_psnr(psnr_inferred: Tensor, psnr_random: Tensor) -> dict[str, Tensor | int]:
    """Genie's controllability metric ΔtPSNR with its standard error.

    ΔtPSNR = PSNR(x_t, x̂_t) - PSNR(x_t, x̂'_t), where x̂ is generated with the inferred (or true)
    actions and x̂' with random actions from the same context. The difference is taken per clip
    (the two rollouts share a clip, so it is a paired comparison), then averaged over clips.

    Args:
        psnr_inferred, psnr_random: (N, T) per-clip PSNR at each horizon t.
    Returns:
        mean: (T,) mean difference per horizon; stderr: (T,) sample std (ddof 1) / sqrt(N),
        nan when N < 2; n: N, the number of clips.
    """
    inferred = torch.as_tensor(psnr_inferred, dtype=torch.float64)
    random = torch.as_tensor(psnr_random, dtype=torch.float64)
    if inferred.shape != random.shape or inferred.ndim != 2:
        raise ValueError(f"need two (N, T) arrays, got {inferred.shape} and {random.shape}")
    diff = inferred - random  # (N, T)
    n = diff.shape[0]
    if n >= 2:
        stderr = diff.std(dim=0, unbiased=True) / math.sqrt(n)
    else:
        stderr = torch.full(diff.shape[1:], float("nan"), dtype=torch.float64)
    return {"mean": diff.mean(dim=0), "stderr": stderr, "n": n}


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


def action_agreement(confusion: Tensor) -> float:
    """Fraction of samples whose latent code is the most frequent code of their true action."""
    confusion = torch.as_tensor(confusion)
    total = confusion.sum()
    if total == 0:
        raise ValueError("empty confusion matrix")
    return float(confusion.max(dim=1).values.sum() / total)


@torch.no_grad()
def rollout_psnr_vs_horizon(
    pred: Tensor, target: Tensor, data_range: float = 2.0, mask: Tensor | None = None
) -> Tensor:
    """Mean PSNR over the batch at each frame index, (T,): the error growth of a rollout.

    Slice the context frames off before calling if they should not count as horizon 0. With a
    (B, T) mask, each horizon averages over the clips whose frame is real (nan if none is).
    """
    values = psnr(pred, target, data_range=data_range, reduction="none")  # (B, T)
    if values.ndim != 2:
        raise ValueError("rollout_psnr_vs_horizon needs videos (B, C, T, H, W)")
    if mask is None:
        return values.mean(dim=0)
    weights = mask.to(values.device, values.dtype)
    return (values * weights).sum(dim=0) / weights.sum(dim=0)  # (T,), nan where no real frame
