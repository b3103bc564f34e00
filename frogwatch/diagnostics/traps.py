"""Correlation traps: the ESD of a weight matrix with its entries shuffled (``randomize``).

Shuffling the entries of ``W`` keeps their distribution and destroys every correlation between
them, so the shuffled matrix should have a pure Marchenko-Pastur spectrum. An eigenvalue of the
shuffled matrix above the MP bulk edge plus the Tracy-Widom margin (see :mod:`.mp`) can only come
from the entries themselves, typically a few anomalously large ones: a **correlation trap**.

Columns added to :func:`frogwatch.analyze` by :func:`randomize_hook` (WeightWatcher's names):

``rand_num_spikes``
    Number of traps: shuffled eigenvalues above ``rand_bulk_max`` + Tracy-Widom margin, with the
    MP bulk fitted to the shuffled spectrum by :func:`.mp.fit_mp`.
``rand_distance``
    Jensen-Shannon distance (base 2, so in [0, 1]) between the histograms of ``log10`` of the
    eigenvalues of W and of the shuffled W, on 100 common bins spanning both. 0: the layer looks
    like noise; near 1: its spectrum is far from random.
``max_rand_eval``
    Largest eigenvalue of the shuffled matrix (units of ``lambda_max``).
``ww_softrank``
    ``max_rand_eval / lambda_max``.
``rand_bulk_max``, ``rand_sigma_mp``
    The MP fit of the shuffled spectrum, for plots.

Reproducibility: each layer is shuffled with ``numpy.random.default_rng(SeedSequence([seed,
crc32(name)]))``, so a layer's result depends only on ``seed`` and its name, not on which other
layers were analysed or in what order. Each conv2d slice is shuffled on its own (as WeightWatcher
does) and the slices' eigenvalues pooled.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon

from ..sources import LayerMatrix, layer_matrices
from ..spectra import Spectrum, eigenvalues, esd_matrices, spectrum
from .mp import TW_MARGIN_SIGMAS, fit_mp

__all__ = [
    "layer_rng",
    "shuffle_entries",
    "randomized_eigenvalues",
    "esd_distance",
    "correlation_traps",
    "randomize_hook",
    "find_layer",
    "layer_spectrum",
    "RANDOMIZE_COLUMNS",
    "ESD_DISTANCE_BINS",
]

ESD_DISTANCE_BINS = 100
RANDOMIZE_COLUMNS = [
    "rand_num_spikes", "rand_distance", "max_rand_eval", "ww_softrank",
    "rand_bulk_max", "rand_sigma_mp",
]  # fmt: skip


def layer_rng(seed: int, name: str, part: int = 0) -> np.random.Generator:
    """The generator used to shuffle layer ``name`` for a given ``seed``.

    ``part`` numbers the separate spectra of one layer (unpooled conv2d slices); 0 for the
    first or only one.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    key = [int(seed), zlib.crc32(name.encode())] + ([int(part)] if part else [])
    return np.random.default_rng(np.random.SeedSequence(key))


