"""Orchestration: model source -> layer matrices -> spectra -> fits -> metrics -> DataFrame."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .metrics import layer_metrics
from .powerlaw_fit import PowerLawFit, fit_power_law
from .sources import LayerMatrix, SourceError, layer_matrices
from .schedule import CostProgress, layer_cost, largest_first, pipeline
from .spectra import Spectrum, all_finite, esd_matrices, resolve_device, spectrum

__all__ = ["analyze", "describe", "summary", "COLUMNS", "SUMMARY_COLUMNS"]

COLUMNS = [
    "layer_id", "name", "layer_type", "M", "N", "Q", "rf", "num_evals",
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "lambda_max", "spectral_norm", "norm", "log_norm", "log_spectral_norm",
    "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy",
    "matrix_rank", "rank_loss", "weak_rank_loss", "sv_max", "sv_min",
    "status", "warning", "reason", "Lambda", "num_fingers",
]  # fmt: skip

# Model-wide means (WeightWatcher's get_summary); alpha_weighted is the model's alpha-hat.
SUMMARY_COLUMNS = [
    "alpha_weighted", "alpha", "log_norm", "log_alpha_norm", "log_spectral_norm",
    "stable_rank", "mp_softrank",
]  # fmt: skip

LayerSelector = Sequence[int | str] | Callable[[LayerMatrix], bool] | None
# A per-layer hook adds columns: (layer, scaled ESD matrices, spectrum, fit) -> {column: value}
LayerHook = Callable[[LayerMatrix, list[torch.Tensor], Spectrum, PowerLawFit], dict]


def _skip_reason(lm: LayerMatrix, min_evals: int, max_evals: int, max_N: int) -> str:
    num = lm.M * lm.rf
    if num < min_evals:
        return f"M*rf = {num} < min_evals = {min_evals}"
    if num > max_evals:
        return f"M*rf = {num} > max_evals = {max_evals}"
    if lm.N > max_N:
        return f"N = {lm.N} > max_N = {max_N}"
    return ""


def _selected(layers: LayerSelector, i: int, lm: LayerMatrix) -> bool:
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(lm))
    for sel in layers:
        if isinstance(sel, (int, np.integer)) and not isinstance(sel, bool):
            if sel == i:
                return True
        elif isinstance(sel, str):
            if sel == lm.name or sel == lm.kind or re.fullmatch(sel, lm.name):
                return True
        else:
            raise TypeError(f"layers entries must be ints, names or regexes; got {sel!r}")
    return False


def _plan(model: Any, layers: LayerSelector, min_evals: int, max_evals: int, max_N: int):
    """The layer list with, for each, its layer_id and the reason it is skipped ('' = analysed)."""
    if layers is not None and not callable(layers):
        if isinstance(layers, (str, int)):
            layers = [layers]
        layers = list(layers)
    for name, v in (("min_evals", min_evals), ("max_evals", max_evals), ("max_N", max_N)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    mats = layer_matrices(model)
    plan = []
    for i, lm in enumerate(mats):
        if not _selected(layers, i, lm):
            continue
        plan.append((i, lm, _skip_reason(lm, min_evals, max_evals, max_N)))
    return mats, plan


def _base_row(i: int, lm: LayerMatrix) -> dict:
    return {
        "layer_id": i,
        "name": lm.name,
        "layer_type": lm.kind,
        "M": lm.M,
        "N": lm.N,
        "Q": lm.N / lm.M if lm.M else np.nan,
        "rf": lm.rf,
    }


def _num_workers() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def describe(
    model: Any,
    *,
    layers: LayerSelector = None,
    min_evals: int = 10,
    max_evals: int = 15000,
    max_N: int = 50000,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """The layers ``analyze`` would see, with shapes, why any is skipped, and the run's cost.

    No weight is read and no layer's SVD is run; the time estimate times one small eigensolver
    once per process (:mod:`frogwatch.estimate`).

    Returns
    -------
    DataFrame
        One row per weight matrix: layer_id, name, layer_type, shape, M, N, Q, rf, num_evals,
        analyzed (bool), skip_reason, est_seconds and est_memory_mb (for analysed matrices, on
        ``device`` or the CPU) and fits_device (False when the matrix would not fit ``device``'s
        memory). ``df.attrs["estimate"]``: the whole run's ``wall_seconds``, ``peak_memory_mb``
        and ``workers``.
    """
    _, plan = _plan(model, layers, min_evals, max_evals, max_N)
    rows = []
    for i, lm, reason in plan:
        row = _base_row(i, lm)
        row.update(shape=lm.shape, num_evals=lm.M * lm.rf, analyzed=not reason, skip_reason=reason)
        rows.append(row)
    df = pd.DataFrame(
        rows,
        columns=["layer_id", "name", "layer_type", "shape", "M", "N", "Q", "rf", "num_evals",
                 "analyzed", "skip_reason"],
    )  # fmt: skip
    from .estimate import describe_estimate

    return describe_estimate(df, [lm for _, lm, _ in plan], resolve_device(device))


def _load_checked(lm: LayerMatrix) -> tuple[torch.Tensor | None, str]:
    """Read a layer's tensor, in its stored dtype; return (None, reason) if it holds no usable numbers."""
    try:
        W = lm.load()
    except Exception as e:  # a broken file shard, a device error...
        return None, f"could not read the tensor: {type(e).__name__}: {e}"
    if W.device.type == "meta":
        return None, "tensor is on the meta device (no data); load real weights first"
    if not (W.is_floating_point() or W.is_complex()):
        return None, f"unsupported dtype {W.dtype}"
    if W.is_complex():
        W = W.to(torch.float64)
    # Checked a block at a time: no float64 copy or per-entry mask of a large matrix.
    if not all_finite(W):
        bad = int((~torch.isfinite(W)).sum())
        if bad:
            return None, f"weights contain {bad} NaN/Inf entries"
        return None, "weights too large: their sum overflows float64"
    return W, ""


