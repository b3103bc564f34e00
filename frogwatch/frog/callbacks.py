"""Training hooks that watch a FROG fine-tune: per-layer ΔW norms and α of the effective weight.

``record_layer_stats(model, step)`` is the plain-PyTorch hook: call it from any training loop.
``FrogwatchCallback`` does the same from a Hugging Face ``Trainer`` (seed: "how layer importance
changes during the fine-tuning process"). ``transformers`` is imported only when
``FrogwatchCallback`` is first accessed, so this module imports without it.

α comes from :func:`frogwatch.analyze.analyze` run on the effective weights ``W0 + scatter(δ)`` of
the FROG layers (noise is never included); when that module cannot be imported the ``alpha``
column is NaN. At the end of training the callback runs ``frogwatch.compare(base, tuned)`` on the
FROG layers' base and effective weights when ``frogwatch.compare`` exists, and stores the result in
``callback.comparison``; without it (the diagnostics issue has not landed) it skips the comparison
and leaves ``callback.comparison = None``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from .layer import effective_weight, frog_layers

__all__ = ["FrogwatchCallback", "record_layer_stats"]

COLUMNS = ["step", "name", "kind", "k", "delta_norm", "weight_norm", "relative_delta", "alpha"]


def _analyze_fn() -> Callable | None:
    try:
        from frogwatch.analyze import analyze
    except ImportError:
        return None
    return analyze


def _compare_fn() -> Callable | None:
    """``frogwatch.compare`` if that module has landed, else ``None``."""
    import frogwatch

    try:
        return getattr(frogwatch, "compare", None)
    except ModuleNotFoundError as e:  # the lazy import points at a module not written yet
        if (e.name or "").startswith("frogwatch"):
            return None
        raise


def _layers_or_raise(model: nn.Module) -> dict[str, nn.Module]:
    layers = frog_layers(model)
    if not layers:
        raise ValueError("model has no FROG layers; prepare it with frogwatch.prepare first")
    return layers


def _effective_state_dict(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.weight" if n else "weight": effective_weight(m).cpu() for n, m in layers.items()}


def _alphas(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    analyze = _analyze_fn()
    if analyze is None:
        return {}
    df = analyze(state_dict, progress=False)
    out = {}
    for name, alpha in zip(df["name"], df["alpha"]):
        out[str(name)] = float(alpha)
    return out


def record_layer_stats(model: nn.Module, step: int, *, alpha: bool = True) -> pd.DataFrame:
    """Per-layer statistics of a FROG model at one training step.

    Parameters
    ----------
    model : nn.Module
        A model prepared by :func:`frogwatch.prepare`.
    step : int
        Recorded in the ``step`` column.
    alpha : bool
        Also fit α of each effective weight (one eigen-decomposition per layer; needs
        ``frogwatch.analyze``, NaN otherwise).

    Returns
    -------
    DataFrame
        One row per FROG layer: ``step, name, kind, k, delta_norm`` (‖ΔW‖_F = ‖δ‖₂),
        ``weight_norm`` (‖W0‖_F), ``relative_delta`` (their ratio), ``alpha``.
    """
    layers = _layers_or_raise(model)
    alphas = _alphas(_effective_state_dict(layers)) if alpha else {}
    rows = []
    with torch.no_grad():
        for name, m in layers.items():
            dn = float(torch.linalg.vector_norm(m.frog_delta.detach().double()))
            wn = float(torch.linalg.vector_norm(m.weight.detach().double()))
            a = alphas.get(name, alphas.get(f"{name}.weight", math.nan))
            rows.append((step, name, m._frog_kind, m.frog_delta.numel(), dn, wn,
                         dn / wn if wn else math.nan, a))
    return pd.DataFrame(rows, columns=COLUMNS)


def _base_state_dict(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.weight" if n else "weight": m.weight.detach().cpu() for n, m in layers.items()}


def compare_with_base(model: nn.Module) -> pd.DataFrame | None:
    """``frogwatch.compare(base, tuned)`` on the FROG layers, or ``None`` when it does not exist."""
    compare = _compare_fn()
    if compare is None:
        return None
    layers = _layers_or_raise(model)
    return compare(_base_state_dict(layers), _effective_state_dict(layers))


def _build_callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError("FrogwatchCallback needs transformers: pip install transformers") from None

    class FrogwatchCallback(TrainerCallback):
        """Record per-layer ΔW norms and α during ``Trainer.train`` (see ``record_layer_stats``).

        Parameters
        ----------
        every_n_steps : int
            Record at step 0, every ``every_n_steps`` optimizer steps, and at the last step.
        compare_at_end : bool
            Run ``frogwatch.compare`` against the base weights at the end, if it exists.
        alpha : bool
            Fit α at each record (costs one eigen-decomposition per FROG layer).

        Attributes
        ----------
        history : DataFrame
            All records so far (columns of ``record_layer_stats``).
        comparison : DataFrame or None
            The end-of-training comparison, or ``None`` when skipped.
        """

        def __init__(self, every_n_steps: int = 50, compare_at_end: bool = True,
                     alpha: bool = True) -> None:
            if not isinstance(every_n_steps, int) or every_n_steps < 1:
                raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
            self.every_n_steps = every_n_steps
            self.compare_at_end = compare_at_end
            self.alpha = alpha
            self.comparison: pd.DataFrame | None = None
            self._records: list[pd.DataFrame] = []
            self._last_step: int | None = None

        @property
        def history(self) -> pd.DataFrame:
            if not self._records:
                return pd.DataFrame(columns=COLUMNS)
            return pd.concat(self._records, ignore_index=True)

        def _record(self, state: Any, model: nn.Module | None) -> None:
            if model is None or not state.is_world_process_zero or self._last_step == state.global_step:
                return
            self._records.append(record_layer_stats(model, state.global_step, alpha=self.alpha))
            self._last_step = state.global_step

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                _layers_or_raise(model)
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every_n_steps == 0:
                self._record(state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._record(state, model)
            if self.compare_at_end and model is not None and state.is_world_process_zero:
                self.comparison = compare_with_base(model)

    FrogwatchCallback.__module__ = __name__
    return FrogwatchCallback


_CALLBACK_CLASS: type | None = None


def __getattr__(name: str) -> Any:  # PEP 562: build the Trainer callback on first use
    global _CALLBACK_CLASS
    if name == "FrogwatchCallback":
        if _CALLBACK_CLASS is None:
            _CALLBACK_CLASS = _build_callback_class()
        return _CALLBACK_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
