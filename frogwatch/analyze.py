"""Orchestration: model source -> layer matrices -> spectra -> fits -> metrics -> DataFrame."""

from __future__ import annotations

import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from ._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_float,
    check_int,
    fail_type,
    fail_value,
)
from .handoff import ATTRS_KEY, Analysis, check_table
from .metrics import layer_metrics
from .powerlaw_fit import PowerLawFit, fit_power_law
from .rules import SUMMARY_COLUMNS, overparameterized, scale_collapse, summarize
from .sources import LayerMatrix, ResolvedSource, SourceError, resolve_source
from .spectra import Spectrum, esd_matrices, resolve_device, spectrum

__all__ = ["analyze", "describe", "summary", "COLUMNS", "SUMMARY_COLUMNS", "LayerHook", "LayerSelector"]

COLUMNS = [
    "layer_id", "name", "layer_type", "M", "N", "Q", "rf", "num_evals",
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "lambda_max", "spectral_norm", "norm", "log_norm", "log_spectral_norm",
    "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy",
    "matrix_rank", "rank_loss", "weak_rank_loss", "sv_max", "sv_min",
    "status", "warning", "reason", "Lambda", "num_fingers",
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
            if sel == lm.name or sel == lm.layer_type or re.fullmatch(sel, lm.name):
                return True
    return False


def _check_layers(layers: Any, func: str) -> LayerSelector:
    expected = "None, a predicate, or a list of layer ids, names and regexes"
    if layers is None or callable(layers):
        return layers
    if isinstance(layers, (str, int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise fail_type(func, "layers", expected, layers)
    layers = list(layers)
    for sel in layers:
        if isinstance(sel, bool) or not isinstance(sel, (int, np.integer, str)):
            raise fail_type(func, "layers", expected, sel)
        if isinstance(sel, str):
            try:
                re.compile(sel)
            except re.error:
                raise fail_value(func, "layers", "names or valid regexes", sel) from None
    return layers


def _check_limits(func: str, min_evals: Any, max_evals: Any, max_N: Any) -> tuple[int, int, int]:
    return (
        check_int(min_evals, "min_evals", func, low=1),
        check_int(max_evals, "max_evals", func, low=1),
        check_int(max_N, "max_N", func, low=1),
    )


def _plan(source: ResolvedSource, layers: LayerSelector, min_evals: int, max_evals: int, max_N: int):
    """The layer list with, for each, its layer_id and the reason it is skipped ('' = analysed)."""
    plan = []
    for i, lm in enumerate(source.matrices):
        if not _selected(layers, i, lm):
            continue
        plan.append((i, lm, _skip_reason(lm, min_evals, max_evals, max_N)))
    return source.matrices, plan


def _base_row(i: int, lm: LayerMatrix) -> dict:
    return {
        "layer_id": i,
        "name": lm.name,
        "layer_type": lm.layer_type,
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


@contextlib.contextmanager
def _layer_map(workers: int):
    """``map`` over layers, in order: one layer per core, each with one BLAS thread.

    A symmetric eigensolver on a few-hundred-wide matrix barely uses a second BLAS thread, so
    running layers side by side keeps every core busy (BENCHMARKS.md). NumPy's
    LAPACK calls release the GIL, so threads suffice. With one worker, BLAS keeps its threads.
    """
    if workers <= 1:
        yield map
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        yield pool.map


def describe(
    model: Any,
    *,
    layers: LayerSelector = None,
    min_evals: int = 10,
    max_evals: int = 15000,
    max_N: int = 50000,
) -> pd.DataFrame:
    """The layers ``analyze`` would see, with shapes and why any is skipped. No SVD, no reads.

    Parameters
    ----------
    model : model source, ResolvedSource or Analysis
        As for :func:`analyze`.
    layers, min_evals, max_evals, max_N :
        As for :func:`analyze` (checked the same way).

    Returns
    -------
    DataFrame
        One row per weight matrix: layer_id, name, layer_type, shape, M, N, Q, rf, num_evals,
        analyzed (bool) and skip_reason.
    """
    layers = _check_layers(layers, "describe")
    limits = _check_limits("describe", min_evals, max_evals, max_N)
    _, plan = _plan(resolve_source(model), layers, *limits)
    rows = []
    for i, lm, reason in plan:
        row = _base_row(i, lm)
        row.update(shape=lm.shape, num_evals=lm.M * lm.rf, analyzed=not reason, skip_reason=reason)
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=["layer_id", "name", "layer_type", "shape", "M", "N", "Q", "rf", "num_evals",
                 "analyzed", "skip_reason"],
    )  # fmt: skip


def _load_checked(lm: LayerMatrix) -> tuple[torch.Tensor | None, str]:
    """Read a layer's tensor; return (None, reason) if it holds no usable numbers."""
    try:
        W = lm.load()
    except Exception as e:  # a broken file shard, a device error...
        return None, f"could not read the tensor: {type(e).__name__}: {e}"
    if W.device.type == "meta":
        return None, "tensor is on the meta device (no data); load real weights first"
    if not (W.is_floating_point() or W.is_complex()):
        return None, f"unsupported dtype {W.dtype}"
    W = W.to(torch.float64)
    # A NaN or Inf anywhere makes the sum non-finite: one reduction instead of a mask per entry.
    if not torch.isfinite(W.sum()):
        bad = int((~torch.isfinite(W)).sum())
        if bad:
            return None, f"weights contain {bad} NaN/Inf entries"
        return None, "weights too large: their sum overflows float64"
    return W, ""


def _failed_row(row: dict, reason: str) -> dict:
    return {**row, "alpha": np.nan, "status": "failed", "reason": reason, "warning": ""}


_DEFAULTS: dict[str, Any] = {
    "layers": None, "min_evals": 10, "max_evals": 15000, "max_N": 50000, "fit": "PL",
    "fix_fingers": None, "xmax": None, "pool": True, "device": None, "progress": True,
    "method": "gram", "hooks": (), "randomize": False, "mp_fit": False, "seed": 0,
}  # fmt: skip


def check_options(func: str, **options: Any) -> dict[str, Any]:
    """Validate and normalise :func:`analyze`'s keyword options (defaults filled in).

    Used by ``analyze`` and by every function that forwards options to it (``compare``,
    ``report``), so a bad option fails before any model is read.

    Raises
    ------
    TypeError
        An unknown option, or an option of the wrong type (``min_evals=True``, ``seed=1.5``).
    ValueError
        An option of the right type with a bad value (``min_evals=0``, ``fit="xx"``).
    """
    unknown = [k for k in options if k not in _DEFAULTS]
    if unknown:
        raise TypeError(f"{func}: unknown analyze option(s) {unknown}; expected some of {list(_DEFAULTS)}")
    o = {**_DEFAULTS, **options}
    o["layers"] = _check_layers(o["layers"], func)
    o["min_evals"], o["max_evals"], o["max_N"] = _check_limits(func, o["min_evals"], o["max_evals"], o["max_N"])
    o["fit"] = check_choice(o["fit"], "fit", func, ("PL", "TPL"), normalize=str.upper)
    o["fix_fingers"] = check_choice(o["fix_fingers"], "fix_fingers", func, ("clip_xmax",), allow_none=True)
    o["xmax"] = check_float(o["xmax"], "xmax", func, low=0, low_open=True, allow_none=True)
    for flag in ("pool", "progress", "randomize", "mp_fit"):
        o[flag] = check_bool(o[flag], flag, func)
    if o["device"] is not None and not isinstance(o["device"], (str, torch.device)):
        raise fail_type(func, "device", "None, a str or a torch.device", o["device"])
    o["method"] = check_choice(o["method"], "method", func, ("gram", "svd"))
    hooks = o["hooks"]
    if callable(hooks) or not isinstance(hooks, Iterable) or isinstance(hooks, (str, bytes)):
        raise fail_type(func, "hooks", "an iterable of callables", hooks)
    o["hooks"] = tuple(check_callable(h, "hooks", func) for h in hooks)
    o["seed"] = check_int(o["seed"], "seed", func, low=0)
    return o


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
) -> pd.DataFrame:
    """Per-layer spectral diagnostics of a model, one row per analysed weight matrix.

    Parameters
    ----------
    model : nn.Module, state dict, path or ResolvedSource
        Anything :func:`frogwatch.sources.layer_matrices` reads: a module, a state dict, a
        ``.safetensors`` file, a sharded directory with its index, a ``.bin``/``.pt`` checkpoint
        or a Hugging Face model directory; or a source already resolved by
        :func:`frogwatch.sources.resolve_source`, or the ``df.attrs["frogwatch"]`` of an earlier
        table (its headers are not read again).
    layers : list of int / str, or callable, optional
        Restrict to these layer ids, names, layer types (``"dense"``, ``"conv2d"``...) or full-match
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
        Compute eigenvalues on this device (e.g. ``"cuda"``); CPU numpy by default. A missing
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

    Returns
    -------
    pandas.DataFrame
        Columns with WeightWatcher's names (see ``COLUMNS``). A layer whose
        weights or fit are unusable has ``status == "failed"``, NaN ``alpha`` and a ``reason``.
        Then the hook columns, and two booleans over the whole table: ``overparameterized``
        (alpha > 6 with a trusted fit, :func:`frogwatch.rules.overparameterized`) and
        ``scale_collapse`` (a low outlier of log_spectral_norm among layers of the same role and
        shape, :func:`frogwatch.rules.scale_collapse`). ``df.attrs["frogwatch"]`` holds the
        :class:`frogwatch.handoff.Analysis` (options, skipped layers, the resolved source) that
        downstream functions accept in place of the model; ``df.attrs["skipped"]`` the skipped
        layers.

    Raises
    ------
    TypeError, ValueError
        A bad option (checked before the model is read), see :func:`check_options`.
    SourceError
        The source cannot be read, or it has no analysable layer.
    """
    o = check_options(
        "analyze", layers=layers, min_evals=min_evals, max_evals=max_evals, max_N=max_N, fit=fit,
        fix_fingers=fix_fingers, xmax=xmax, pool=pool, device=device, progress=progress,
        method=method, hooks=hooks, randomize=randomize, mp_fit=mp_fit, seed=seed,
    )  # fmt: skip
    fit, fix_fingers, xmax, pool, method = o["fit"], o["fix_fingers"], o["xmax"], o["pool"], o["method"]
    dev = resolve_device(o["device"])
    hooks = list(o["hooks"])
    if o["randomize"]:
        from .diagnostics.traps import randomize_hook

        hooks.append(randomize_hook(o["seed"], method=method, device=dev))
    if o["mp_fit"]:
        from .diagnostics.mp import mp_fit_hook

        hooks.append(mp_fit_hook())
    source = resolve_source(model)
    mats, plan = _plan(source, o["layers"], o["min_evals"], o["max_evals"], o["max_N"])
    todo = [(i, lm) for i, lm, reason in plan if not reason]
    skipped = [(lm.name, reason) for _, lm, reason in plan if reason]
    if not todo:
        found = ", ".join(f"{n} ({r})" for n, r in skipped[:5]) or "none"
        raise SourceError(
            f"no analysable layer in {type(source.model).__name__}: found {len(mats)} weight matrices "
            f"(Linear, Conv1D, Conv2d, Embedding, RNN gates, or 2-D/4-D '*.weight' tensors); "
            f"skipped: {found}"
        )

    def layer_rows(item: tuple[int, LayerMatrix]) -> list[dict]:
        i, lm = item
        base = _base_row(i, lm)
        W, why = _load_checked(lm)
        if W is None:
            return [_failed_row(base, why)]
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

    rows: list[dict] = []
    bar = tqdm(total=len(todo), desc="frogwatch analyze", unit="layer", disable=not o["progress"], leave=False)
    workers = _num_workers() if dev is None else 1
    with _layer_map(workers) as run:
        for layer_out in run(layer_rows, todo):
            rows.extend(layer_out)
            bar.set_postfix_str(layer_out[0]["name"][-40:], refresh=False)
            bar.update()
    bar.close()
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df.reindex(columns=COLUMNS + extra)
    df["overparameterized"] = overparameterized(df)
    df["scale_collapse"] = scale_collapse(df)
    df.attrs["skipped"] = skipped
    df.attrs[ATTRS_KEY] = Analysis(options=o, skipped=tuple(skipped), source=source, version=__version__)
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

    Raises
    ------
    NotATableError
        ``df`` is not an ``analyze`` table (:func:`frogwatch.handoff.check_table`).
    TypeError
        ``include_embeddings`` is not a bool.
    """
    check_table(df, "summary", ("layer_type", "status", "alpha"))
    include_embeddings = check_bool(include_embeddings, "include_embeddings", "summary")
    return summarize(df, include_embeddings)
