"""One adapter over `vector-quantize-pytorch` so every model sees the same quantizer interface.

`build_quantizer(kind, dim, **kwargs)` returns a `Quantizer` whose `forward(z)` takes channel-first
latents z (B, D, ...) and returns `(codes, indices, aux_loss, stats)`:

- codes: same shape as z, the quantized latents (straight-through / rotation-trick gradients);
- indices: (B, ...) long, one integer per latent position, in [0, codebook_size);
- aux_loss: scalar, the quantizer's own loss (commitment, entropy, KL) already weighted, 0 for FSQ;
- stats: `perplexity` (exp of the entropy of the code histogram of the batch) and `usage`
  (fraction of the codebook used in the batch), both detached scalars.

Kinds: `fsq` (levels), `lfq` (codebook_size = 2^bits), `vq` (EMA codebook, k-means init, dead-code
restart, rotation trick), `rvq` (residual VQ; its per-level indices are folded into one integer
sum_q i_q * K^q so the interface stays one index per position; `codebook_size` is K^Q),
`gumbel` (DALL-E dVAE: logits over a learned codebook, Gumbel-softmax relaxation in training,
argmax codes in eval; see `GumbelQuantize`).

Quantization always runs in fp32 with autocast disabled: the library only switches off CUDA
autocast, and bf16 distances or roundings on the CPU would pick wrong codes.

EMA codebooks (`vq`, `rvq`) built inside a process group of several ranks (a DDP run) all-reduce
their statistics in every training forward: code counts and sums, k-means init and dead-code
restarts are computed over all ranks' latents, so every rank updates the same codebook from
the whole global batch, and no buffer needs to be broadcast. Every rank must therefore run the
same quantizer calls (the loop's steps and validations run on all ranks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import pack, rearrange, unpack
from torch import Tensor, nn
from torch.nn import functional as F
from vector_quantize_pytorch import FSQ, LFQ, ResidualVQ, VectorQuantize

KINDS = ("fsq", "lfq", "vq", "rvq", "gumbel")

# Keyword arguments each kind accepts (besides `dim`); anything else is a config typo.
_ALLOWED = {
    "fsq": {"levels"},
    "lfq": {
        "codebook_size",
        "entropy_loss_weight",
        "commitment_loss_weight",
        "diversity_gamma",
        "frac_per_sample_entropy",
    },
    "vq": {
        "codebook_size",
        "codebook_dim",
        "decay",
        "kmeans_init",
        "kmeans_iters",
        "threshold_ema_dead_code",
        "rotation_trick",
        "commitment_weight",
        "use_cosine_sim",
    },
    "rvq": {
        "codebook_size",
        "codebook_dim",
        "num_quantizers",
        "decay",
        "kmeans_init",
        "kmeans_iters",
        "threshold_ema_dead_code",
        "rotation_trick",
        "commitment_weight",
        "use_cosine_sim",
    },
    "gumbel": {
        "codebook_size",
        "tau_start",
        "tau_end",
        "tau_anneal_steps",
        "kl_weight",
        "straight_through",
    },
}


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ValueError(f"quantizer config key '{key}': {message}")


def _in_process_group() -> bool:
    """True when built inside a process group of several ranks (a DDP run)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Quantizer(nn.Module):
    """Uniform wrapper: channel-first latents in, (codes, indices, aux_loss, stats) out."""

    def __init__(self, kind: str, dim: int, impl: nn.Module, codebook_size: int, **info: Any):
        super().__init__()
        self.kind = kind
        self.dim = dim
        self.impl = impl
        self.codebook_size = int(codebook_size)
        # rvq only: size of each level's codebook and number of levels (for index folding).
        self.level_size = int(info.get("level_size", codebook_size))
        self.num_levels = int(info.get("num_levels", 1))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dim={self.dim}, codebook_size={self.codebook_size}"

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        if z.shape[1] != self.dim:
            raise ValueError(f"quantizer expects {self.dim} channels, got shape {tuple(z.shape)}")
        x = rearrange(z, "b d ... -> b ... d")
        x, ps = pack([x], "b * d")  # (B, N, D)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = x.float()
            if self.kind == "fsq":
                q, idx = self.impl(x)
                aux = x.new_zeros(())
            elif self.kind in ("lfq", "vq", "gumbel"):
                q, idx, aux = self.impl(x)
            else:  # rvq: idx (B, N, Q), aux (Q,) or (1, Q)
                q, idx, aux = self.impl(x)
                aux = aux.sum()
            level_idx = idx.long()
            if self.kind == "rvq":
                idx = self._fold(level_idx)
                stats = _code_stats(level_idx, self.level_size)
            else:
                idx = level_idx
                stats = _code_stats(idx, self.codebook_size)
        codes = rearrange(unpack(q, ps, "b * d")[0], "b ... d -> b d ...").to(z.dtype)
        indices = unpack(idx, ps, "b *")[0]  # (B, ...)
        return codes, indices, aux.reshape(()), stats

    @torch.no_grad()
    def _fold(self, level_idx: Tensor) -> Tensor:
        """(B, N, Q) per-level indices -> (B, N) one integer sum_q i_q * K^q."""
        base = self.level_size ** torch.arange(self.num_levels, device=level_idx.device)
        return (level_idx * base).sum(-1)

    def _unfold(self, idx: Tensor) -> Tensor:
        """(B, N) -> (B, N, Q) per-level indices."""
        base = self.level_size ** torch.arange(self.num_levels, device=idx.device)
        return (idx.unsqueeze(-1) // base) % self.level_size

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, ...) long -> codes (B, D, ...) (fp32)."""
        idx, ps = pack([indices.long()], "b *")  # (B, N)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            if self.kind in ("fsq", "lfq", "gumbel"):
                q = self.impl.indices_to_codes(idx)
            elif self.kind == "vq":
                q = self.impl.get_output_from_indices(idx)
            else:
                q = self.impl.get_output_from_indices(self._unfold(idx))
        q = unpack(q.float(), ps, "b * d")[0]  # (B, ..., D)
        return rearrange(q, "b ... d -> b d ...")


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantization as in DALL-E's dVAE (Ramesh et al. 2021), over (B, N, D).

    A 1x1 projection (a linear map per position) turns each D-channel latent into logits over
    `codebook_size` codes. In training the code is a relaxed one-hot sample
    `gumbel_softmax(logits, tau, hard=straight_through)` times the learned codebook
    (codebook_size x D): the gradient reaches the encoder through the soft sample (with
    `straight_through` the forward value is the hard one-hot, the backward the soft one). In
    eval the code is the codebook row of the argmax logit, so `indices_to_codes(indices)` gives
    exactly the quantized output.

    The auxiliary loss is `kl_weight` * KL(q(z|x) || uniform) = sum_k q_k log(K q_k), the mean
    over positions: 0 when the logits are flat, up to log K when they are one-hot.

    The temperature follows a cosine schedule (DALL-E's) from `tau_start` at step 0 to `tau_end`
    at `tau_anneal_steps`, then stays there. The step is a buffer counting training forwards
    that have gradients on (the forwards that train; eval-mode validation and the no-grad
    recomputation of a reconstruction leave it alone): it needs no change in any tokenizer's
    `loss`, and it is saved with the model's weights, so a resumed run goes on at the same
    temperature. With `trainer.grad_accum` > 1 it counts micro-batches, so the anneal spans
    `tau_anneal_steps / grad_accum` optimizer steps.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        tau_start: float = 1.0,
        tau_end: float = 1.0 / 16,
        tau_anneal_steps: int = 0,
        kl_weight: float = 0.0,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.tau_anneal_steps = int(tau_anneal_steps)
        self.kl_weight = float(kl_weight)
        self.straight_through = bool(straight_through)
        self.proj = nn.Linear(dim, codebook_size)  # the 1x1 conv to logits
        self.codebook = nn.Embedding(codebook_size, dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"tau {self.tau_start} -> {self.tau_end} over {self.tau_anneal_steps} steps (cosine), "
            f"kl_weight={self.kl_weight}, straight_through={self.straight_through}"
        )

    def tau(self, step: int | None = None) -> float:
        """The temperature at `step` (by default the current one)."""
        step = int(self.step) if step is None else int(step)
        if self.tau_anneal_steps <= 0:
            return self.tau_end
        frac = min(step / self.tau_anneal_steps, 1.0)
        return self.tau_end + 0.5 * (self.tau_start - self.tau_end) * (1 + math.cos(math.pi * frac))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, D) fp32 -> (codes (B, N, D), indices (B, N), weighted KL scalar)."""
        logits = self.proj(x)  # (B, N, K)
        log_q = F.log_softmax(logits, dim=-1)  # (B, N, K)
        kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(-1).mean()
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.tau(), hard=self.straight_through)
            indices = one_hot.argmax(-1)  # (B, N): the sampled code
            codes = one_hot @ self.codebook.weight  # (B, N, D)
            if torch.is_grad_enabled():
                self.step.add_(1)
        else:
            indices = logits.argmax(-1)  # (B, N)
            codes = self.codebook(indices)  # (B, N, D)
        return codes, indices, self.kl_weight * kl

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, N) long -> codes (B, N, D)."""
        return self.codebook(indices)


@torch.no_grad()
def _code_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage and perplexity of the batch's code histogram; for (..., Q) indices, mean over Q."""
    if indices.ndim == 3:  # rvq (B, N, Q): one histogram per level
        per = [_code_stats(indices[..., q], codebook_size) for q in range(indices.shape[-1])]
        return {k: torch.stack([p[k] for p in per]).mean() for k in per[0]}
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {
        "perplexity": entropy.exp(),
        "usage": (counts > 0).float().mean(),
    }


