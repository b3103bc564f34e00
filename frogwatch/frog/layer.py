"""FROG layers: the classes ``prepare`` swaps in, the child module that holds δ, the step counter.

A targeted module keeps its identity, its ``weight`` (W0, frozen) and its ``bias``; its class
becomes a subclass (``FrogLinear``, ``FrogConv1D``, ``FrogConv2d``; ``isinstance(m, nn.Linear)``
stays true) and it gains one child module, ``frog`` (:class:`FrogDelta`), holding

* ``frog.delta`` — the trainable ``nn.Parameter`` (k,) of the selected entries (row-major order of
  ``mask.flatten()``), in the config's ``delta_dtype``;
* ``frog.indices`` — buffer (k,) of sorted flat indices (int32 below 2**31 entries);
* only with noise: non-persistent buffers coding the relevance S compactly (see
  :class:`~frogwatch.frog.ops.NoiseAmplitude`);
* ``frog.w0_cache`` — the k frozen values W0[idx] and the state of the in-place write of
  W0 + δ (:class:`~frogwatch.frog.patch.W0Cache`, not state: filled by the first call, refreshed
  when the weight or the indices change).

Between a training forward on the CPU and its backward, ``weight`` holds W0 + δ at the selected
entries (the write is held for the backward's input gradient, then W0 is written back); the
layer's ``state_dict``, copies, pickles, :func:`effective_weight` and ``merge`` restore W0
first (:meth:`FrogDelta.restore`).

δ lives in its own submodule so that FSDP2, which wraps and shards by module and wants one dtype
per group, can give the float32 deltas their own group apart from the bfloat16 base weights
(:func:`frogwatch.frog.distributed.fully_shard_frog`). The layer's ``forward`` calls
``self.frog(x, weight, bias, op)``, so FSDP's hooks on ``frog`` run. ``layer.frog_delta`` and
``layer.frog_indices`` are read-only aliases of ``frog.delta`` and ``frog.indices``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import FrogConfig
from .patch import W0Cache

__all__ = [
    "FrogConv2d",
    "FrogDelta",
    "FrogLinear",
    "current_step",
    "effective_weight",
    "frog_layers",
    "set_step",
]

STATE_ATTR = "_frogwatch_state"


@dataclass
class FrogState:
    """Per-model bookkeeping kept on the prepared model (plain attribute, not a module)."""

    config: FrogConfig
    layers: tuple[str, ...]
    requires_grad: dict[str, bool] = field(repr=False)
    step: int = -1
    warned_no_step: bool = False

    @property
    def settings(self) -> FrogConfig:  # older name
        return self.config


def state_of(model: nn.Module) -> FrogState:
    st = getattr(model, STATE_ATTR, None)
    if st is None:
        raise ValueError("model was not prepared by frogwatch.prepare (no FROG state found)")
    return st


def advance_step(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the prepared model: one train-mode call = one noise step."""
    if module.training:
        getattr(module, STATE_ATTR).step += 1


def current_step(model: nn.Module) -> int:
    """Noise step of a prepared model: train-mode calls of the model so far, minus one."""
    return state_of(model).step


def set_step(model: nn.Module, step: int) -> None:
    """Set the noise step (e.g. when resuming, or when training calls submodules directly).

    The next train-mode call of the model advances it by one first; layers called outside a model
    call use ``step`` as is.
    """
    from .._validation import check_int

    state_of(model).step = check_int(step, "step", "set_step", low=-1)


