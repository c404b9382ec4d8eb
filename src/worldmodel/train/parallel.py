"""How a model is spread over the ranks: `trainer.strategy=ddp|fsdp`, activation checkpointing,
and the full (unsharded) state dicts a checkpoint holds.

DDP keeps a whole copy of the model, its gradients and its optimizer state on every rank; FSDP2
(`torch.distributed.fsdp.fully_shard`) keeps 1/N of each parameter, gradient and optimizer moment
per rank and all-gathers a unit's parameters only while that unit runs, so a model larger than one
device trains. The units are the model's transformer blocks, the entries of every `nn.ModuleList`
named `blocks` (`STTransformer`, Phenaki, VideoGPT), and the root, which holds the rest (patch
embeddings, heads, a CNN tokenizer's convolutions). A GAN's discriminator stays out of FSDP
(`ignored_params`): its loss runs outside the model's `loss`, and the loop averages its gradients
itself, as under DDP.

Mixed precision: with `trainer.precision=bf16` the blocks run in bf16 (`MixedPrecisionPolicy`:
parameters gathered and inputs cast to bf16, half the all-gather traffic and unsharded memory;
gradients reduced in fp32); the root keeps fp32 parameters and inputs, because the quantizers run
outside autocast in fp32 (models/quantize.py) and a tokenizer's loss compares against its fp32
input frames. Autocast stays on around the forward as in every other run. The difference from
DDP's bf16 is the residual stream inside the blocks, bf16 here and fp32 under autocast alone.

Checkpoints hold full state dicts in the single-process format whatever the strategy: weights and
EMA weights keyed by parameter name, the optimizer state keyed by parameter index (as
`torch.optim.Optimizer.state_dict`). Under FSDP every rank takes part in gathering them
(`torch.distributed.checkpoint.state_dict` with `full_state_dict=True, cpu_offload=True`) and
rank 0 writes the file; loading slices each rank's shard from the full tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

log = logging.getLogger(__name__)

# Methods the loop calls on the model instead of `forward`: FSDP gathers the root's parameters
# around them as around a forward (`register_fsdp_forward_method`).
FORWARD_METHODS = ("loss", "reconstruct")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of every `nn.ModuleList` named `blocks` in `model`, outermost first."""
    return [
        block
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "blocks"
        for block in module
    ]


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (non-reentrant `torch.utils.checkpoint`, applied in place so parameter names and
    checkpoints do not change); returns the number of blocks. Memory for activations drops to
    one block's worth plus the block inputs, for about a third more compute."""
    # the composable form of torch.utils.checkpoint: hooks on the module, no wrapper module
    from torch.distributed._composable import checkpoint

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"trainer.activation_checkpointing=true but {type(model).__name__} has no "
            "transformer blocks (an nn.ModuleList named `blocks`) to checkpoint; set "
            "trainer.activation_checkpointing=false"
        )
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def shard(model: nn.Module, device: torch.device, bf16: bool) -> int:
    """Shard `model` in place over the default process group with FSDP2, the shards on `device`:
    each transformer block a unit (bf16 parameters when `bf16`), then the root; returns the
    number of block units.

    Must run before the optimizer is built: the parameters become new `DTensor` parameters. A
    model in host memory moves to `device` one unit at a time, as each is sharded.
    """
    disc = getattr(model, "discriminator", None)
    ignored = set(disc.parameters()) if isinstance(disc, nn.Module) else set()
    scalars = [n for n, p in model.named_parameters() if p.ndim == 0 and p not in ignored]
    if scalars:
        raise ValueError(
            f"trainer.strategy=fsdp: FSDP2 shards parameters along their first dimension and "
            f"{type(model).__name__} has 0-dim ones ({', '.join(scalars)}); make them vectors "
            "of shape (1,), or use trainer.strategy=ddp"
        )
    # bf16 inputs too: a LayerNorm with bf16 weights takes no fp32 input on the CPU
    blocks_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    # the ranks' devices, named: FSDP's default mesh is on CUDA whenever CUDA is there
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = transformer_blocks(model)
    # innermost first: a unit must be sharded before the unit that contains it
    for block in reversed(blocks):
        fully_shard(block, mesh=mesh, mp_policy=blocks_policy)
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False),
        ignored_params=ignored or None,
    )
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return len(blocks)


# ---------------------------------------------------------------------------- full state dicts


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a sharded `DTensor` is gathered (a collective: every rank
    must call it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's whole state dict; under FSDP gathered to rank 0 (others get `{}`)."""
    if not sharded:
        return model.state_dict()
    return get_model_state_dict(model, options=FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """Load a whole state dict; under FSDP each rank keeps its shard of every tensor."""
    if not sharded:
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its index order (groups in order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, sharded: bool
) -> dict[str, Any]:
    """`opt.state_dict()` with whole tensors, keyed by parameter index as in a single process;
    under FSDP gathered to rank 0 (others get `{}`)."""
    if not sharded:
        return opt.state_dict()
    by_name = get_optimizer_state_dict(model, opt, options=FULL)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    return {
        "state": {index[name]: s for name, s in by_name["state"].items()},
        "param_groups": [
            {**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], sharded: bool
) -> None:
    """Load an optimizer state in the single-process format; under FSDP each rank keeps its
    shard of every moment."""
    if not sharded:
        opt.load_state_dict(state)
        return
    names = _param_names(model, opt)
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def full_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """A flat dict of tensors (the EMA weights) with every `DTensor` gathered (a collective)."""
    return {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def shard_like(state: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Whole tensors cut to this rank's shards wherever `reference` holds a `DTensor`."""
    out = {}
    for k, v in state.items():
        ref = reference.get(k)
        if isinstance(ref, DTensor):
            v = distribute_tensor(v.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        out[k] = v
    return out


def grad_norm(params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """The total 2-norm of the gradients (non-finite when any gradient is): as the gradients'
    type (a `DTensor` under FSDP, for clipping them) and as a plain tensor, the same on every
    rank (for the finite check and the log)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return norm, norm.full_tensor() if isinstance(norm, DTensor) else norm