def _failed_row(row: dict, reason: str) -> dict:
    return {**row, "alpha": np.nan, "status": "failed", "reason": reason, "warning": ""}


def analyze(
    model: Any,
    *,
    layers: LayerSelector = None,
    min_evals: int = 10,
    max_evals: int = 15000,
    max_N: int = 50000,
    fit: str = "PL",
    fix_fingers: str | None = None,
    xmax: float | None = None,
    pool: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    method: str = "gram",
    hooks: Iterable[LayerHook] = (),
    randomize: bool = False,
    mp_fit: bool = False,
    seed: int = 0,
    distributed: bool = False,
) -> pd.DataFrame:
    """Per-layer spectral diagnostics of a model, one row per analysed weight matrix.

    Parameters
    ----------
    model : nn.Module, state dict, or path
        Anything :func:`frogwatch.sources.layer_matrices` reads: a module, a state dict, a
        ``.safetensors`` file, a sharded directory with its index, a ``.bin``/``.pt`` checkpoint
        or a Hugging Face model directory.
    layers : list of int / str, or callable, optional
        Restrict to these layer ids, names, kinds (``"dense"``, ``"conv2d"``...) or full-match
        regexes of names; or a predicate on :class:`LayerMatrix`.
    min_evals, max_evals, max_N : int
        Skip matrices with ``M*rf < min_evals`` or ``M*rf > max_evals`` or ``N > max_N``
        (WeightWatcher's defaults). Skipped layers are listed in ``df.attrs["skipped"]``.
    fit : {"PL", "TPL"}
        Power law or truncated power law (``Lambda`` column) for the tail.
    fix_fingers : {None, "clip_xmax"}
        Clip outlying top eigenvalues that inflate alpha.
    xmax : float, optional
        Upper cut-off of the eigenvalues used in the fit.
    pool : bool
        Pool conv2d slices into one spectrum (default) or give one row per slice.
    device : str or torch.device, optional
        Compute the Gram matrix and eigenvalues in torch on this device (e.g. ``"cuda"``), in
        float64, one matrix at a time while the next one is read; ``"cpu"`` runs that torch
        path on the CPU. ``None`` (default): LAPACK on the CPU, one matrix per core. A missing
        CUDA falls back to the CPU with a warning.
    progress : bool
        Show a progress bar.
    method : {"gram", "svd"}
        Eigenvalues from the smaller Gram matrix (fast, default) or from a full SVD.
    hooks : iterable of callables
        Extra per-layer columns: ``hook(layer, matrices, spectrum, fit) -> dict``.
    randomize : bool
        Add the correlation-trap columns (``rand_num_spikes``, ``rand_distance``,
        ``max_rand_eval``, ``ww_softrank``, ``rand_bulk_max``, ``rand_sigma_mp``): the ESD of each
        matrix with its entries shuffled, see :mod:`frogwatch.diagnostics.traps`.
    mp_fit : bool
        Add the Marchenko-Pastur fit columns (``num_spikes``, ``sigma_mp``, ``mp_softrank``,
        ``bulk_max``, ``bulk_min``), see :mod:`frogwatch.diagnostics.mp`.
    seed : int
        Seed of the shuffles for ``randomize`` (a layer's shuffle depends only on seed and name).
    distributed : bool
        Share the matrices among the ranks of the initialised ``torch.distributed`` process group
        by cost; each rank reads only its own tensors and every rank returns the whole table
        (see :mod:`frogwatch.distributed`; ``torchrun -m frogwatch analyze`` does this).

    Returns
    -------
    pandas.DataFrame
        Columns of REFERENCE §2 with WeightWatcher's names (see ``COLUMNS``). A layer whose
        weights or fit are unusable has ``status == "failed"``, NaN ``alpha`` and a ``reason``.
        Then the hook columns, and two booleans over the whole table: ``overparameterized``
        (alpha > 6 with a trusted fit, :func:`frogwatch.diagnostics.flow.overparameterized`) and
        ``scale_collapse`` (a low outlier of log_spectral_norm among layers of the same kind and
        shape, :func:`frogwatch.diagnostics.collapse.scale_collapse`).

    Raises
    ------
    SourceError
        The source cannot be read, or it has no analysable layer.
    """
    if fix_fingers not in (None, "clip_xmax"):
        raise ValueError(f"fix_fingers must be None or 'clip_xmax', got {fix_fingers!r}")
    if str(fit).upper() not in ("PL", "TPL"):
        raise ValueError(f"fit must be 'PL' or 'TPL', got {fit!r}")
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    dev = resolve_device(device)
    hooks = list(hooks)
    if randomize:
        from .diagnostics.traps import randomize_hook

        hooks.append(randomize_hook(seed, method=method, device=dev))
    if mp_fit:
        from .diagnostics.mp import mp_fit_hook

        hooks.append(mp_fit_hook())
    mats, plan = _plan(model, layers, min_evals, max_evals, max_N)
    todo = [(i, lm) for i, lm, reason in plan if not reason]
    skipped = [(lm.name, reason) for _, lm, reason in plan if reason]
    if not todo:
        found = ", ".join(f"{n} ({r})" for n, r in skipped[:5]) or "none"
        raise SourceError(
            f"no analysable layer in {type(model).__name__}: found {len(mats)} weight matrices "
            f"(Linear, Conv1D, Conv2d, Embedding, RNN gates, or 2-D/4-D '*.weight' tensors); "
            f"skipped: {found}"
        )

    def layer_rows(item: tuple[int, LayerMatrix], loaded: tuple[torch.Tensor | None, str]) -> list[dict]:
        i, lm = item
        base = _base_row(i, lm)
        W, why = loaded
        if W is None:
            return [_failed_row(base, why)]
        if W.dim() != 2 or hooks or (dev is None and method == "svd"):
            W = W.to(torch.float64)  # 2-D matrices go to the spectrum in their stored dtype
        groups = esd_matrices(lm, W, pool=pool)
        per_slice = [[m for _, m in groups]] if pool else [[m] for _, m in groups]
        suffixes = [""] if pool else [s for s, _ in groups]
        out = []
        for suffix, ms in zip(suffixes, per_slice):
            spec = spectrum(ms, method=method, device=dev)
            result = fit_power_law(spec.evals, fit=fit, xmax=xmax, fix_fingers=fix_fingers)
            row = {**base, "name": lm.name + suffix, **layer_metrics(spec, result)}
            if not pool and suffix:
                row["rf"] = 1
            for hook in hooks:
                row.update(hook(lm, ms, spec, result))
            out.append(row)
        return out

    if distributed:
        from .distributed import gather_rows, my_share

        mine = my_share([layer_cost(lm) for _, lm in todo])
    else:
        mine = list(range(len(todo)))
    costs = [layer_cost(todo[k][1]) for k in mine]
    order = [mine[k] for k in largest_first(costs)]
    outs: dict[int, list[dict]] = {}
    bar = CostProgress(costs, enabled=progress)
    workers = _num_workers() if dev is None else 1
    try:
        items = [todo[k] for k in order]
        for pos, layer_out in pipeline(items, lambda it: _load_checked(it[1]), layer_rows, workers=workers):
            outs[order[pos]] = layer_out
            bar.update(layer_cost(items[pos][1]), layer_out[0]["name"])
    finally:
        bar.close()
    if distributed:
        outs = gather_rows(outs)
    rows: list[dict] = [r for k in sorted(outs) for r in outs[k]]
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df.reindex(columns=COLUMNS + extra)
    from .diagnostics.collapse import scale_collapse
    from .diagnostics.flow import overparameterized

    df["overparameterized"] = overparameterized(df)
    df["scale_collapse"] = scale_collapse(df)
    df.attrs["skipped"] = skipped
    return df


