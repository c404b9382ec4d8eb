"""Input checks shared by the world models: token / code ids, action ids and sets, latents.

Every world model validates what it is given before any work and raises ValueError naming the
offending values; these helpers keep those checks (and their messages) the same in every model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_id_dtype(tokens: Tensor, name: str, kind: str = "token") -> None:
    """Ids must be int64 or int32 (`kind` names them in the message: token or code ids)."""
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be integer {kind} ids, got {tokens.dtype}")


def check_id_range(values: Tensor, name: str, size: int) -> None:
    """Ids must lie in [0, size); an empty tensor passes."""
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} ids must be in [0, {size}), got min {lo}, max {hi}")


def check_token_ids(
    tokens: Tensor,
    name: str,
    grid: tuple[int, int],
    vocab_size: int,
    valid: Tensor | None = None,
) -> None:
    """Token ids (B, T, h, w) of `grid`, in [0, vocab_size) on the frames `valid` (B, T) keeps."""
    if tokens.dim() != 4:
        raise ValueError(f"{name} must be (B, T, h, w), got shape {tuple(tokens.shape)}")
    if tuple(tokens.shape[2:]) != grid:
        raise ValueError(
            f"{name} grid {tuple(tokens.shape[2:])} does not match the model's grid {grid} (h, w)"
        )
    check_id_dtype(tokens, name)
    check_id_range(tokens if valid is None else tokens[valid], name, vocab_size)


def check_code_ids(tokens: Tensor, name: str, grid: tuple[int, int], codebook_size: int) -> None:
    """Codes (B, T, h, w) of `grid`, ids in [0, codebook_size)."""
    if tokens.dim() != 4 or tuple(tokens.shape[2:]) != grid:
        raise ValueError(
            f"{name} must be (B, T, h, w) with (h, w) = {grid}, got {tuple(tokens.shape)}"
        )
    check_id_dtype(tokens, name, "code")
    check_id_range(tokens, name, codebook_size)


def check_latents(latents: Tensor, grid: tuple[int, int], latent_dim: int) -> None:
    """Latents (B, T, h, w, D) of `grid` and `latent_dim`, floating point."""
    want = (*grid, latent_dim)
    if latents.dim() != 5 or tuple(latents.shape[2:]) != want:
        raise ValueError(
            f"latents must be (B, T, h, w, D) with (h, w, D) = {want}, got {tuple(latents.shape)}"
        )
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")


def check_action_ids(actions: Tensor, num_actions: int, valid: Tensor | None = None) -> None:
    """Actions that condition a frame must lie in [0, num_actions); `valid` masks the rest."""
    used = actions if valid is None else actions[valid]
    bad = (used < 0) | (used >= num_actions)
    if bool(bad.any()):
        values = sorted(set(used[bad].tolist()))[:10]
        raise ValueError(
            f"actions must be in [0, {num_actions}) (num_actions={num_actions}), got {values}"
        )


def action_sets(actions: Tensor, num_actions: int, length: int | None = None) -> Tensor:
    """Actions as multi-hot sets (B, T, A) float, from ids (B, T) or sets (B, T, A).

    Ids must be in [0, num_actions); sets must hold only 0 and 1. `length` cuts to T frames.
    """
    if length is not None:
        actions = actions[:, :length]
    if actions.dim() == 2:
        if actions.is_floating_point() or actions.dtype == torch.bool:
            raise ValueError(f"action ids (B, T) must be integers, got {actions.dtype}")
        bad = (actions < 0) | (actions >= num_actions)
        if bool(bad.any()):
            values = sorted(set(actions[bad].tolist()))[:10]
            raise ValueError(
                f"action ids must be in [0, {num_actions}) (num_actions={num_actions}), "
                f"got {values}"
            )
        return F.one_hot(actions.long(), num_actions).float()
    if actions.dim() == 3:
        if actions.shape[-1] != num_actions:
            raise ValueError(
                f"action sets must be (B, T, num_actions={num_actions}), got {tuple(actions.shape)}"
            )
        sets = actions.float()
        if bool(((sets != 0) & (sets != 1)).any()):
            raise ValueError("action sets (B, T, num_actions) must be multi-hot (0 or 1)")
        return sets
    raise ValueError(
        f"actions must be ids (B, T) or multi-hot sets (B, T, {num_actions}), "
        f"got shape {tuple(actions.shape)}"
    )


def check_rollout_actions(actions: Tensor, batch: int, context: int, horizon: int) -> int:
    """A rollout of `horizon` frames after `context` frames needs actions (B, >= context +
    horizon - 1, ...) (ids or sets): actions[:, i] is taken after frame i. Returns that count."""
    need = context + horizon - 1
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if actions.shape[0] != batch or actions.dim() < 2 or actions.shape[1] < need:
        raise ValueError(
            f"actions must be (B, >= t0 + horizon - 1)=({batch}, {need}), "
            f"got {tuple(actions.shape)}"
        )
    return need


def used_action_sets(actions: Tensor, real: Tensor, num_actions: int) -> Tensor:
    """Action sets (B, T, A) of a training clip's actions (B, T) ids or (B, T, A) sets whose
    frames `real` (B, T) bool are real. actions[:, i] drives frame i+1, so it must be valid
    wherever frame i+1 is real; the rest (the last step, padding; -1 = unknown) conditions no
    prediction and is replaced by action 0."""
    used = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)  # (B, T)
    keep = used if actions.dim() == 2 else used[..., None]
    return action_sets(torch.where(keep, actions, 0), num_actions)
