"""FROG training engine: sparse-delta layers, relevance-scaled init, dynamic noise, merge, delta I/O.

``prepare(model, masks)`` turns every targeted ``nn.Linear``, Hugging Face ``Conv1D`` and
``nn.Conv2d`` into a sparse-delta layer that computes with

    W_eff = W0 + scatter(mask, delta)                                        (docs/method.md#training)

where ``W0`` is the frozen pretrained weight and ``delta`` a 1-D ``nn.Parameter`` holding the ``k``
selected entries (in the row-major order of ``mask.flatten()``). Gradients and optimizer state are
therefore O(k) per layer.

How it is built
---------------
* **In-place class swap.** A targeted module keeps its identity, its ``weight`` (W0, frozen) and
  its ``bias``; its class becomes a subclass (``FrogLinear``, ``FrogConv1D``, ``FrogConv2d``) that
  adds the parameter ``frog_delta`` (k,), the buffer ``frog_indices`` (k,) of sorted flat indices
  (int32 when the weight has < 2**31 entries) and, only when ``noise_scale > 0``, the
  non-persistent buffer ``frog_relevance`` (the full relevance S, shaped and typed like W0).
  ``merge`` swaps the original class back. ``isinstance(m, nn.Linear)`` stays true throughout.
* **Autograd.** A custom ``torch.autograd.Function`` builds W_eff transiently in forward and saves
  for backward only the layer input, ``delta``, ``W0`` and the indices (references, no dense copy).
  Backward rebuilds W_eff to form the input gradient, and forms delta's gradient one layer at a
  time by gathering the dense weight gradient at the indices. Dense layers avoid most of that
  product: a selection of <= 0.2 % of the matrix takes k dot products, otherwise only the block of
  rows x columns holding a selection is multiplied (found once per layer and cached); Conv2d
  always uses ``torch.nn.grad.conv2d_weight``. Under ``torch.autocast`` the layer casts to the
  autocast dtype itself, in forward and backward alike. Not tested: ``torch.compile``,
  ``nn.DataParallel``, FSDP / DeepSpeed ZeRO-3 (sharded W0), quantised base weights.
* **Step counter (noise).** ``prepare`` registers a forward pre-hook on the model it was given:
  every call of that model in train mode advances the step by one (the first call is step 0).
  A Hugging Face ``Trainer``, a plain loop and ``DistributedDataParallel`` all call it, so the step
  advances without user code; with gradient accumulation every micro-batch is a step. Gradient
  checkpointing re-runs blocks, not the model, so a recomputed forward sees the same step and the
  same noise. Calling a submodule on its own does not advance the step; use ``set_step`` then.
* **Dynamic noise.** In train mode each layer adds ``noise_scale * f(step) * noise_std * S * eps``
  (``eps ~ N(0, 1)``) to its frozen entries, where ``f`` is the schedule. ``eps`` is drawn from a
  generator seeded by ``(seed, step, layer index)`` on the weight's device, and drawn again from
  the same seed in backward rather than stored. Nothing is added in eval mode; W0 is never
  written. Memory: the full S is kept per targeted layer (one extra copy of every targeted weight,
  in its dtype: +41 MiB for MiniLM's 10.8 M targeted fp32 weights, +324 MiB for GPT-2 small's 85 M),
  plus transient dense noise and W_eff tensors for the layer that is running.

DDP: delta is an ordinary parameter; every rank draws the same noise (same seed, step, layer).
The constant buffers are broadcast each step unless DDP is built with ``broadcast_buffers=False``.

Limits: only exact ``nn.Linear`` / ``nn.Conv2d`` classes and classes named ``Conv1D`` are
targeted (subclasses such as ``nn.MultiheadAttention``'s ``out_proj`` read ``.weight`` directly in
their parent and are refused); a targeted weight may not be shared with another module; the noise
realisation depends on the device type (CPU and CUDA generators differ).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write
from .scores import relevance as frog_relevance

__all__ = [
    "FrogConv2d",
    "FrogLinear",
    "current_step",
    "effective_weight",
    "frog_layers",
    "load_delta",
    "merge",
    "parameter_counts",
    "prepare",
    "print_trainable_parameters",
    "save_delta",
    "set_step",
]

Schedule = Union[str, Callable[[int], float]]
_SCHEDULES = ("constant", "linear", "cosine")
_STATE_ATTR = "_frogwatch_state"
_DELTA_FORMAT = "frogwatch.delta"
_DELTA_FORMAT_VERSION = "1"
# How dense layers form delta's gradient dL/dW[idx] (dL/dW = A^T B, both (tokens x dim)):
# selected fraction <= _SPARSE_GRAD_MAX_DENSITY: k dot products (measured crossover on a 2-core
# CPU); else the product restricted to the rows x columns holding a selection when that block is
# at most _BLOCK_GRAD_MAX_FRACTION of the matrix (FROG's selections concentrate: at G = 1 % on
# MiniLM they touch ~40 % of rows and ~50 % of columns); else the full dense product.
_SPARSE_GRAD_MAX_DENSITY = 0.002
_BLOCK_GRAD_MAX_FRACTION = 0.7
_SPARSE_GRAD_CHUNK = 1 << 22  # elements per gathered block in the sparse gradient path


# --------------------------------------------------------------------------------------------
# settings and state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    init_scale: float
    noise_scale: float
    noise_std: float
    noise_schedule: Schedule
    noise_steps: int | None
    seed: int
    train_bias: bool

    def to_json(self) -> dict:
        d = asdict(self)
        if callable(self.noise_schedule):
            d["noise_schedule"] = "callable"
        return d


@dataclass
class _FrogState:
    """Per-model bookkeeping kept on the prepared model (plain attribute, not a module)."""

    settings: _Settings
    layers: tuple[str, ...]
    requires_grad: dict[str, bool] = field(repr=False)
    step: int = -1
    warned_no_step: bool = False


def _state(model: nn.Module) -> _FrogState:
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        raise ValueError("model was not prepared by frogwatch.prepare (no FROG state found)")
    return st


def _advance_step(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the prepared model: one train-mode call = one noise step."""
    if module.training:
        getattr(module, _STATE_ATTR).step += 1