def build_quantizer(kind: str, dim: int, **kwargs: Any) -> Quantizer:
    """Build a `Quantizer`; raises ValueError naming the offending config key."""
    _require(kind in KINDS, "kind", f"unknown quantizer '{kind}', expected one of {KINDS}")
    _require(_is_int(dim) and dim >= 1, "dim", f"must be a positive int, got {dim!r}")
    unknown = sorted(set(kwargs) - _ALLOWED[kind])
    _require(not unknown, unknown[0] if unknown else "", f"not accepted by kind '{kind}'")

    if kind == "fsq":
        levels = kwargs.get("levels")
        _require(
            isinstance(levels, (list, tuple)) and len(levels) > 0,
            "levels",
            f"fsq needs a non-empty list of levels, got {levels!r}",
        )
        _require(
            all(_is_int(level) and level >= 3 for level in levels),
            "levels",
            f"each fsq level must be an int >= 3 (use kind=lfq for binary codes), got {levels!r}",
        )
        impl = FSQ(levels=list(levels), dim=dim)
        return Quantizer(kind, dim, impl, math.prod(levels))

    size = kwargs.get("codebook_size")
    _require(_is_int(size) and size >= 2, "codebook_size", f"must be an int >= 2, got {size!r}")

    if kind == "gumbel":
        return Quantizer(kind, dim, _build_gumbel(dim, size, kwargs), size)

    if kind == "lfq":
        _require(
            size & (size - 1) == 0,
            "codebook_size",
            f"lfq needs a power of 2, got {size} (nearest: {2 ** round(math.log2(size))})",
        )
        # the entropy loss builds a (tokens x codebook_size) matrix: 2^16 codes x 8k tokens = 2 GB
        _require(size <= 2**16, "codebook_size", f"lfq supports <= 2^16 codes here, got {size}")
        impl = LFQ(
            dim=dim,
            codebook_size=size,
            entropy_loss_weight=float(kwargs.get("entropy_loss_weight", 0.1)),
            commitment_loss_weight=float(kwargs.get("commitment_loss_weight", 0.25)),
            diversity_gamma=float(kwargs.get("diversity_gamma", 1.0)),
            frac_per_sample_entropy=float(kwargs.get("frac_per_sample_entropy", 1.0)),
        )
        return Quantizer(kind, dim, impl, size)

    codebook_dim = kwargs.get("codebook_dim", dim)
    _require(
        _is_int(codebook_dim) and codebook_dim >= 1,
        "codebook_dim",
        f"must be a positive int, got {codebook_dim!r}",
    )
    decay = float(kwargs.get("decay", 0.99))
    _require(0.0 < decay < 1.0, "decay", f"EMA decay must be in (0, 1), got {decay}")
    vq_kwargs = dict(
        decay=decay,
        kmeans_init=bool(kwargs.get("kmeans_init", True)),
        kmeans_iters=int(kwargs.get("kmeans_iters", 10)),
        threshold_ema_dead_code=float(kwargs.get("threshold_ema_dead_code", 2)),
        rotation_trick=bool(kwargs.get("rotation_trick", True)),
        commitment_weight=float(kwargs.get("commitment_weight", 0.25)),
        use_cosine_sim=bool(kwargs.get("use_cosine_sim", False)),
        sync_codebook=_in_process_group(),
    )
    if kind == "vq":
        impl = VectorQuantize(dim=dim, codebook_size=size, codebook_dim=codebook_dim, **vq_kwargs)
        return Quantizer(kind, dim, impl, size)

    levels = kwargs.get("num_quantizers", 2)
    _require(_is_int(levels) and levels >= 1, "num_quantizers", f"must be >= 1, got {levels!r}")
    _require(
        size**levels < 2**62,
        "num_quantizers",
        f"codebook_size^num_quantizers = {size}^{levels} does not fit one int64 index",
    )
    impl = ResidualVQ(
        dim=dim, codebook_size=size, codebook_dim=codebook_dim, num_quantizers=levels, **vq_kwargs
    )
    return Quantizer(kind, dim, impl, size**levels, level_size=size, num_levels=levels)


def _build_gumbel(dim: int, size: int, kwargs: dict[str, Any]) -> GumbelQuantize:
    """A `GumbelQuantize` from its config keys, each checked (see `_ALLOWED["gumbel"]`)."""
    taus = {}
    for key, default in (("tau_start", 1.0), ("tau_end", 1.0 / 16)):
        value = kwargs.get(key, default)
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            key,
            f"the Gumbel-softmax temperature must be a number > 0, got {value!r}",
        )
        taus[key] = float(value)
    steps = kwargs.get("tau_anneal_steps", 0)
    _require(
        _is_int(steps) and steps >= 0, "tau_anneal_steps", f"must be an int >= 0, got {steps!r}"
    )
    kl_weight = kwargs.get("kl_weight", 0.0)
    _require(
        isinstance(kl_weight, (int, float)) and not isinstance(kl_weight, bool) and kl_weight >= 0,
        "kl_weight",
        f"must be a number >= 0, got {kl_weight!r}",
    )
    hard = kwargs.get("straight_through", False)
    _require(isinstance(hard, bool), "straight_through", f"must be true or false, got {hard!r}")
    return GumbelQuantize(
        dim, size, tau_anneal_steps=steps, kl_weight=float(kl_weight), straight_through=hard, **taus
    )