class FrogDelta(nn.Module):
    """The trainable part of one FROG layer: ``delta`` (k,), ``indices`` (k,), noise codes.

    Calling it computes the layer: ``frog(x, weight, bias, op)`` applies
    ``op(x, W0 + scatter(delta) [+ noise], bias)`` through the sparse-delta autograd function.
    """

    def __init__(
        self, delta: torch.Tensor, indices: torch.Tensor, noise: dict[str, torch.Tensor] | None,
        layer_index: int, state: FrogState,
    ) -> None:
        super().__init__()
        self.delta = nn.Parameter(delta)
        self.register_buffer("indices", indices)
        self._noise_names = tuple(noise or ())
        for k, v in (noise or {}).items():
            self.register_buffer(k, v, persistent=False)
        self.layer_index = layer_index
        self.frog_state = state
        self.w0_cache = W0Cache()

    def restore(self, weight: torch.Tensor) -> None:
        """Write W0 back into ``weight``'s selected entries if a held write left W0 + δ there.

        A pending backward writes W0 + δ again when it runs.
        """
        if self.w0_cache is not None:
            self.w0_cache.restore(weight, self.indices)

    def noise_buffers(self) -> dict[str, torch.Tensor] | None:
        return {k: getattr(self, k) for k in self._noise_names} or None

    def noise(self) -> tuple[float, int]:
        """(amplitude, seed) of this step's noise; (0, 0) in eval mode or without noise."""
        st: FrogState = self.frog_state
        c = st.config
        if not self.training or c.noise_scale == 0.0:
            return 0.0, 0
        step = st.step
        if step < 0:
            if not st.warned_no_step:
                warnings.warn(
                    "FROG noise: the step counter has not advanced (the prepared model itself was "
                    "never called in train mode); using step 0. Call the model returned by "
                    "prepare(), or set the step with frogwatch.frog.layer.set_step.",
                    stacklevel=4,
                )
                st.warned_no_step = True
            step = 0
        amp = c.noise_scale * c.noise_std * c.schedule_factor(step)
        return amp, ops.derive_seed(c.seed, 1, step, self.layer_index)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                op: Any) -> torch.Tensor:
        amp, seed = self.noise()
        return ops.apply(x, self.delta, weight, bias, self.indices, self.noise_buffers(), op, amp, seed,
                         self.w0_cache)

    def extra_repr(self) -> str:
        return f"k={self.delta.numel()}, dtype={self.delta.dtype}"


class FrogLayer:
    """Mixin placed in front of a supported module class by ``prepare`` (see module docstring)."""

    _frog_base: type  # the original class, restored by merge
    _frog_kind: str

    @property
    def frog_delta(self) -> nn.Parameter:
        return self.frog.delta

    @property
    def frog_indices(self) -> torch.Tensor:
        return self.frog.indices

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with, ``W0 + scatter(delta)`` (no noise), detached.

        frogwatch's sources read this instead of ``weight`` (W0), so ``analyze`` and ``compare``
        see the fine-tuned layer.
        """
        return effective_weight(self)

    def extra_repr(self) -> str:
        return f"{self._frog_base.extra_repr(self)}, frog_k={self.frog_delta.numel()}"

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.frog.restore(self.weight)  # the saved weight is W0, even between forward and backward
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __getstate__(self) -> dict:
        self.frog.restore(self.weight)  # copies and pickles get W0
        return super().__getstate__()


class FrogLinear(FrogLayer, nn.Linear):
    """``nn.Linear`` computing with ``W0 + scatter(frog_delta)``; made by ``prepare``."""

    _frog_base = nn.Linear
    _frog_kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frog(x, self.weight, self.bias, self._frog_op)


class FrogConv2d(FrogLayer, nn.Conv2d):
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
        y = self.frog(x, self.weight, self.bias,
                      ops.Conv2dOp(self.stride, padding, self.dilation, self.groups))
        return y.squeeze(0) if unbatched else y


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.frog(x, self.weight, self.bias, self._frog_op)


def _conv1d_repr(self) -> str:
    return (f"FrogConv1D(nf={self.weight.shape[1]}, nx={self.weight.shape[0]}, "
            f"frog_k={self.frog_delta.numel()})\n  (frog): {self.frog!r}")


_CONV1D_CLASSES: dict[type, type] = {}


def frog_conv1d_class(base: type) -> type:
    """The FROG subclass of a ``Conv1D`` class (created once per base class)."""
    cls = _CONV1D_CLASSES.get(base)
    if cls is None:
        cls = type(
            "FrogConv1D", (FrogLayer, base),
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
        return frog_conv1d_class(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def frog_class(module: nn.Module) -> type | None:
    """The FROG class replacing ``module``'s class, or None when the module cannot be targeted."""
    if type(module) is nn.Linear:
        return FrogLinear
    if type(module) is nn.Conv2d:
        return FrogConv2d
    if is_conv1d(module):
        return frog_conv1d_class(type(module))
    return None


def frog_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The FROG layers of a model, by qualified name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FrogLayer)}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """``W0 + scatter(frog_delta)`` of one FROG layer (no noise), detached, shaped like W0."""
    if not isinstance(module, FrogLayer):
        raise ValueError(f"{type(module).__name__} is not a FROG layer")
    module.frog.restore(module.weight)
    with torch.no_grad():
        return ops.effective(module.weight, module.frog_delta, module.frog_indices, None, 0.0, 0)
