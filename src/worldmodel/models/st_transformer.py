"""Space-time transformer: the one block shared by the LAM, the dynamics model and C-ViViT.

Tokens are laid out as (B, T, N, D): T frames of N tokens each. A block is

    x = x + SpatialAttention(norm(x))    # within each frame: N tokens attend to each other
    x = x + TemporalAttention(norm(x))   # per spatial position, causal across frames (<= t)
    x = x + MLP(norm(x))

so the cost is O(T N^2 + N T^2) instead of O((T N)^2) for full attention (Genie's ST-transformer).

Causal temporal attention makes incremental generation cheap: the keys/values of the temporal
attention of past frames never change once those frames are fixed, so a `KVCache` keeps them per
block. Running the stack on one new frame with the cache costs one frame of compute: spatial
attention over the new frame only, temporal attention of its N tokens over the cached keys/values
of frames 0..t-1 plus their own. Frame positions are absolute (learned temporal embedding), so a
cache is valid for one window; a caller sliding its window re-encodes it (see `DynamicsModel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import Tensor, nn


def init_weights(module: nn.Module) -> None:
    """Transformer initialisation: truncated normal (std 0.02) linear/embedding weights."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class KVCache:
    """Temporal-attention keys/values of the frames already encoded, one entry per block.

    Each entry is a pair (k, v) of shape (B*N, heads, L, D/heads), L = `length` frames cached.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def get(self, layer: int) -> tuple[Tensor, Tensor] | None:
        k, v = self.keys[layer], self.values[layer]
        return None if k is None or v is None else (k, v)

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = k.contiguous() if old_k is None else torch.cat([old_k, k], dim=2)
        self.values[layer] = v.contiguous() if old_v is None else torch.cat([old_v, v], dim=2)


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of (S, L, D) sequences.

    `past_kv` (keys/values of earlier positions, (S, heads, Lp, Dh)) is prepended to the keys and
    values; with `causal`, query i (absolute position Lp + i) sees keys at positions <= Lp + i.
    Returns the output and this call's own (k, v) so that the caller can cache them.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        qkv_bias: bool = False,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: Tensor,
        causal: bool = False,
        past_kv: tuple[Tensor, Tensor] | None = None,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        qkv = self.qkv(x)  # (S, L, 3 D)
        q, k, v = rearrange(qkv, "s l (three h d) -> three s h l d", three=3, h=self.heads)
        new_kv = (k, v)
        mask = None
        is_causal = causal
        if past_kv is not None and past_kv[0].shape[2] > 0:
            past = past_kv[0].shape[2]
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)  # (S, h, past + L, Dh)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
            is_causal = False
            if causal and q.shape[2] > 1:
                # query i sits at absolute position past + i: it may see keys 0 .. past + i
                qpos = torch.arange(q.shape[2], device=x.device)[:, None] + past
                kpos = torch.arange(k.shape[2], device=x.device)[None, :]
                mask = kpos <= qpos  # (L, past + L) bool, True = attend
        if bias is not None:
            # additive attention bias (heads, L, L); only used without past keys/values
            mask = bias.to(torch.float32)[None]
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32:
            # The CPU flash-attention kernels are slow in bf16 for these short sequences
            # (backward measured 1.5-10x slower than fp32 at L = 8..64, torch 2.14), and the
            # matmuls around them stay in bf16 under autocast anyway.
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and q.shape[2] > 1,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = rearrange(out.to(dtype), "s h l d -> s l (h d)")
        return self.proj_drop(self.proj(out)), new_kv


class RelativePositionBias(nn.Module):
    """Learned bias per head for each 2D offset between tokens of an (h, w) grid (Swin-style).

    It lets spatial attention pick "the token one to the left" directly, instead of learning such
    offsets from absolute position embeddings, which a small model on a CPU budget learns slowly.
    """

    def __init__(self, grid: tuple[int, int], heads: int) -> None:
        super().__init__()
        h, w = grid
        self.table = nn.Parameter(torch.zeros(heads, (2 * h - 1) * (2 * w - 1)))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)  # (N, N)
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> Tensor:
        return self.table[:, self.index]  # (heads, N, N)


COND_MODES = ("add", "add_every", "adaln")


class STBlock(nn.Module):
    """Pre-norm space-time block on (B, T, N, D): spatial attention, temporal attention, MLP.

    With `adaln`, a per-frame conditioning vector (B, T, D) sets a shift and scale of each of
    the three pre-norms (DiT's adaptive LayerNorm; zero-initialised, so the block starts as a
    plain one). Multiplicative conditioning lets an action select *which* neighbours attention
    reads from; an added embedding has to learn that conjunction in the MLPs, slowly.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        causal: bool = True,
        qkv_bias: bool = False,
        adaln: bool = False,
        grid: tuple[int, int] | None = None,
        rel_pos_bias: bool = False,
    ) -> None:
        super().__init__()
        if rel_pos_bias and grid is None:
            raise ValueError("rel_pos_bias needs the token grid (h, w)")
        self.causal = causal
        self.rel_bias = RelativePositionBias(grid, heads) if rel_pos_bias else None
        self.norm_space = nn.LayerNorm(dim)
        self.attn_space = Attention(dim, heads, qkv_bias, attn_dropout, dropout)
        self.norm_time = nn.LayerNorm(dim)
        self.attn_time = Attention(dim, heads, qkv_bias, attn_dropout, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.modulation = nn.Linear(dim, 6 * dim) if adaln else None

    def init_modulation(self) -> None:
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, T, N, D), cond: (B, T, D) or None -> (B, T, N, D), plus this call's temporal
        (k, v) for caching."""
        b = x.shape[0]
        if self.modulation is not None and cond is not None:
            mod = self.modulation(F.silu(cond))[:, :, None]  # (B, T, 1, 6 D)
            shifts_scales = mod.chunk(6, dim=-1)
        else:
            shifts_scales = None

        def norm(layer: nn.LayerNorm, x: Tensor, i: int) -> Tensor:
            h = layer(x)
            if shifts_scales is None:
                return h
            return h * (1 + shifts_scales[2 * i + 1]) + shifts_scales[2 * i]

        h = rearrange(norm(self.norm_space, x, 0), "b t n d -> (b t) n d")
        h, _ = self.attn_space(h, bias=None if self.rel_bias is None else self.rel_bias())
        x = x + self.drop_path(rearrange(h, "(b t) n d -> b t n d", b=b))

        h = rearrange(norm(self.norm_time, x, 1), "b t n d -> (b n) t d")
        h, kv = self.attn_time(h, causal=self.causal, past_kv=past_kv)
        x = x + self.drop_path(rearrange(h, "(b n) t d -> b t n d", b=b))

        x = x + self.drop_path(self.mlp(norm(self.norm_mlp, x, 2)))
        return x, kv


class STTransformer(nn.Module):
    """A stack of `STBlock`s with learned spatial and temporal position embeddings.

    `forward(x, cond)` takes tokens (B, T, N, D) and an optional per-frame conditioning (B, T, D)
    (e.g. an action embedding). `cond_mode`: "add" adds it to every token of its frame at the
    input; "add_every" also before every block; "adaln" adds it at the input and modulates every
    block's norms with it (see `STBlock`).
    `rel_pos_bias` (needs `grid`) adds a learned relative-position bias to spatial attention.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        num_tokens: int,
        max_frames: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        causal: bool = True,
        cond_mode: str = "add",
        qkv_bias: bool = False,
        grid: list[int] | tuple[int, int] | None = None,
        rel_pos_bias: bool = False,
    ) -> None:
        super().__init__()
        if cond_mode not in COND_MODES:
            raise ValueError(f"cond_mode={cond_mode!r}; choose one of {COND_MODES}")
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if grid[0] * grid[1] != num_tokens:
                raise ValueError(f"grid {grid} does not hold num_tokens={num_tokens}")
        self.dim = dim
        self.depth = depth
        self.num_tokens = num_tokens
        self.max_frames = max_frames
        self.causal = causal
        self.cond_mode = cond_mode
        self.pos_space = nn.Parameter(torch.zeros(num_tokens, dim))
        self.pos_time = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.trunc_normal_(self.pos_space, std=0.02)
        nn.init.trunc_normal_(self.pos_time, std=0.02)
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList(
            STBlock(
                dim,
                heads,
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=rate,
                causal=causal,
                qkv_bias=qkv_bias,
                adaln=cond_mode == "adaln",
                grid=grid,
                rel_pos_bias=rel_pos_bias,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)
        for block in self.blocks:
            block.init_modulation()

    def new_cache(self) -> KVCache:
        if not self.causal:
            raise ValueError("a KV cache needs causal temporal attention (causal=True)")
        return KVCache(self.depth)

    def forward(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        cache: KVCache | None = None,
        update_cache: bool = True,
    ) -> Tensor:
        """Tokens (B, T, N, D) -> (B, T, N, D).

        With `cache`, x holds the frames that follow the `cache.length` frames already cached
        (temporal positions cache.length .. cache.length + T - 1); their keys/values are appended
        to the cache when `update_cache` (pass False to re-run a frame several times, as MaskGIT
        decoding does, without committing it).
        """
        b, t, n, d = x.shape
        start = 0 if cache is None else cache.length
        if n != self.num_tokens or d != self.dim:
            raise ValueError(
                f"expected tokens (B, T, {self.num_tokens}, {self.dim}), got {tuple(x.shape)}"
            )
        if start + t > self.max_frames:
            raise ValueError(f"frames {start}..{start + t - 1} exceed max_frames={self.max_frames}")
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs causal temporal attention (causal=True)")
        if cond is not None and cond.shape != (b, t, d):
            raise ValueError(f"cond must be (B, T, D)=({b}, {t}, {d}), got {tuple(cond.shape)}")
        x = x + self.pos_space[None, None] + self.pos_time[None, start : start + t, None]
        if cond is not None:
            x = x + cond[:, :, None]  # (B, T, 1, D): broadcast over the frame's N tokens
        for i, block in enumerate(self.blocks):
            if cond is not None and self.cond_mode == "add_every" and i > 0:
                x = x + cond[:, :, None]
            past = None if cache is None else cache.get(i)
            x, (k, v) = block(x, cond=cond, past_kv=past)
            if cache is not None and update_cache:
                cache.append(i, k, v)
        return self.norm(x)
