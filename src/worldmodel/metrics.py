"""Frame and codebook metrics shared by training and evaluation: PSNR, SSIM, LPIPS, code usage.

This is the one implementation of each: models log `psnr` / `lpips` / `codebook/...` with it
during training and `worldmodel.eval.metrics` re-exports it for evaluation, so a number in a
training log and one in eval.json mean the same thing. It sits below every other package (only
torch and the standard library; `lpips` is imported when an LPIPS network is built).

Conventions:

- Videos are (B, C, T, H, W) float tensors in [-1, 1]; a (B, C, H, W) tensor is read as single
  frames. Per-frame values come out as (B, T) for videos and (B,) for frames.
- One clamping rule: both inputs are clamped to [-1, 1] (the range frames are shown in) before
  any error is measured, so a decoder that overshoots is scored on what would be displayed.
  PSNR is then 10 * log10(2**2 / MSE), with the MSE floored at `MSE_FLOOR`.
- `reduction="mean"` averages the per-frame values (optionally over the frames where `mask` is
  True); `psnr_from_mse` of a pooled MSE is the other aggregate (see `eval.metrics.pooled_psnr`).
- Metrics run without autograd and in float32; their results are detached.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["mean", "none"]

# Peak-to-peak range of frames in [-1, 1].
DATA_RANGE = 2.0
# Floor on the per-frame MSE: identical frames then score a finite 10*log10(4 / 1e-10) ~ 106 dB
# instead of inf, so a single perfect frame cannot turn a mean into inf.
MSE_FLOOR = 1e-10


def _as_frames(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Flatten videos (B, C, T, H, W) or frames (B, C, H, W) into frames (N, C, H, W), clamped
    to [-1, 1] in float32, and the leading shape the per-frame values fold back into."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.ndim == 5:
        b, c, t, h, w = pred.shape
        lead: tuple[int, ...] = (b, t)
        pred = pred.transpose(1, 2).reshape(b * t, c, h, w)  # (B T) C H W
        target = target.transpose(1, 2).reshape(b * t, c, h, w)
    elif pred.ndim == 4:
        lead = (pred.shape[0],)
    else:
        raise ValueError(f"expected (B, C, T, H, W) or (B, C, H, W), got {tuple(pred.shape)}")
    return pred.float().clamp(-1.0, 1.0), target.float().clamp(-1.0, 1.0), lead


def _reduce(values: Tensor, reduction: Reduction, mask: Tensor | None) -> Tensor:
    """Reduce per-frame values (B, T) or (B,) to their mean over (masked) frames, or keep them."""
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


# --------------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def frame_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each frame, (B, T) for videos or (B,) for frames, after clamping
    both inputs to [-1, 1]."""
    pred_f, target_f, lead = _as_frames(pred, target)
    return (pred_f - target_f).pow(2).mean(dim=(1, 2, 3)).reshape(lead)


def psnr_from_mse(mse: Tensor | float) -> Tensor:
    """PSNR in dB of a mean squared error (any shape) of frames in [-1, 1]: 10*log10(4 / MSE),
    with the MSE floored at `MSE_FLOOR`."""
    mse = torch.as_tensor(mse).detach().float()
    return 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(MSE_FLOOR))