def current_step(model: nn.Module) -> int:
    """Noise step of a prepared model: train-mode calls of the model so far, minus one."""
    return _state(model).step


def set_step(model: nn.Module, step: int) -> None:
    """Set the noise step (e.g. when resuming, or when training calls submodules directly).

    The next train-mode call of the model advances it by one first; layers called outside a model
    call use ``step`` as is.
    """
    if not isinstance(step, int) or step < -1:
        raise ValueError(f"step must be an int >= -1, got {step!r}")
    _state(model).step = step


def _schedule_factor(s: _Settings, step: int) -> float:
    sched = s.noise_schedule
    if callable(sched):
        f = float(sched(step))
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"noise_schedule({step}) returned {f}; it must be a finite value >= 0")
        return f
    if sched == "constant":
        return 1.0
    frac = min(step, s.noise_steps) / s.noise_steps
    if sched == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine


_MASK64 = (1 << 64) - 1


def _derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps); stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g



# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not on:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def _effective(
    weight: torch.Tensor,
    delta: torch.Tensor,
    indices: torch.Tensor,
    relevance: torch.Tensor | None,
    noise_amp: float,
    noise_seed: int,
) -> torch.Tensor:
    """Dense ``W0 + scatter(delta)`` (+ noise on the frozen entries), a new contiguous tensor.

    Noise is ``noise_amp * S * eps`` with ``eps ~ N(0, 1)`` drawn from ``noise_seed``; the selected
    entries get ``W0 + delta`` exactly, without noise.
    """
    d = delta.detach().to(weight.dtype)
    if noise_amp > 0.0:
        eps = torch.randn(
            weight.shape, generator=_generator(noise_seed, weight.device),
            device=weight.device, dtype=weight.dtype,
        )
        w = torch.addcmul(weight, relevance, eps, value=noise_amp).contiguous()
        del eps
        idx = indices.long()  # index_copy_ takes int64 only
        w.view(-1).index_copy_(0, idx, weight.reshape(-1).index_select(0, idx) + d)
        return w
    w = torch.clone(weight.detach(), memory_format=torch.contiguous_format)
    w.view(-1).index_add_(0, indices, d)
    return w


