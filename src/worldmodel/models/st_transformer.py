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

Options that buy sample efficiency on a CPU budget (measured on a toy "object moved by the
action" task: with all three a 4-layer d=64 model learns the control in ~300-400 steps; with
Genie's plain additive actions and absolute positions alone it had not after 1500):
- `local_conv`: a depthwise 3x3 conv over each frame's token grid at the start of every block;
- `rel_pos_bias`: a learned relative-position bias in spatial attention;
- `cond_mode="adaln"`: the per-frame conditioning (an action) also modulates every pre-norm.
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
    """Temporal-attention keys/values of the frames already encoded, one buffer per block.

    Buffers are allocated once, (B*N, heads, max_frames, D/heads), so that decoding a frame
    several times (MaskGIT steps) writes its keys/values into the slot after the `length`
    committed frames instead of concatenating the whole past at every step. Only
    `STTransformer.forward(..., update_cache=True)` advances `length`.
    """

    def __init__(self, num_layers: int, max_frames: int) -> None:
        self.max_frames = max_frames
        self.length = 0
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (S, h, t, Dh) after the committed frames; return keys/values of frames
        0 .. length + t - 1 (views into the buffers)."""
        s, h, t, dh = k.shape
        end = self.length + t
        if end > self.max_frames:
            raise ValueError(f"KV cache holds {self.max_frames} frames, asked for {end}")
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_v is None:
            shape = (s, h, self.max_frames, dh)
            buf_k = self.keys[layer] = k.new_empty(shape)
            buf_v = self.values[layer] = v.new_empty(shape)
        elif buf_k.shape[:2] != (s, h) or buf_k.shape[3] != dh:
            raise ValueError(f"KV cache is for {tuple(buf_k.shape)}, got keys {tuple(k.shape)}")
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end].to(k.dtype), buf_v[:, :, :end].to(v.dtype)


def _cpu_bf16_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout: float
) -> Tensor:
    """Attention as two bf16 matmuls around an fp32 softmax, for bf16 autocast on the CPU.

    With torch 2.14 the CPU flash-attention kernels are slow in bf16 for these many short
    sequences (fwd+bwd measured 1.5-6x slower than this at L = 8..256, Dh = 32..64, one thread;
    and 1.2-2x slower even with fp32 inputs). Same result as `F.scaled_dot_product_attention`
    up to bf16 rounding; the fp32 path keeps using it.
    """
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (S, h, Lq, Lk)
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    attn = scores.softmax(dim=-1)
    if dropout > 0:
        attn = F.dropout(attn, dropout)
    return attn.to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of (S, L, D) sequences.

    With `cache`, this call's keys/values are written into entry `layer` after the Lp frames
    already cached, and the queries attend over all of them; with `causal`, query i (absolute
    position Lp + i) sees keys at positions <= Lp + i.
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
        cache: KVCache | None = None,
        layer: int = 0,
        bias: Tensor | None = None,
    ) -> Tensor:
        qkv = self.qkv(x)  # (S, L, 3 D)
        q, k, v = rearrange(qkv, "s l (three h d) -> three s h l d", three=3, h=self.heads)
        mask = None
        is_causal = causal
        if cache is not None:
            past = cache.length
            k, v = cache.write(layer, k, v)  # (S, h, past + L, Dh)
            if past > 0:
                is_causal = False
                if causal and q.shape[2] > 1:
                    # query i sits at absolute position past + i: it may see keys 0 .. past + i
                    qpos = torch.arange(q.shape[2], device=x.device)[:, None] + past
                    kpos = torch.arange(k.shape[2], device=x.device)[None, :]
                    mask = kpos <= qpos  # (L, past + L) bool, True = attend
        if bias is not None:
            # additive attention bias (heads, L, L); only used without past keys/values
            mask = bias[None]
        dropout = self.attn_dropout if self.training else 0.0
        is_causal = is_causal and q.shape[2] > 1
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            out = _cpu_bf16_attention(q, k, v, mask, is_causal, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout
            )
        out = rearrange(out, "s h l d -> s l (h d)")
        return self.proj_drop(self.proj(out))


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
        local_conv: bool = False,
        space: bool = True,
        time: bool = True,
    ) -> None:
        super().__init__()
        if (rel_pos_bias or local_conv) and grid is None:
            raise ValueError("rel_pos_bias and local_conv need the token grid (h, w)")
        # `space` / `time` False leave that attention out: over a single token (or a single
        # frame) attention is only a linear map, a third of a block's cost for nothing
        self.causal = causal
        self.grid = grid
        self.rel_bias = RelativePositionBias(grid, heads) if rel_pos_bias else None
        # depthwise 3x3 conv over each frame's token grid (CPVT's position generator): every
        # channel mixes the 8 neighbours with its own weights, so "what is left of me" is
        # available from the first step instead of being learned through attention
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if local_conv else None
        self.norm_space = nn.LayerNorm(dim) if space else None
        self.attn_space = Attention(dim, heads, qkv_bias, attn_dropout, dropout) if space else None
        self.norm_time = nn.LayerNorm(dim) if time else None
        self.attn_time = Attention(dim, heads, qkv_bias, attn_dropout, dropout) if time else None
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
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x: (B, T, N, D), cond: (B, T, D) or None -> (B, T, N, D). With `cache`, the temporal
        attention also reads the cached frames (this block's entry `layer`)."""
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

        if self.local_conv is not None:
            gh, gw = self.grid
            h = rearrange(x, "b t (gh gw) d -> (b t) d gh gw", gh=gh, gw=gw)
            x = x + rearrange(self.local_conv(h), "(b t) d gh gw -> b t (gh gw) d", b=b)
        if self.attn_space is not None and self.norm_space is not None:
            h = rearrange(norm(self.norm_space, x, 0), "b t n d -> (b t) n d")
            h = self.attn_space(h, bias=None if self.rel_bias is None else self.rel_bias())
            x = x + self.drop_path(rearrange(h, "(b t) n d -> b t n d", b=b))

        if self.attn_time is not None and self.norm_time is not None:
            h = rearrange(norm(self.norm_time, x, 1), "b t n d -> (b n) t d")
            h = self.attn_time(h, causal=self.causal, cache=cache, layer=layer)
            x = x + self.drop_path(rearrange(h, "(b n) t d -> b t n d", b=b))

        x = x + self.drop_path(self.mlp(norm(self.norm_mlp, x, 2)))
        return x


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
        local_conv: bool = False,
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
                local_conv=local_conv,
                space=num_tokens > 1,  # one token per frame: no spatial attention
                time=max_frames > 1,  # one frame: no temporal attention
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
        return KVCache(self.depth, self.max_frames)

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
            x = block(x, cond=cond, cache=cache, layer=i)
        if cache is not None and update_cache:
            cache.length += t
        return self.norm(x)
