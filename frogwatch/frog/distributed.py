"""FROG under FSDP2 (``torch.distributed.fsdp.fully_shard``): frozen bases sharded, δ trained.

FSDP2 shards by module and all-gathers one flat buffer per group, so every group must hold one
dtype. FROG keeps each layer's δ in its own child module (``layer.frog``), which
:func:`fully_shard_frog` shards as a group of its own; the frozen base weights are sharded with
the blocks that hold them (and the rest with the root). The bf16 bases and the float32 master
deltas therefore never share a group.

DDP needs nothing special: δ is an ordinary parameter (``accelerate`` wraps the prepared model
like any other; see the README's Training section for the ``accelerate launch`` command).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

from .layer import frog_layers

__all__ = ["default_blocks", "fully_shard_frog"]


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the elements of its largest ``nn.ModuleList``.

    For Hugging Face decoders this is ``model.model.layers`` (Llama) or ``transformer.h`` (GPT-2).
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def fully_shard_frog(
    model: nn.Module,
    *,
    mesh: Any = None,
    blocks: Iterable[nn.Module] | Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Apply FSDP2 to a model prepared by :func:`frogwatch.prepare` (in place) and return it.

    Every FROG layer's ``frog`` child (its δ) becomes one FSDP group, each block of ``blocks``
    another (the frozen base weights inside it), and the root the rest. Call it after
    ``prepare`` (or ``load_delta``) and before building the optimizer, inside an initialised
    process group; train as usual. ``frogwatch.merge`` / ``save_delta`` need the full deltas:
    gather them first (``DTensor.full_tensor()``) or save with a full state dict.

    Parameters
    ----------
    model : nn.Module
        A prepared model.
    mesh : DeviceMesh, optional
        Passed to ``fully_shard`` (default: the world on the default device type).
    blocks : iterable of modules or callable(model) -> iterable, optional
        Modules to shard as groups between the δ groups and the root (default:
        :func:`default_blocks`, the elements of the model's largest ``nn.ModuleList``).
    reshard_after_forward : bool
        ``fully_shard``'s option for the blocks and the root (δ groups are small and are always
        resharded after forward).
    mp_policy : MixedPrecisionPolicy, optional
        Passed to ``fully_shard`` for the blocks and the root only; δ groups keep their dtype.
    **kwargs
        Further ``fully_shard`` arguments (e.g. ``offload_policy``), for every group.
    """
    from torch.distributed.fsdp import fully_shard

    from .layer import state_of

    state_of(model)  # a clear error when the model is not prepared
    base = {"mesh": mesh, **kwargs}
    for layer in frog_layers(model).values():
        layer.frog.restore(layer.weight)  # shard W0, never a held W0 + δ
        fully_shard(layer.frog, reshard_after_forward=True, **base)
    group = dict(base, reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        group["mp_policy"] = mp_policy
    chosen = blocks(model) if callable(blocks) else (default_blocks(model) if blocks is None else blocks)
    for block in chosen:
        fully_shard(block, **group)
    fully_shard(model, **group)
    return model
