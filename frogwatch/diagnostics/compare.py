"""Before/after comparison of two models of the same architecture (e.g. pre/post fine-tune): the
table math.

:func:`frogwatch.compare` (in :mod:`frogwatch.comparison`, which runs ``analyze`` on both models)
hands the two tables to :func:`compare_tables`, which matches their layers by name and reports,
per matrix:

* ``alpha``, ``log_norm``, ``log_spectral_norm``, ``alpha_weighted`` of the base (``*_base``)
  and the tuned model (``*_tuned``) and their change (``*_change`` = tuned - base);
* ``scale_collapse``: against the base, ``log_spectral_norm`` fell by more than 0.3 dex while
  alpha did not improve (:func:`.collapse.scale_collapse_vs_reference`);
* the spectrum of the update ``dW = W_tuned - W_base`` (raw weights, before any conv scaling):
  ``dW_fro`` (Frobenius norm), ``dW_rel`` (``dW_fro / ||W_base||_F``), ``dW_stable_rank``
  (``||dW||_F^2 / ||dW||_2^2``, from the ESD of dW with the same conv2d scaling as analyze, to
  which it is invariant), ``dW_alpha`` (power-law alpha of the ESD of dW where the fit succeeds)
  and ``dW_status`` (``success``, ``unchanged`` for dW = 0, ``failed: <reason>``, or
  ``shape mismatch``).

The model-level summaries (:func:`frogwatch.summary`) of both models and their difference are in
``df.attrs["summary"]``; :func:`compare_summary` returns them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..handoff import check_table, source_of
from ..layers import layer_role
from ..powerlaw_fit import fit_power_law
from ..rules import summarize
from ..sources import LayerMatrix
from ..spectra import esd_matrices, spectrum
from .collapse import scale_collapse_vs_reference

__all__ = ["compare", "compare_tables", "compare_summary", "delta_spectrum", "COMPARED_METRICS"]


def __getattr__(name: str) -> Any:
    # compare() runs analyze, which sits above diagnostics: imported on first use, never at import.
    if name == "compare":
        from ..comparison import compare

        return compare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

COMPARED_METRICS = ("alpha", "log_norm", "log_spectral_norm", "alpha_weighted")
_COMPARE_NEEDS = ("name", "alpha_base", "alpha_tuned", "scale_collapse", "dW_rel")
_DELTA_COLUMNS = ["dW_fro", "dW_rel", "dW_stable_rank", "dW_alpha", "dW_status"]


def delta_spectrum(lm: LayerMatrix, W_base: torch.Tensor, W_tuned: torch.Tensor) -> dict:
    """Spectral summary of ``dW = W_tuned - W_base`` for one layer.

    Parameters
    ----------
    lm : LayerMatrix
        The base layer (its kind decides the conv2d scaling of the ESD).
    W_base, W_tuned : tensors of the same shape

    Returns
    -------
    dict
        ``dW_fro, dW_rel, dW_stable_rank, dW_alpha, dW_status``.
    """
    if tuple(W_base.shape) != tuple(W_tuned.shape):
        return {"dW_fro": math.nan, "dW_rel": math.nan, "dW_stable_rank": math.nan,
                "dW_alpha": math.nan, "dW_status": "shape mismatch"}  # fmt: skip
    Wb = W_base.detach().to("cpu", torch.float64)
    dW = W_tuned.detach().to("cpu", torch.float64) - Wb
    if not torch.isfinite(dW).all():
        return {"dW_fro": math.nan, "dW_rel": math.nan, "dW_stable_rank": math.nan,
                "dW_alpha": math.nan, "dW_status": "failed: NaN/Inf in the weights"}  # fmt: skip
    fro = float(torch.linalg.vector_norm(dW))
    base_fro = float(torch.linalg.vector_norm(Wb))
    out = {"dW_fro": fro, "dW_rel": fro / base_fro if base_fro > 0 else math.nan}
    if fro == 0.0:
        return {**out, "dW_stable_rank": math.nan, "dW_alpha": math.nan, "dW_status": "unchanged"}
    spec = spectrum([m for _, m in esd_matrices(lm, dW)])
    ev = spec.evals
    out["dW_stable_rank"] = float(ev.sum() / ev[-1]) if ev[-1] > 0 else math.nan
    fit = fit_power_law(ev)
    out["dW_alpha"] = fit.alpha if fit.status == "success" else math.nan
    out["dW_status"] = "success" if fit.status == "success" else f"failed: {fit.reason}"
    return out


def _summary_table(df_base: pd.DataFrame, df_tuned: pd.DataFrame) -> pd.DataFrame:
    sb, st = summarize(df_base), summarize(df_tuned)
    keys = [k for k in sb.index if k in st.index]
    t = pd.DataFrame({"base": sb[keys].astype(float), "tuned": st[keys].astype(float)})
    t["change"] = t["tuned"] - t["base"]
    return t


def compare_tables(df_b: pd.DataFrame, df_t: pd.DataFrame, base: Any, tuned: Any) -> pd.DataFrame:
    """:func:`frogwatch.compare` from two ``analyze`` tables already computed (same options) and
    the two model sources they came from (raw, :class:`~frogwatch.sources.ResolvedSource` or
    :class:`~frogwatch.handoff.Analysis`; their layers are read for ``dW``, their headers are not
    read again when resolved). See :func:`frogwatch.compare` for the columns."""
    for df, who in ((df_b, "df_base"), (df_t, "df_tuned")):
        check_table(df, "compare_tables", ("name", "layer_type", "alpha", "M", "N"), name=who)
    names_t = set(df_t["name"])
    names_b = set(df_b["name"])
    shared = [n for n in df_b["name"] if n in names_t]
    if not shared:
        raise ValueError(
            "compare(): the two models share no analysed layer name "
            f"(base e.g. {list(df_b['name'])[:3]}, tuned e.g. {list(df_t['name'])[:3]}); "
            "they must have the same architecture and naming"
        )
    b = df_b.set_index("name").loc[shared]
    t = df_t.set_index("name").loc[shared]
    out = pd.DataFrame({"name": shared})
    out["layer_type"] = b["layer_type"].to_numpy()
    out["role"] = [layer_role(n, t) for n, t in zip(shared, out["layer_type"])]
    out["kind"] = out["role"]  # deprecated copy of role
    out["M"] = b["M"].to_numpy()
    out["N"] = b["N"].to_numpy()
    for m in COMPARED_METRICS:
        vb = pd.to_numeric(b[m], errors="coerce").to_numpy(dtype=np.float64)
        vt = pd.to_numeric(t[m], errors="coerce").to_numpy(dtype=np.float64)
        out[f"{m}_base"] = vb
        out[f"{m}_tuned"] = vt
        out[f"{m}_change"] = vt - vb
    collapsed = scale_collapse_vs_reference(
        out["log_spectral_norm_base"], out["log_spectral_norm_tuned"],
        out["alpha_base"], out["alpha_tuned"],
    )  # fmt: skip
    out["scale_collapse"] = collapsed & (out["role"] != "embedding").to_numpy()
    # the update dW, one matrix pair in memory at a time
    mats_b = source_of(base).by_name
    mats_t = source_of(tuned).by_name
    base_of = {n: n.split("[")[0] for n in shared}  # unpooled conv slices share one matrix
    deltas = []
    done: dict[str, dict] = {}
    for n in shared:
        key = base_of[n]
        if key not in done:
            lb, lt = mats_b.get(key), mats_t.get(key)
            if lb is None or lt is None:
                done[key] = {c: math.nan for c in _DELTA_COLUMNS} | {"dW_status": "not found"}
            else:
                done[key] = delta_spectrum(lb, lb.load(), lt.load())
        deltas.append(done[key])
    dW = pd.DataFrame(deltas, columns=_DELTA_COLUMNS)
    out = pd.concat([out, dW], axis=1)
    out.attrs["summary"] = _summary_table(df_b, df_t)
    out.attrs["base_only"] = [n for n in df_b["name"] if n not in names_t]
    out.attrs["tuned_only"] = [n for n in df_t["name"] if n not in names_b]
    return out


def compare_summary(cmp: pd.DataFrame) -> pd.DataFrame:
    """Model-level before/after table of a :func:`compare` result.

    Returns
    -------
    DataFrame
        Index: the :func:`frogwatch.summary` metrics (alpha_weighted = alpha-hat, alpha, log
        norms, ...), columns ``base``, ``tuned``, ``change``; then the rows
        ``num_scale_collapse`` (tuned column) and ``median_dW_rel`` (tuned column). When
        ``cmp.attrs["summary"]`` was lost (e.g. after a filter), the metrics are recomputed as
        means over the matched non-embedding rows.
    """
    check_table(cmp, "compare_summary", _COMPARE_NEEDS, name="cmp", producer="frogwatch.compare()")
    table = cmp.attrs.get("summary")
    if isinstance(table, pd.DataFrame):
        table = table.copy()
    else:
        role = cmp["role"] if "role" in cmp.columns else cmp["kind"]
        body = cmp[role != "embedding"]
        rows = {}
        for m in COMPARED_METRICS:
            vb, vt = body[f"{m}_base"].mean(), body[f"{m}_tuned"].mean()
            rows[m] = {"base": vb, "tuned": vt, "change": vt - vb}
        table = pd.DataFrame.from_dict(rows, orient="index")
    extra = pd.DataFrame(
        {
            "base": [np.nan, np.nan],
            "tuned": [float(cmp["scale_collapse"].sum()), float(cmp["dW_rel"].median())],
            "change": [np.nan, np.nan],
        },
        index=["num_scale_collapse", "median_dW_rel"],
    )
    return pd.concat([table, extra])
