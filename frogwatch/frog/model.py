"""``prepare`` a model for FROG training and ``merge`` the trained deltas back (PEFT's model layer).

``prepare(model, masks)`` turns every targeted ``nn.Linear``, Hugging Face ``Conv1D`` and
``nn.Conv2d`` into a sparse-delta layer (:mod:`frogwatch.frog.layer`) computing with

    W_eff = W0 + scatter(mask, delta)                                  (docs/method.md)

Gradients and optimizer state are O(k) per layer.

* **Step counter (noise).** ``prepare`` registers a forward pre-hook on the model it was given:
  every call of that model in train mode advances the step by one (the first call is step 0).
  A Hugging Face ``Trainer``, a plain loop, DDP and FSDP all call it; with gradient accumulation
  every micro-batch is a step. Gradient checkpointing re-runs blocks, not the model, so a
  recomputed forward sees the same step and the same noise. Calling a submodule on its own does
  not advance the step; use ``set_step`` then.
* **Dynamic noise.** In train mode each layer adds ``noise_scale * f(step) * noise_std * S * eps``
  (``eps ~ N(0, 1)``) to its frozen entries. ``eps`` is drawn from a generator seeded by
  ``(seed, step, layer index)`` on the weight's device and drawn again in backward rather than
  stored; S is kept in one byte per entry (or rank-r factors with ``noise_rank``), decoded
  transiently for the running layer. Nothing is added in eval mode; W0 is never written.
* **Delta dtype.** ``delta_dtype="auto"`` keeps float32 master deltas on bfloat16 / float16
  models (their gradients and AdamW state too); the forward adds them in the weight's dtype.

Limits: only exact ``nn.Linear`` / ``nn.Conv2d`` classes and classes named ``Conv1D`` are
targeted; a targeted weight may not be shared with another module; the noise realisation depends
on the device type (CPU and CUDA generators differ).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .._validation import fail_type
from .config import FrogConfig
from .layer import (
    STATE_ATTR, FrogDelta, FrogState, advance_step, effective_weight, frog_class, frog_layers,
    state_of,
)
from .masks import MaskMismatchError
from .ops import DenseOp, NoiseAmplitude, derive_seed, generator

__all__ = ["merge", "parameter_counts", "prepare", "print_trainable_parameters"]


def _layer_indices(masks: Mapping, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices (int32, or int64 for > 2**31 entries) of a mask, validated."""
    mask = masks[name]
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask for {name!r} must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise MaskMismatchError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, but the module's weight has shape "
            f"{tuple(weight.shape)}"
        )
    if hasattr(masks, "indices"):
        idx = torch.as_tensor(masks.indices(name)).reshape(-1).to(torch.int64).cpu()
        k = int(mask.sum())
        if idx.numel() != k or (k and (idx[0] < 0 or idx[-1] >= weight.numel())) or (
            k > 1 and not bool((idx[1:] > idx[:-1]).all())
        ):
            raise ValueError(
                f"masks.indices({name!r}) must be the {k} sorted, unique flat indices of the mask"
            )
    else:
        idx = torch.nonzero(mask.reshape(-1).cpu(), as_tuple=True)[0]
    dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    return idx.to(device=weight.device, dtype=dtype)


def _resolve_targets(model: nn.Module, masks: Mapping) -> list[tuple[str, nn.Module, type]]:
    modules = dict(model.named_modules())
    unknown = [n for n in masks if n not in modules]
    if unknown:
        raise MaskMismatchError(
            f"masks name {len(unknown)} module(s) not in the model, e.g. {unknown[:3]}; keys must "
            "be qualified module names as in model.named_modules()"
        )
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    targets = []
    for name, module in modules.items():
        if name not in masks:
            continue
        cls = frog_class(module)
        if cls is None:
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}; FROG targets nn.Linear, Hugging "
                "Face Conv1D and nn.Conv2d (exact classes; subclasses may be used through their "
                "weight by a parent module and are refused)"
            )
        if counts.get(id(module.weight), 0) > 1:
            raise ValueError(f"the weight of {name!r} is shared with another module (tied); "
                             "FROG cannot target tied weights")
        targets.append((name, module, cls))
    return targets


def _init_delta(masks: Mapping, name: str, w: torch.Tensor, idx: torch.Tensor, config: FrogConfig,
                layer_index: int, dtype: torch.dtype) -> torch.Tensor:
    """``init_scale * S_sel * N(0, 1)`` (float64 draw on the CPU, seeded per layer), or zeros."""
    if config.init_scale == 0 or idx.numel() == 0:
        return torch.zeros(idx.numel(), dtype=dtype, device=w.device)
    s_sel = None
    # Masks.scores hold the selection score, which is S only for the relevance-based scores.
    score = getattr(masks, "meta", {}).get("score", "relevance")
    if hasattr(masks, "scores") and score in ("relevance", "balanced"):
        s_sel = torch.as_tensor(masks.scores(name), dtype=torch.float64).reshape(-1).cpu()
        if s_sel.numel() != idx.numel():
            raise ValueError(f"masks.scores({name!r}) has {s_sel.numel()} entries, expected {idx.numel()}")
        if not bool(torch.isfinite(s_sel).all()):
            s_sel = None  # scores unknown (e.g. Masks.from_indices): recompute from W
    if s_sel is None:
        from .scores import relevance

        s_sel = relevance(w).reshape(-1).index_select(0, idx.long().to(w.device)).cpu()
    eps = torch.randn(idx.numel(), generator=generator(derive_seed(config.seed, 0, layer_index), "cpu"),
                      dtype=torch.float64)
    return (config.init_scale * s_sel * eps).to(device=w.device, dtype=dtype)


