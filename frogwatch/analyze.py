"""Orchestration: model source -> layer matrices -> spectra -> fits -> metrics -> DataFrame."""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

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
from .schedule import CostProgress, layer_cost, largest_first, num_workers, pipeline
from .sources import LayerMatrix, ResolvedSource, SourceError, resolve_source
from .spectra import Spectrum, all_finite, esd_matrices, resolve_device, spectrum

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

    Parameters
    ----------
    model : model source, ResolvedSource or Analysis
        As for :func:`analyze`.
    layers, min_evals, max_evals, max_N :
        As for :func:`analyze` (checked the same way).
    device : str or torch.device, optional
        Estimate for this device (``fits_device`` against its memory); default the CPU.

    Returns
    -------
    DataFrame
        One row per weight matrix: layer_id, name, layer_type, shape, M, N, Q, rf, num_evals,
        analyzed (bool), skip_reason, est_seconds and est_memory_mb (for analysed matrices, on
        ``device`` or the CPU) and fits_device (False when the matrix would not fit ``device``'s
        memory). ``df.attrs["estimate"]``: the whole run's ``wall_seconds``, ``peak_memory_mb``
        and ``workers``.
    """
    layers = _check_layers(layers, "describe")
    limits = _check_limits("describe", min_evals, max_evals, max_N)
    if device is not None and not isinstance(device, (str, torch.device)):
        raise fail_type("describe", "device", "None, a str or a torch.device", device)
    _, plan = _plan(resolve_source(model), layers, *limits)
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


_DEFAULTS: dict[str, Any] = {
    "layers": None, "min_evals": 10, "max_evals": 15000, "max_N": 50000, "fit": "PL",
    "fix_fingers": None, "xmax": None, "pool": True, "device": None, "progress": True,
    "method": "gram", "hooks": (), "randomize": False, "mp_fit": False, "seed": 0,
    "detX": False, "vectors": False, "tail_tests": False, "farms": False, "savefig": None,
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
    o["fix_fingers"] = check_choice(o["fix_fingers"], "fix_fingers", func, ("clip_xmax", "xmin_peak"), allow_none=True)
    o["xmax"] = check_float(o["xmax"], "xmax", func, low=0, low_open=True, allow_none=True)
    for flag in ("pool", "progress", "randomize", "mp_fit", "detX", "vectors", "tail_tests", "farms"):
        o[flag] = check_bool(o[flag], flag, func)
    if o["savefig"] is not None and not isinstance(o["savefig"], (str, os.PathLike)):
        raise fail_type(func, "savefig", "None or a folder path", o["savefig"])
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
    detX: bool = False,
    vectors: bool = False,
    tail_tests: bool = False,
    farms: bool = False,
    savefig: str | os.PathLike | None = None,
    peft: bool | str = False,
    base: Any = None,
    distributed: bool = False,
) -> pd.DataFrame:
    """Per-layer spectral diagnostics of a model, one row per analysed weight matrix.

    Parameters
    ----------
    model : nn.Module, state dict, path or ResolvedSource
        Anything :func:`frogwatch.sources.layer_matrices` reads: a module, a state dict, a
        ``.safetensors`` file, a sharded directory with its index, a ``.bin``/``.pt`` checkpoint,
        a ``.gguf`` file or a Hugging Face model directory; or a source already resolved by
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
    fix_fingers : {None, "clip_xmax", "xmin_peak"}
        Clip outlying top eigenvalues that inflate alpha (``"clip_xmax"``), or search xmin only
        near the peak of the log-ESD (``"xmin_peak"``); both as WeightWatcher defines them.
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
    detX : bool
        Add WeightWatcher's detX / ERG columns (``detX_num``, ``detX_val``, ``num_ERG_spikes``,
        ``ERG_gap``), see :mod:`frogwatch.diagnostics.detx`.
    vectors : bool
        Add eigenvector-localisation columns (WeightWatcher's bulk/tail means and variances of
        vector entropy, localisation and participation ratios, plus frogwatch's ``top_*``
        columns), see :mod:`frogwatch.diagnostics.vectors`.
    tail_tests : bool
        Add likelihood-ratio tests of the power law against a lognormal and an exponential on the
        same tail (``R_lognormal``, ``p_lognormal``, ``R_exponential``, ``p_exponential``), see
        :mod:`frogwatch.diagnostics.tail_tests`.
    farms : bool
        Add ``alpha_farms``: alpha of the averaged ESD of fixed-aspect-ratio submatrices, see
        :mod:`frogwatch.diagnostics.farms`.
    savefig : path, optional
        Save one ESD figure per analysed layer into this folder, see :mod:`frogwatch.esd_figures`.
    peft : {False, True, "merged"}
        For a PEFT LoRA model or adapter directory: ``True`` analyses each adapter's ``B A`` alone
        (from an r x r problem), ``"merged"`` each adapted layer ``W + s B A``; see
        :mod:`frogwatch.adapters`. ``base`` gives the base model of an adapter directory.
    distributed : bool
        Share the matrices among the ranks of the initialised ``torch.distributed`` process group
        by cost; each rank reads only its own tensors and every rank returns the whole table
        (see :mod:`frogwatch.distributed`; ``torchrun -m frogwatch analyze`` does this).

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
    if peft:
        if peft not in (True, "merged"):
            raise ValueError(f"analyze: peft must be False, True or 'merged', got {peft!r}")
        from .adapters import analyze_adapters

        return analyze_adapters(model, merged=peft == "merged", base=base, layers=layers, fit=fit,
                                fix_fingers=fix_fingers, xmax=xmax, progress=progress)  # fmt: skip
    o = check_options(
        "analyze", layers=layers, min_evals=min_evals, max_evals=max_evals, max_N=max_N, fit=fit,
        fix_fingers=fix_fingers, xmax=xmax, pool=pool, device=device, progress=progress,
        method=method, hooks=hooks, randomize=randomize, mp_fit=mp_fit, seed=seed,
        detX=detX, vectors=vectors, tail_tests=tail_tests, farms=farms, savefig=savefig,
    )  # fmt: skip
    fit, fix_fingers, xmax, pool, method = o["fit"], o["fix_fingers"], o["xmax"], o["pool"], o["method"]
    distributed = check_bool(distributed, "distributed", "analyze")
    dev = resolve_device(o["device"])
    hooks = list(o["hooks"])
    if o["randomize"]:
        from .diagnostics.traps import randomize_hook

        hooks.append(randomize_hook(o["seed"], method=method, device=dev))
    if o["mp_fit"]:
        from .diagnostics.mp import mp_fit_hook

        hooks.append(mp_fit_hook())
    optional = (  # (on, module under diagnostics/, how to make its hook)
        (detX, "detx", lambda m: m.detx_hook()),
        (vectors, "vectors", lambda m: m.vectors_hook(device=dev)),
        (tail_tests, "tail_tests", lambda m: m.tail_tests_hook()),
        (farms, "farms", lambda m: m.farms_hook(fit=fit, fix_fingers=fix_fingers, method=method, device=dev)),
    )  # fmt: skip
    for on, module, make in optional:
        if on:
            hooks.append(make(importlib.import_module(f".diagnostics.{module}", __package__)))
    if savefig is not None:
        from .esd_figures import esd_figure_hook

        hooks.append(esd_figure_hook(savefig))
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
    bar = CostProgress(costs, enabled=o["progress"])
    workers = num_workers() if dev is None else 1
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