def summary(df: pd.DataFrame, *, include_embeddings: bool = False) -> pd.Series:
    """Model-wide means of the layer metrics (WeightWatcher's ``get_summary``).

    Failed fits are left out of every mean; embeddings are left out unless asked for.

    Returns
    -------
    pandas.Series
        ``alpha_weighted`` (the model's alpha-hat) first, then alpha, log_norm, log_alpha_norm,
        log_spectral_norm, stable_rank and, when present, mp_softrank; plus ``num_layers`` (the
        layers averaged), ``num_failed`` and, when present, ``overparameterized_share`` (the share
        of the averaged layers flagged ``overparameterized``).
    """
    if not isinstance(df, pd.DataFrame) or "alpha" not in df.columns:
        raise ValueError("summary() expects the DataFrame returned by frogwatch.analyze()")
    use = df if include_embeddings else df[df["layer_type"] != "embedding"]
    ok = use[use["status"] == "success"]
    out = {c: float(ok[c].mean()) for c in SUMMARY_COLUMNS if c in ok.columns}
    out["num_layers"] = int(len(ok))
    out["num_failed"] = int((use["status"] != "success").sum())
    if "overparameterized" in ok.columns:
        out["overparameterized_share"] = float(ok["overparameterized"].mean()) if len(ok) else np.nan
    return pd.Series(out, name="summary")