def _as_numpy(W: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(W, torch.Tensor):
        return W.detach().to("cpu", torch.float64).numpy()
    return np.asarray(W, dtype=np.float64)


def shuffle_entries(W: torch.Tensor | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of the 2-D matrix ``W`` (float64 numpy) with its entries randomly permuted."""
    A = _as_numpy(W)
    if A.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {A.shape}")
    return rng.permutation(A.ravel()).reshape(A.shape)


def randomized_eigenvalues(
    matrices: Sequence[torch.Tensor | np.ndarray],
    rng: np.random.Generator,
    *,
    method: str = "gram",
    device: torch.device | None = None,
) -> np.ndarray:
    """Pooled, ascending eigenvalues of each matrix shuffled independently."""
    if len(matrices) == 0:
        raise ValueError("no matrices to randomize")
    parts = [
        eigenvalues(shuffle_entries(W, rng), method=method, device=device) for W in matrices
    ]
    return np.sort(np.concatenate(parts))


def esd_distance(evals: np.ndarray, rand_evals: np.ndarray, bins: int = ESD_DISTANCE_BINS) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two ESDs as histograms of log10(eigenvalue).

    Only positive eigenvalues enter; both histograms share ``bins`` equal-width bins in log10
    spanning both spectra. NaN if either spectrum has no positive eigenvalue.
    """
    a = np.asarray(evals, dtype=np.float64).ravel()
    b = np.asarray(rand_evals, dtype=np.float64).ravel()
    a = a[np.isfinite(a) & (a > 0)]
    b = b[np.isfinite(b) & (b > 0)]
    if a.size == 0 or b.size == 0:
        return math.nan
    la, lb = np.log10(a), np.log10(b)
    lo, hi = min(la.min(), lb.min()), max(la.max(), lb.max())
    if hi <= lo:
        return 0.0
    edges = np.linspace(lo, hi, bins + 1)
    pa, _ = np.histogram(la, bins=edges)
    pb, _ = np.histogram(lb, bins=edges)
    return float(jensenshannon(pa / pa.sum(), pb / pb.sum(), base=2.0))


def correlation_traps(
    evals: np.ndarray, rand_evals: np.ndarray, N: int, M: int, *, tw_sigmas: float = TW_MARGIN_SIGMAS
) -> dict:
    """The randomize columns from a layer's eigenvalues and its shuffled eigenvalues.

    Parameters
    ----------
    evals, rand_evals : array_like
        Eigenvalues of W and of the shuffled W (same scaling).
    N, M : int
        Larger and smaller side of the (per-slice) matrix.

    Returns
    -------
    dict
        ``rand_num_spikes, rand_distance, max_rand_eval, ww_softrank, rand_bulk_max,
        rand_sigma_mp``.
    """
    ev = np.asarray(evals, dtype=np.float64)
    rev = np.asarray(rand_evals, dtype=np.float64)
    if ev.size == 0 or rev.size == 0:
        raise ValueError("correlation_traps needs non-empty spectra")
    fit = fit_mp(rev, N, M, tw_sigmas=tw_sigmas)
    max_rand = float(rev.max())
    lam_max = float(ev.max())
    return {
        "rand_num_spikes": fit.num_spikes,
        "rand_distance": esd_distance(ev, rev),
        "max_rand_eval": max_rand,
        "ww_softrank": max_rand / lam_max if lam_max > 0 else math.nan,
        "rand_bulk_max": fit.bulk_max,
        "rand_sigma_mp": fit.sigma_mp,
    }


def randomize_hook(
    seed: int = 0,
    *,
    method: str = "gram",
    device: torch.device | None = None,
    tw_sigmas: float = TW_MARGIN_SIGMAS,
) -> Callable:
    """An :func:`frogwatch.analyze` hook adding the correlation-trap columns.

    It shuffles the already-scaled ESD matrices analyze hands it (no second read of the weights).
    A layer whose spectrum is all zeros gets NaN columns.
    """
    layer_rng(seed, "")  # validate the seed now, not inside the loop
    calls: dict[str, int] = {}  # unpooled conv slices: one call per slice, each its own stream

    def randomize(layer: LayerMatrix, matrices: list, spec: Spectrum, fit: Any) -> dict:
        part = calls.get(layer.name, 0)
        calls[layer.name] = part + 1
        rng = layer_rng(seed, layer.name, part)
        rev = randomized_eigenvalues(matrices, rng, method=method, device=device)
        try:
            return correlation_traps(spec.evals, rev, spec.N, spec.M, tw_sigmas=tw_sigmas)
        except ValueError:
            return {c: math.nan for c in RANDOMIZE_COLUMNS}

    return randomize


def find_layer(model: Any, name: str) -> LayerMatrix:
    """The :class:`LayerMatrix` called ``name`` in any model source frogwatch reads."""
    mats = layer_matrices(model)
    for lm in mats:
        if lm.name == name:
            return lm
    close = [lm.name for lm in mats if name.split(".")[-1] in lm.name][:5]
    hint = f"; similar: {', '.join(close)}" if close else ""
    raise ValueError(f"no layer named {name!r} among {len(mats)} weight matrices{hint}")


def layer_spectrum(model: Any, name: str, *, method: str = "gram") -> Spectrum:
    """The spectrum :func:`frogwatch.analyze` computes for layer ``name`` (same scaling)."""
    lm = find_layer(model, name)
    W = lm.load().to(torch.float64)
    return spectrum([m for _, m in esd_matrices(lm, W)], method=method)