@torch.no_grad()
def psnr(
    pred: Tensor,
    target: Tensor,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Peak signal-to-noise ratio in dB of each frame, then averaged.

    `mean` is the mean over frames of the per-frame PSNR (the convention of video papers). Mind
    that a frame the model gets exactly right scores ~106 dB (the MSE floor), so frames that do
    not change make "copy the previous frame" look good; to compare against such baselines use
    the PSNR of the pooled MSE on changing frames (`eval.metrics.pooled_psnr`).

    Args:
        pred, target: (B, C, T, H, W) videos or (B, C, H, W) frames in [-1, 1] (clamped there).
        reduction: "mean" -> scalar; "none" -> (B, T) for videos, (B,) for frames.
        mask: optional (B, T) (or (B,)) bool, True = real frame; only those enter the mean.
    """
    return _reduce(psnr_from_mse(frame_mse(pred, target)), reduction, mask)


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> Tensor:
    """Separable Gaussian window (C, 1, size, size) for a depthwise convolution."""
    dist = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (dist / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


@torch.no_grad()
def ssim(
    pred: Tensor,
    target: Tensor,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Structural similarity of each frame (Gaussian 11x11 window, sigma 1.5), then averaged.

    Frames are clamped to [-1, 1] and mapped to [0, 1], then scored with data range 1 and the
    usual constants (K1 0.01, K2 0.03) at every pixel, the frame reflect-padded by 5 pixels (the
    same numbers as torchmetrics' `structural_similarity_index_measure`, which this module used
    before). Reduction and mask work as in `psnr`. Frames must be at least 11 pixels on each side.
    """
    size, sigma, c1, c2 = 11, 1.5, 0.01**2, 0.03**2
    pred_f, target_f, lead = _as_frames(pred, target)
    if min(pred_f.shape[-2:]) < size:
        raise ValueError(f"SSIM needs frames of at least {size}x{size}, got {pred_f.shape[-2:]}")
    x, y = (pred_f + 1.0) / 2.0, (target_f + 1.0) / 2.0  # (N, C, H, W) in [0, 1]
    n, channels = x.shape[:2]
    window = _gaussian_window(size, sigma, channels, x.device)
    stacked = F.pad(torch.cat([x, y, x * x, y * y, x * y]), (size // 2,) * 4, mode="reflect")
    stats = F.conv2d(stacked, window, groups=channels)
    mu_x, mu_y, xx, yy, xy = stats.split(n)  # each (N, C, H, W)
    var_x = (xx - mu_x**2).clamp_min(0.0)
    var_y = (yy - mu_y**2).clamp_min(0.0)
    cov = xy - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return _reduce(index.flatten(1).mean(1).reshape(lead), reduction, mask)


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


def load_lpips_weights(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load weights into an `lpips.LPIPS` module, strictly.

    `state` is either a whole `lpips.LPIPS` state dict (keys `net.sliceK.*`, `linK.*`, e.g. saved
    from a built one) or a torchvision ImageNet state dict of the backbone (keys `features.N.*`;
    other keys such as the classifier are ignored). lpips splits torchvision's `features`
    Sequential into slices but keeps each layer's index as its name (slice2 holds `features.3`
    as `slice2.3`), so the mapping is by index.

    Raises:
        KeyError: the backbone needs a `features.N.*` entry the file does not have.
        RuntimeError: a whole state dict with missing or unexpected keys (strict load).
    """
    if any(k.startswith("net.slice") for k in state):
        model.load_state_dict(state, strict=True)
        return
    features = {k.removeprefix("features."): v for k, v in state.items()}
    mapped = {}
    for key in model.net.state_dict():
        _, rest = key.split(".", 1)  # "slice2.3.weight" -> "3.weight"
        if rest not in features:
            raise KeyError(
                f"LPIPS backbone weights have no entry for features.{rest} (expected a "
                f"torchvision state dict with `features.N.*` keys or an lpips.LPIPS state dict)"
            )
        mapped[key] = features[rest]
    model.net.load_state_dict(mapped, strict=True)


def load_lpips_network(
    net: str = "alex",
    weights_path: str | None = None,
    random_init: bool = False,
    config_key: str = "eval.lpips_weights",
) -> nn.Module:
    """Build a frozen `lpips.LPIPS` module (eval mode, no parameter gradients) without any
    network access.

    The packaged linear heads (v0.1) are always loaded. The backbone comes from `weights_path`
    (see `load_lpips_weights` for the two accepted layouts), or is random when
    `random_init=True` -- that only exercises code paths and is not a perceptual metric.
    Gradients still flow to the inputs, so the module also serves as a loss.

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
        load_lpips_weights(model, torch.load(weights_path, map_location="cpu", weights_only=True))
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
        chunks = zip(pred_f.split(self.frames_per_chunk), target_f.split(self.frames_per_chunk))
        values = torch.cat([self.lpips(p, t).flatten() for p, t in chunks])  # (N,)
        return _reduce(values.reshape(lead), reduction, mask)


# --------------------------------------------------------------------------------------------
# Codebooks
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
    probs = counts / counts.sum().clamp_min(1.0)
    nonzero = probs[probs > 0]
    entropy_bits = -(nonzero * torch.log2(nonzero)).sum()
    usage = (counts > 0).double().mean()
    return {
        "usage": usage.float(),
        "perplexity": torch.exp2(entropy_bits).float(),
        "dead_fraction": (1.0 - usage).float(),
        "entropy_bits": entropy_bits.float(),
    }


# --------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------


class RunningMeans:
    """Running weighted means of named scalars over batches.

    `add("psnr", batch_mean, n)` adds a batch's mean with weight n (its number of clips, or of
    frames: whatever the mean was taken over), so `result()` is the mean over all of them, not
    the mean of batch means. A name never added is absent from the result; a nan added stays
    visible as a nan mean.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value: Tensor | float, n: int | float = 1) -> None:
        if n <= 0:
            return
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.counts[name] = self.counts.get(name, 0.0) + n

    def update(self, values: dict[str, Tensor | float], n: int | float = 1) -> None:
        """`add` every entry of a metrics dict with the same weight."""
        for name, value in values.items():
            self.add(name, value, n)

    def result(self) -> dict[str, float]:
        return {k: s / self.counts[k] for k, s in self.sums.items()}