def prepare(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    config: FrogConfig | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Make ``model`` train only the masked entries of its targeted layers (in place).

    Parameters
    ----------
    model : nn.Module
        Any model. Every parameter is frozen (original flags are restored by ``merge``).
    masks : Mapping[str, Tensor]
        Qualified module name (as in ``model.named_modules()``) -> bool mask shaped like that
        module's weight: (out, in) Linear, (in, out) Conv1D, (out, in, kh, kw) Conv2d. If the
        mapping has ``indices(name)`` (sorted flat indices) and ``scores(name)`` (relevance of the
        selected entries, same order), they are used; otherwise they are computed.
    config : FrogConfig, optional
        The settings; default ``FrogConfig()``.
    **kwargs
        Fields of :class:`FrogConfig` (``init_scale``, ``noise_scale``, ``noise_std``,
        ``noise_schedule``, ``noise_steps``, ``noise_rank``, ``seed``, ``train_bias``,
        ``delta_dtype``), applied on top of ``config``.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    MaskMismatchError
        A mask names a module that is not in the model, or has another shape.
    ValueError
        Bad settings, an untargetable or tied module, or a model that is already prepared.
    """
    if not isinstance(model, nn.Module):
        raise fail_type("prepare", "model", "an nn.Module", model)
    if not isinstance(masks, Mapping):
        raise fail_type("prepare", "masks", "a Mapping[str, Tensor]", masks)
    if config is not None and not isinstance(config, FrogConfig):
        raise fail_type("prepare", "config", "a FrogConfig or None", config)
    config = (config or FrogConfig()).replace(**kwargs) if kwargs else (config or FrogConfig())
    if getattr(model, STATE_ATTR, None) is not None or frog_layers(model):
        raise ValueError("model is already prepared by frogwatch; merge() it first")
    targets = _resolve_targets(model, masks)
    layer_idx = [_layer_indices(masks, name, module.weight) for name, module, _ in targets]
    if not targets:
        warnings.warn("masks select no layer; prepare() only freezes the model", stacklevel=2)
    empty = [name for (name, _, _), idx in zip(targets, layer_idx) if idx.numel() == 0]
    if empty:
        warnings.warn(f"{len(empty)} mask(s) select nothing, e.g. {empty[:3]}; those layers get "
                      "no trainable entries", stacklevel=2)

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = FrogState(config, tuple(n for n, _, _ in targets), flags)
    for p in model.parameters():
        p.requires_grad_(False)

    for i, ((name, module, cls), idx) in enumerate(zip(targets, layer_idx)):
        w = module.weight
        dtype = config.resolve_delta_dtype(w.dtype)
        delta = _init_delta(masks, name, w, idx, config, i, dtype)
        noise = NoiseAmplitude.encode(w, config.noise_rank) if config.noise_scale > 0 else None
        module.__class__ = cls
        module.frog = FrogDelta(delta, idx, noise, i, state).train(module.training)
        if cls._frog_kind in ("linear", "conv1d"):
            module._frog_op = DenseOp(transposed=cls._frog_kind == "conv1d")
        if config.train_bias and module.bias is not None:
            module.bias.requires_grad_(True)

    setattr(model, STATE_ATTR, state)
    model.register_forward_pre_hook(advance_step)
    return model


def _detach_layer(module: nn.Module) -> None:
    """Remove FROG attributes and restore the original class (weight untouched)."""
    base = module._frog_base
    del module.frog
    module.__dict__.pop("_frog_op", None)
    module.__class__ = base


def merge(model: nn.Module) -> nn.Module:
    """Write ``W0 + scatter(delta)`` into the weights and return a plain model (in place).

    The targeted modules get their original classes back, the step hook and every FROG attribute
    are removed, and each parameter's original ``requires_grad`` flag is restored. The weight
    tensors are updated in place (like PEFT's ``merge_and_unload``): deep-copy the model first to
    keep the base. The delta is rounded to the weight's dtype as it is added; frozen entries are
    left bit-identical. :func:`frogwatch.merge_checkpoint` does the same on a checkpoint on disk.
    """
    state = state_of(model)
    with torch.no_grad():
        for module in frog_layers(model).values():
            w = module.weight
            module.frog.restore(w)
            if w.is_contiguous():
                w.view(-1).index_add_(0, module.frog_indices, module.frog_delta.detach().to(w.dtype))
            else:
                w.copy_(effective_weight(module))
            _detach_layer(module)
    for key, fn in list(model._forward_pre_hooks.items()):
        if fn is advance_step:
            del model._forward_pre_hooks[key]
    delattr(model, STATE_ATTR)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: k || all params: N || trainable%: x`` (PEFT's format).

    ``all params`` includes the deltas, as PEFT's count includes its adapters.
    """
    trainable, total = parameter_counts(model)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