class _DenseOp:
    """y = x W^T + b (``nn.Linear``, W (out, in)) or y = x W + b (HF ``Conv1D``, W (in, out)).

    One instance lives on each FROG dense layer; it caches the rows and columns that hold a
    selection (computing them needs ``unique``, which waits for the GPU) for the block gradient.
    """

    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed
        self._block: tuple | None = None  # (key, used rows or None for "dense", used columns)

    def _block_plan(
        self, indices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = (indices.data_ptr(), indices.device, indices.numel(), _BLOCK_GRAD_MAX_FRACTION)
        if self._block is None or self._block[0] != key:
            r_used, c_used = torch.unique_consecutive(rows), torch.unique(cols)
            if r_used.numel() * c_used.numel() > _BLOCK_GRAD_MAX_FRACTION * size:
                r_used = c_used = None
            self._block = (key, r_used, c_used)
        return self._block[1], self._block[2]

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w) if b is not None else x2 @ w
        return y.view(*x.shape[:-1], w.shape[1])

    def grad_input(self, g: torch.Tensor, x_shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        return (g @ (w.t() if self.transposed else w)).view(x_shape)

    def grad_bias(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1, g.shape[-1]).sum(0)

    def grad_at(
        self, g: torch.Tensor, x: torch.Tensor, w_shape: torch.Size, indices: torch.Tensor
    ) -> torch.Tensor:
        """Entries ``indices`` of dL/dW, with dL/dW = A^T B for (A, B) = (g, x) or (x, g)."""
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a, b = (x2, g2) if self.transposed else (g2, x2)  # dW[i, j] = sum_n a[n, i] b[n, j]
        k, size = indices.numel(), w_shape[0] * w_shape[1]
        idx = indices.long()
        rows, cols = idx // w_shape[1], idx % w_shape[1]
        if k > _SPARSE_GRAD_MAX_DENSITY * size:
            # dense gradient, restricted to the block of rows and columns that hold a selection
            r_used, c_used = self._block_plan(indices, rows, cols, size)
            if r_used is None:
                return (a.t() @ b).view(-1).index_select(0, indices)
            block = a.index_select(1, r_used).t() @ b.index_select(1, c_used)
            pos = torch.searchsorted(r_used, rows) * c_used.numel() + torch.searchsorted(c_used, cols)
            return block.view(-1).index_select(0, pos)
        acc = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        out = torch.empty(k, dtype=acc, device=g.device)
        chunk = max(1, _SPARSE_GRAD_CHUNK // max(1, a.shape[0]))
        for s in range(0, k, chunk):
            r, c = rows[s : s + chunk], cols[s : s + chunk]
            out[s : s + chunk] = (a.index_select(1, r).to(acc) * b.index_select(1, c).to(acc)).sum(0)
        return out


class _Conv2dOp:
    """y = conv2d(x, W, b) with integer padding (string / non-zero padding is applied before)."""

    def __init__(self, stride: tuple, padding: tuple, dilation: tuple, groups: int) -> None:
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def grad_input(self, g: torch.Tensor, x_shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(
            x_shape, w, g, self.stride, self.padding, self.dilation, self.groups
        )

    def grad_bias(self, g: torch.Tensor) -> torch.Tensor:
        return g.sum((0, 2, 3))

    def grad_at(
        self, g: torch.Tensor, x: torch.Tensor, w_shape: torch.Size, indices: torch.Tensor
    ) -> torch.Tensor:
        gw = torch.nn.grad.conv2d_weight(
            x, w_shape, g, self.stride, self.padding, self.dilation, self.groups
        )
        return gw.reshape(-1).index_select(0, indices)


class _SparseDeltaFunction(torch.autograd.Function):
    """y = op(x, W0 + scatter(delta) [+ noise], b); saves no dense copy of the effective weight."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, indices, relevance, op, noise_amp, noise_seed):
        if weight.requires_grad:
            raise RuntimeError(
                "the frozen weight W0 of a FROG layer requires grad; FROG trains only frog_delta "
                "(and, with train_bias, the bias). Call requires_grad_(False) on it again."
            )
        cdtype = _autocast_dtype(x.device.type)
        x_dtype, bias_dtype = x.dtype, None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            w = _effective(weight, delta, indices, relevance, noise_amp, noise_seed)
            if cdtype is not None:
                x, w = x.to(cdtype), w.to(cdtype)
                bias = bias.to(cdtype) if bias is not None else None
            elif x.dtype != w.dtype:
                raise RuntimeError(
                    f"input dtype {x.dtype} does not match the FROG layer's weight dtype {w.dtype}"
                )
            y = op.forward(x, w, bias)
        del w
        ctx.op, ctx.noise_amp, ctx.noise_seed, ctx.cdtype = op, noise_amp, noise_seed, cdtype
        ctx.x_shape, ctx.x_dtype, ctx.bias_dtype = x.shape, x_dtype, bias_dtype
        need_x = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_x else None, delta, weight, indices, relevance)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, weight, indices, relevance = ctx.saved_tensors
        need_x, need_delta, _, need_bias = ctx.needs_input_grad[:4]
        gx = gd = gb = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out if ctx.cdtype is None else grad_out.to(ctx.cdtype)
            if need_x:
                w = _effective(weight, delta, indices, relevance, ctx.noise_amp, ctx.noise_seed)
                if ctx.cdtype is not None:
                    w = w.to(ctx.cdtype)
                gx = ctx.op.grad_input(g, ctx.x_shape, w).to(ctx.x_dtype)
                del w
            if need_delta and indices.numel() > 0:
                gd = ctx.op.grad_at(g, x, weight.shape, indices).to(delta.dtype)
            elif need_delta:
                gd = torch.zeros_like(delta)
            if need_bias:
                gb = ctx.op.grad_bias(g).to(ctx.bias_dtype)
        return gx, gd, None, gb, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


class _FrogLayer:
    """Mixin placed in front of a supported module class by ``prepare`` (see module docstring)."""

    _frog_base: type  # the original class, restored by merge
    _frog_kind: str

    def _frog_noise(self) -> tuple[float, int]:
        st: _FrogState = self._frog_state
        s = st.settings
        if not self.training or s.noise_scale == 0.0:
            return 0.0, 0
        step = st.step
        if step < 0:
            if not st.warned_no_step:
                warnings.warn(
                    "FROG noise: the step counter has not advanced (the prepared model itself was "
                    "never called in train mode); using step 0. Call the model returned by "
                    "prepare(), or set the step with frogwatch.frog.engine.set_step.",
                    stacklevel=3,
                )
                st.warned_no_step = True
            step = 0
        amp = s.noise_scale * s.noise_std * _schedule_factor(s, step)
        return amp, _derive_seed(s.seed, 1, step, self._frog_layer_index)

    def _frog_apply(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        amp, seed = self._frog_noise()
        return _SparseDeltaFunction.apply(
            x, self.frog_delta, self.weight, self.bias, self.frog_indices,
            getattr(self, "frog_relevance", None), op, amp, seed,
        )

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with, ``W0 + scatter(delta)`` (no noise), detached.

        frogwatch's sources read this instead of ``weight`` (W0), so ``analyze`` and ``compare``
        see the fine-tuned layer.
        """
        return effective_weight(self)

    def extra_repr(self) -> str:
        return f"{self._frog_base.extra_repr(self)}, frog_k={self.frog_delta.numel()}"


class FrogLinear(_FrogLayer, nn.Linear):
    """``nn.Linear`` computing with ``W0 + scatter(frog_delta)``; made by ``prepare``."""

    _frog_base = nn.Linear
    _frog_kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._frog_apply(x, self._frog_op)


class FrogConv2d(_FrogLayer, nn.Conv2d):
    """``nn.Conv2d`` computing with ``W0 + scatter(frog_delta)``; made by ``prepare``."""

    _frog_base = nn.Conv2d
    _frog_kind = "conv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            pads = self._reversed_padding_repeated_twice
            if any(pads):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, pads, mode=mode)
            padding = (0, 0)
        y = self._frog_apply(x, _Conv2dOp(self.stride, padding, self.dilation, self.groups))
        return y.squeeze(0) if unbatched else y


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self._frog_apply(x, self._frog_op)


def _conv1d_repr(self) -> str:
    return f"FrogConv1D(nf={self.weight.shape[1]}, nx={self.weight.shape[0]}, frog_k={self.frog_delta.numel()})"


_CONV1D_CLASSES: dict[type, type] = {}


def _frog_conv1d_class(base: type) -> type:
    """The FROG subclass of a ``Conv1D`` class (created once per base class)."""
    cls = _CONV1D_CLASSES.get(base)
    if cls is None:
        cls = type(
            "FrogConv1D", (_FrogLayer, base),
            {"_frog_base": base, "_frog_kind": "conv1d", "forward": _conv1d_forward,
             "__repr__": _conv1d_repr, "__module__": __name__, "__qualname__": "FrogConv1D",
             "__doc__": "Hugging Face ``Conv1D`` computing with ``W0 + scatter(frog_delta)``."},
        )
        _CONV1D_CLASSES[base] = cls
    return cls


def __getattr__(name: str) -> Any:  # PEP 562: lets pickle find FrogConv1D (transformers' Conv1D)
    if name == "FrogConv1D":
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:
            raise AttributeError("FrogConv1D needs transformers (its Conv1D class)") from None
        return _frog_conv1d_class(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def _frog_class(module: nn.Module) -> type | None:
    if type(module) is nn.Linear:
        return FrogLinear
    if type(module) is nn.Conv2d:
        return FrogConv2d
    if _is_conv1d(module):
        return _frog_conv1d_class(type(module))
    return None


def frog_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The FROG layers of a model, by qualified name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _FrogLayer)}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """``W0 + scatter(frog_delta)`` of one FROG layer (no noise), detached, shaped like W0."""
    if not isinstance(module, _FrogLayer):
        raise ValueError(f"{type(module).__name__} is not a FROG layer")
    with torch.no_grad():
        return _effective(module.weight, module.frog_delta, module.frog_indices, None, 0.0, 0)


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _check_settings(
    init_scale: float, noise_scale: float, noise_std: float, noise_schedule: Schedule,
    noise_steps: int | None, seed: int,
) -> None:
    for label, v in (("init_scale", init_scale), ("noise_scale", noise_scale)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{label} must be a finite number >= 0, got {v!r}")
    if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std <= 0:
        raise ValueError(f"noise_std must be a finite number > 0, got {noise_std!r}")
    if not callable(noise_schedule):
        if noise_schedule not in _SCHEDULES:
            raise ValueError(
                f"noise_schedule must be one of {_SCHEDULES} or a callable(step) -> factor, "
                f"got {noise_schedule!r}"
            )
        if noise_schedule != "constant" and (
            not isinstance(noise_steps, int) or isinstance(noise_steps, bool) or noise_steps <= 0
        ):
            raise ValueError(
                f"noise_schedule={noise_schedule!r} decays to 0 over noise_steps steps; pass "
                f"noise_steps as a positive int (got {noise_steps!r})"
            )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _layer_indices(masks: Mapping, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices (int32, or int64 for > 2**31 entries) of a mask, validated."""
    mask = masks[name]
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask for {name!r} must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
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
        raise ValueError(
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
        cls = _frog_class(module)
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


def _attach(
    module: nn.Module, cls: type, indices: torch.Tensor, delta: torch.Tensor,
    relevance: torch.Tensor | None, layer_index: int, state: _FrogState,
) -> None:
    module.__class__ = cls
    module.register_parameter("frog_delta", nn.Parameter(delta))
    module.register_buffer("frog_indices", indices)
    if relevance is not None:
        module.register_buffer("frog_relevance", relevance, persistent=False)
    module._frog_layer_index = layer_index
    module._frog_state = state
    if cls._frog_kind in ("linear", "conv1d"):
        module._frog_op = _DenseOp(transposed=cls._frog_kind == "conv1d")


def prepare(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    init_scale: float = 0.0,
    noise_scale: float = 0.0,
    noise_std: float = 1.0,
    noise_schedule: Schedule = "constant",
    noise_steps: int | None = None,
    seed: int = 0,
    train_bias: bool = False,
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
    init_scale : float
        ``delta(0) = init_scale * S_sel * N(0, 1)``; 0 starts exactly at the pretrained model.
    noise_scale, noise_std : float
        Train-mode noise ``noise_scale * f(step) * S * N(0, noise_std**2)`` on frozen entries.
    noise_schedule : {"constant", "linear", "cosine"} or callable
        ``f(step)``: 1; ``1 - step/noise_steps`` (floored at 0); half-cosine from 1 to 0 over
        ``noise_steps``; or ``callable(step) -> factor >= 0``.
    noise_steps : int, optional
        Length of the linear / cosine decay, in steps (see the module docstring for what a step is).
    seed : int
        Seeds the init (per layer) and the noise (per step and layer).
    train_bias : bool
        Leave the targeted layers' biases trainable.

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a Mapping[str, Tensor], got {type(masks).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None or frog_layers(model):
        raise ValueError("model is already prepared by frogwatch; merge() it first")
    _check_settings(init_scale, noise_scale, noise_std, noise_schedule, noise_steps, seed)
    targets = _resolve_targets(model, masks)
    layer_idx = [(name, _layer_indices(masks, name, module.weight)) for name, module, _ in targets]
    if not targets:
        warnings.warn("masks select no layer; prepare() only freezes the model", stacklevel=2)
    empty = [name for name, idx in layer_idx if idx.numel() == 0]
    if empty:
        warnings.warn(f"{len(empty)} mask(s) select nothing, e.g. {empty[:3]}; those layers get "
                      "no trainable entries", stacklevel=2)

    settings = _Settings(float(init_scale), float(noise_scale), float(noise_std), noise_schedule,
                         noise_steps, seed, bool(train_bias))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = _FrogState(settings, tuple(n for n, _, _ in targets), flags)
    for p in model.parameters():
        p.requires_grad_(False)

    has_scores = hasattr(masks, "scores")
    for i, ((name, module, cls), (_, idx)) in enumerate(zip(targets, layer_idx)):
        w = module.weight
        full_s = frog_relevance(w) if noise_scale > 0 or (init_scale > 0 and not has_scores) else None
        delta = torch.zeros(idx.numel(), dtype=w.dtype, device=w.device)
        if init_scale > 0 and idx.numel():
            if has_scores:
                s_sel = torch.as_tensor(masks.scores(name), dtype=torch.float64).reshape(-1).cpu()
                if s_sel.numel() != idx.numel():
                    raise ValueError(f"masks.scores({name!r}) has {s_sel.numel()} entries, "
                                     f"expected {idx.numel()}")
            else:
                s_sel = full_s.reshape(-1).index_select(0, idx.long()).cpu()
            eps = torch.randn(idx.numel(), generator=_generator(_derive_seed(seed, 0, i), "cpu"),
                              dtype=torch.float64)
            delta = (init_scale * s_sel * eps).to(device=w.device, dtype=w.dtype)
        relevance = full_s.to(w.dtype) if noise_scale > 0 else None
        _attach(module, cls, idx, delta, relevance, i, state)
        if train_bias and module.bias is not None:
            module.bias.requires_grad_(True)

    setattr(model, _STATE_ATTR, state)
    model.register_forward_pre_hook(_advance_step)
    return model


# --------------------------------------------------------------------------------------------
# merge, counting
# --------------------------------------------------------------------------------------------


def _detach_layer(module: nn.Module) -> None:
    """Remove FROG attributes and restore the original class (weight untouched)."""
    base = module._frog_base
    del module.frog_delta
    del module.frog_indices
    if "frog_relevance" in module._buffers:
        del module.frog_relevance
    del module._frog_layer_index
    del module._frog_state
    module.__dict__.pop("_frog_op", None)
    module.__class__ = base


def merge(model: nn.Module) -> nn.Module:
    """Write ``W0 + scatter(delta)`` into the weights and return a plain model (in place).

    The targeted modules get their original classes back, the step hook and every FROG attribute
    are removed, and each parameter's original ``requires_grad`` flag is restored. The weight
    tensors are updated in place (like PEFT's ``merge_and_unload``): deep-copy the model first to
    keep the base. Frozen entries are left bit-identical.
    """
    state = _state(model)
    with torch.no_grad():
        for module in frog_layers(model).values():
            w = module.weight
            if w.is_contiguous():
                w.view(-1).index_add_(0, module.frog_indices, module.frog_delta.detach().to(w.dtype))
            else:
                w.copy_(effective_weight(module))
            _detach_layer(module)
    for key, fn in list(model._forward_pre_hooks.items()):
        if fn is _advance_step:
            del model._forward_pre_hooks[key]
    delattr(model, _STATE_ATTR)
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


# --------------------------------------------------------------------------------------------
# delta save / load
# --------------------------------------------------------------------------------------------


def _key(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def _fingerprint(layers: Mapping[str, Mapping]) -> str:
    items = sorted((n, list(v["shape"])) for n, v in layers.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def save_delta(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the FROG deltas (indices, values, trained biases, metadata) to a safetensors file.

    Per layer ``<name>.frog_indices`` (int32, or int64 beyond 2**31 entries), ``<name>.frog_delta``
    and, with ``train_bias``, ``<name>.bias``; the metadata holds the frogwatch version, each
    layer's kind, shape and k, a fingerprint of the shapes and the prepare() settings. The file is
    written to a temporary name in the same directory and renamed into place.
    """
    from safetensors.torch import save_file

    from frogwatch import __version__

    state = _state(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, m in frog_layers(model).items():
        layers[name] = {"kind": m._frog_kind, "shape": list(m.weight.shape), "k": m.frog_delta.numel()}
        tensors[_key(name, "frog_indices")] = m.frog_indices.detach().cpu().contiguous()
        tensors[_key(name, "frog_delta")] = m.frog_delta.detach().cpu().contiguous()
        if state.settings.train_bias and m.bias is not None:
            tensors[_key(name, "bias")] = m.bias.detach().cpu().contiguous()
    meta = {
        "format": _DELTA_FORMAT, "format_version": _DELTA_FORMAT_VERSION,
        "frogwatch_version": __version__, "layers": json.dumps(layers),
        "fingerprint": _fingerprint(layers), "settings": json.dumps(state.settings.to_json()),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


class _IndexMasks(Mapping):
    """Masks rebuilt from saved indices (bool masks materialised on demand)."""

    def __init__(self, shapes: dict[str, tuple], indices: dict[str, torch.Tensor]) -> None:
        self._shapes, self._indices = shapes, indices

    def __getitem__(self, name: str) -> torch.Tensor:
        mask = torch.zeros(self._shapes[name], dtype=torch.bool)
        mask.view(-1)[self._indices[name].long()] = True
        return mask

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def indices(self, name: str) -> torch.Tensor:
        return self._indices[name]


def load_delta(
    model: nn.Module, path: str | os.PathLike, *, noise_schedule: Schedule | None = None
) -> nn.Module:
    """Load a delta saved by ``save_delta`` into ``model`` (in place) and return it.

    ``model`` is either the base model (it is then prepared with the saved masks and settings; the
    init is replaced by the saved values) or a model already prepared with the same masks.
    ``noise_schedule`` overrides the saved schedule (required when it was a callable).

    Raises
    ------
    ValueError
        Not a frogwatch delta file, or its layers, shapes or indices do not match the model.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _DELTA_FORMAT:
            raise ValueError(f"{path} is not a frogwatch delta file (metadata format "
                             f"{meta.get('format')!r})")
        if meta.get("format_version") != _DELTA_FORMAT_VERSION:
            raise ValueError(f"{path} has delta format version {meta.get('format_version')!r}; "
                             f"this frogwatch reads version {_DELTA_FORMAT_VERSION}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers: dict[str, dict] = json.loads(meta["layers"])
    settings: dict = json.loads(meta["settings"])

    modules = dict(model.named_modules())
    problems = []
    for name, info in layers.items():
        m = modules.get(name)
        if m is None:
            problems.append(f"{name!r}: no such module")
        elif tuple(getattr(m, "weight", torch.empty(0)).shape) != tuple(info["shape"]):
            problems.append(f"{name!r}: file shape {tuple(info['shape'])}, model shape "
                            f"{tuple(m.weight.shape)}")
    if problems:
        raise ValueError(f"delta file {path} (fingerprint {meta.get('fingerprint')}) does not fit "
                         "this model: " + "; ".join(problems[:5]))

    indices = {n: tensors[_key(n, "frog_indices")] for n in layers}
    if getattr(model, _STATE_ATTR, None) is None:
        sched = noise_schedule if noise_schedule is not None else settings["noise_schedule"]
        if sched == "callable":
            raise ValueError("the delta was trained with a callable noise_schedule; pass "
                             "noise_schedule= to load_delta")
        prepare(
            model, _IndexMasks({n: tuple(v["shape"]) for n, v in layers.items()}, indices),
            init_scale=0.0, noise_scale=settings["noise_scale"], noise_std=settings["noise_std"],
            noise_schedule=sched, noise_steps=settings["noise_steps"], seed=settings["seed"],
            train_bias=settings["train_bias"],
        )
    present = frog_layers(model)
    if set(present) != set(layers):
        raise ValueError(f"model is prepared with {len(present)} FROG layers, the delta file has "
                         f"{len(layers)}; symmetric difference e.g. "
                         f"{sorted(set(present) ^ set(layers))[:3]}")
    with torch.no_grad():
        for name, m in present.items():
            if not torch.equal(m.frog_indices.cpu().long(), indices[name].long()):
                raise ValueError(f"layer {name!r}: the model's selected indices differ from the file's")
            m.frog_delta.copy_(tensors[_key(name, "frog_delta")])
            bias_key = _key(name, "bias")
            if bias_key in tensors and m.bias is not None:
                m.bias.copy_(tensors[bias_key])
    return model
