"""FROG selection: which individual weights to fine-tune (docs/method.md#relevance, #budget, #blend).

:func:`select` reads the targeted matrices of any model source one at a time, allocates the budget
over them (Frobenius shares, optionally α-blended), picks each matrix's entries by a score (default
``random``: a seeded random mask; FROG's SVD relevance S and its variants by name), and returns
:class:`~frogwatch.frog.masks.Masks`.

Memory: both strategies hold about one matrix's score (S, or the random draw of the default) at a
time. ``per_matrix`` reads every matrix twice (once for the Frobenius norms that set the budgets,
once for the score; timings on a 1.1B checkpoint in BENCHMARKS.md
section 7). ``global`` reads each matrix
once and keeps a running pool of the best ``T_trainable`` candidates (value, matrix, flat index:
28 bytes each) — merging each matrix's own top candidates into it — so its extra memory is
``O(T_trainable)``, not ``O(T)``.
"""

from __future__ import annotations

import ctypes
import math
import re
import sys
import warnings
from numbers import Integral
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validation import check_choice, check_float, check_int
from ..sources import LayerMatrix, layer_matrices
from .budget import allocate, resolve_budget, topk_flat
from .masks import MaskInfo, Masks
from .scorers import SCORES, SVD_SCORES, matrix_generator, pick, score_matrix
from .scores import (
    METHODS,
    alpha_lookup,
    alpha_multipliers,
    as_matrix,
    check_blend,
    check_direction,
    matrix_importance,
    relevance,
    relevance_2d,
)

__all__ = ["DEFAULT_SCORE", "SCORES", "STRATEGIES", "relevance", "resolve_targets", "select"]

STRATEGIES = ("per_matrix", "global")
#: ``select``'s default score: no data-free score beat a random mask of the same per-matrix counts
#: (benchmarks/results_finetune.md, issue 10), so the default is the seeded random mask.
DEFAULT_SCORE = "random"
TargetSpec = Union[str, Sequence[str], Callable[[str, LayerMatrix], bool]]

# Output heads recognised by name in checkpoints read from files (no module to ask).
_FILE_HEAD_NAMES = ("lm_head", "embed_out")


# --------------------------------------------------------------------------------------------
# Targets and α
# --------------------------------------------------------------------------------------------


def _output_head(model: Any) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if isinstance(model, torch.nn.Module) and callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            return None
        return head if isinstance(head, torch.nn.Module) else None
    return None


def resolve_targets(model: Any, targets: TargetSpec = "all-linear") -> list[LayerMatrix]:
    """The matrices of ``model`` that FROG scores.

    Parameters
    ----------
    model : nn.Module, state dict or path
    targets : "all-linear", regex or list of regexes, or callable(name, LayerMatrix) -> bool
        ``"all-linear"``: every ``nn.Linear`` / Hugging Face ``Conv1D`` (every 2-D non-embedding
        tensor for file sources) except a Hugging Face model's output head
        (``model.get_output_embeddings()``; ``lm_head`` / ``embed_out`` in files). Regexes are
        matched with ``re.search`` against the qualified names and may also pick embeddings and
        conv2d weights. Recurrent (LSTM/GRU) gate matrices are never targets.

    Raises
    ------
    ValueError
        If ``targets`` is malformed or matches nothing.
    """
    lms = [lm for lm in layer_matrices(model) if lm.kind != "rnn"]
    if isinstance(targets, str) and targets == "all-linear":
        head = _output_head(model)
        chosen = [
            lm
            for lm in lms
            if lm.kind in ("dense", "conv1d")
            and not (head is not None and lm.module is head)
            and not (lm.module is None and lm.name.rsplit(".", 1)[-1] in _FILE_HEAD_NAMES)
        ]
        what = "'all-linear'"
    elif callable(targets):
        chosen = [lm for lm in lms if targets(lm.name, lm)]
        what = "the targets callable"
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, Iterable) else None
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                "targets must be 'all-linear', a regex or list of regexes over module names, "
                f"or a callable(name, LayerMatrix) -> bool; got {targets!r}"
            )
        try:
            compiled = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"targets: invalid regex ({e})") from None
        chosen = [lm for lm in lms if any(c.search(lm.name) for c in compiled)]
        what = f"targets {patterns}"
    if not chosen:
        raise ValueError(
            f"{what} matched none of the model's {len(lms)} weight matrices "
            f"(e.g. {[lm.name for lm in lms[:4]]})"
        )
    return chosen


def _alphas(model: Any, names: list[str], alpha: Any, needed: bool, progress: bool) -> np.ndarray:
    if alpha is None:
        if not needed:
            return np.full(len(names), np.nan)
        from ..analyze import analyze  # lazy: the analyzer is only needed for blend > 0

        alpha = analyze(model, progress=progress)
    return alpha_lookup(alpha, names)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _check_choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    check_choice(value, what, "select", allowed)


def _budget_meta(budget: Any) -> float | int:
    return int(budget) if isinstance(budget, Integral) and not isinstance(budget, bool) else float(budget)


def select(
    model: Any,
    budget: float | int = 0.01,
    *,
    strategy: str = "per_matrix",
    targets: TargetSpec = "all-linear",
    blend: float = 0.0,
    alpha: Any = None,
    direction: str = "undertrained-first",
    method: str = "exact",
    rank: int | None = None,
    progress: bool = True,
    score: str = DEFAULT_SCORE,
    random_share: float = 0.0,
    seed: int = 0,
    min_per_matrix: int = 0,
) -> Masks:
    """Choose the weights FROG fine-tunes.

    Parameters
    ----------
    model : nn.Module, state dict, or path
        Any source :func:`frogwatch.sources.layer_matrices` reads; files are streamed one tensor at
        a time.
    budget : float or int
        Fraction ``G`` in (0, 1] of the targeted weights, or an integer count. The number trained
        is ``T_trainable = round(G · T)``, ``T`` = weights in the targeted matrices.
    strategy : {"per_matrix", "global"}
        ``per_matrix`` (docs/method.md#budget): matrix ``i`` gets ``k_i ∝ R_i · m_i`` weights,
        capped at its size with the overflow redistributed, ``Σ k_i = T_trainable`` exactly; then
        its ``k_i`` entries of largest S. ``global`` (docs/method.md#global): the ``T_trainable``
        largest ``S_ij · m_i`` over all targeted matrices at once. Ties are broken by position in
        the concatenation of the targets (matrix order, then flat index), lowest first.
    targets : "all-linear", regex(es), or callable
        See :func:`resolve_targets`.
    blend : float
        λ in [0, 1]: strength of the α multiplier ``m_i`` (docs/method.md#blend); 0 is plain FROG.
    alpha : DataFrame or dict, optional
        Per-layer α (``frogwatch.analyze`` output, or ``{name: alpha}``; NaN = failed fit, which is
        neutral). Computed with ``frogwatch.analyze(model)`` when ``blend > 0`` and not given.
    direction : {"undertrained-first", "overtrained-first"}
        ``undertrained-first`` (default) gives larger-α layers more budget; see
        :func:`~frogwatch.frog.scores.alpha_multipliers` for the map.
    method : {"exact", "randomized", "auto"}
        How S is computed; see :func:`relevance`. Only with the scores ``relevance``, ``balanced``
        and ``normalized`` (ValueError otherwise).
    rank : int, optional
        Rank of a truncated / randomized S (same scores).
    progress : bool
        Show a tqdm progress bar.
    score : {"random", "relevance", "balanced", "normalized", "bulk", "magnitude"}
        Which entries of a matrix are picked (:mod:`frogwatch.frog.scorers`). Default ``"random"``:
        uniformly random entries, seeded by ``seed`` and the matrix name (no SVD is computed). On
        every task of the benchmark no data-free score adapted better than a random mask of the same
        per-matrix counts, and FROG's top-S adapted significantly worse (README "Does FROG help?",
        benchmarks/results_finetune.md). The others: FROG's relevance S (top-k), row- and
        column-balanced top-S (``per_matrix`` only), S divided by its row and column means, S of the
        Marchenko–Pastur bulk (spikes removed), ``|W|``. ``None`` means the default.
        ``Masks.scores`` holds this score of the selected entries (relevance S for ``relevance`` and
        ``balanced``; ``prepare``'s relevance-scaled init computes S itself for the others).
    random_share : float
        Share in [0, 1] of each matrix's count drawn uniformly at random (seeded by ``seed`` and
        the matrix name); the rest is picked by ``score``. With ``global``, ``round(ρ·T_trainable)``
        random entries are spread over the matrices in proportion to their sizes.
    seed : int
        Seed of the ``random`` score (the default) and of ``random_share``.
    min_per_matrix : int
        Every targeted matrix gets at least ``min(min_per_matrix, size)`` entries. With ``global``
        these are each matrix's top entries and the rest of the budget is ranked globally. When a
        matrix gets nothing and no floor is set, a warning says how many.

    Returns
    -------
    Masks
    """
    _check_choice(strategy, STRATEGIES, "strategy")
    _check_choice(method, METHODS, "method")
    if score is None:
        score = DEFAULT_SCORE
    score = check_choice(score, "score", "select", SCORES)
    rho = check_float(random_share, "random_share", "select", low=0.0, high=1.0)
    seed = check_int(seed, "seed", "select")
    floor = check_int(min_per_matrix, "min_per_matrix", "select", low=0)
    if (method != "exact" or rank is not None) and score not in ("relevance", "balanced", "normalized"):
        raise ValueError(
            f"select: method and rank set how S is computed; score {score!r} uses no truncated S "
            "(pass score='relevance', 'balanced' or 'normalized')"
        )
    if score == "balanced" and strategy != "per_matrix":
        raise ValueError("select: score 'balanced' needs strategy='per_matrix' (its caps are per matrix)")
    lam = check_blend(blend)
    check_direction(direction)
    lms = resolve_targets(model, targets)
    names = [lm.name for lm in lms]
    sizes = np.array([lm.size for lm in lms], dtype=np.int64)
    total = resolve_budget(budget, int(sizes.sum()))
    if int(np.minimum(sizes, floor).sum()) > total:
        raise ValueError(
            f"select: min_per_matrix must be at most {total // len(lms)} for a budget of {total:,} weights over "
            f"{len(lms)} matrices, got {floor!r}"
        )
    alphas = _alphas(model, names, alpha, lam > 0, progress)
    mult = alpha_multipliers(alphas, lam, direction)

    how = _How(score, rho, seed, floor, method, rank)
    run = _select_per_matrix if strategy == "per_matrix" else _select_global
    norms, energies, indices, scores, sums = run(lms, sizes, total, mult, how, progress)
    starved = [lm.name for lm, idx in zip(lms, indices) if idx.numel() == 0]
    if starved:
        warnings.warn(
            f"select: {len(starved)} of {len(lms)} targeted matrices got no weights ({strategy}, "
            f"e.g. {starved[:3]}); pass min_per_matrix=N to give each at least N",
            stacklevel=2,
        )

    R = matrix_importance(norms)
    w = R * mult
    importance = w / w.sum() if w.sum() > 0 else R
    infos = [
        MaskInfo(
            name=lm.name,
            kind=lm.kind,
            shape=tuple(int(s) for s in lm.shape),
            R=float(R[i]),
            importance=float(importance[i]),
            alpha=float(alphas[i]),
            multiplier=float(mult[i]),
            energy=float(energies[i]),
            score_sum=float(sums[i]),
        )
        for i, lm in enumerate(lms)
    ]
    return Masks(
        infos,
        indices,
        scores,
        strategy=strategy,
        budget=_budget_meta(budget),
        n_trainable=int(total),
        blend=lam,
        direction=direction,
        method=method,
        rank=None if rank is None else int(rank),
        score=score,
        random_share=rho,
        seed=seed,
        min_per_matrix=floor,
    )


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Scoring allocates and frees several matrix-sized float64 buffers per matrix. Below glibc's
    32 MiB mmap ceiling they come from the heap, which keeps them: without a trim the resident
    memory of a GPT-2-small run climbs by hundreds of MiB although nothing is live.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or another libc
            pass


def _bar(items: Sequence, desc: str, progress: bool):
    return tqdm(items, desc=desc, unit="matrix", disable=not progress, leave=False)


class _How:
    """Within-matrix settings shared by both strategies."""

    def __init__(self, score: str, rho: float, seed: int, floor: int, method: str, rank: int | None) -> None:
        self.score, self.rho, self.seed, self.floor, self.method, self.rank = score, rho, seed, floor, method, rank

    def values(self, W: torch.Tensor, name: str) -> tuple[torch.Tensor, float]:
        return score_matrix(W, self.score, name=name, seed=self.seed, method=self.method, rank=self.rank)

    def generator(self, name: str) -> torch.Generator:
        # A different stream from the `random` score's (which uses `seed` itself).
        return matrix_generator(self.seed + 1_000_003, name)


def _select_per_matrix(lms, sizes, total, mult, how, progress):
    n = len(lms)
    norms = np.array(
        [float(torch.linalg.vector_norm(as_matrix(lm.load(), lm.name))) for lm in _bar(lms, "frog norms", progress)]
    )
    k = allocate(matrix_importance(norms) * mult, sizes, total, minimum=how.floor)
    energies = np.full(n, np.nan)
    sums = np.zeros(n)
    indices: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    for i, lm in enumerate(_bar(lms, "frog select", progress)):
        if k[i] == 0:
            indices.append(torch.zeros(0, dtype=torch.int64))
            scores.append(torch.zeros(0))
            continue
        V, energies[i] = how.values(as_matrix(lm.load(), lm.name), lm.name)
        sel = pick(V, int(k[i]), balanced=how.score == "balanced", random_share=how.rho,
                   generator=how.generator(lm.name))
        indices.append(sel)
        scores.append(V.reshape(-1)[sel])
        sums[i] = float(scores[-1].sum())
        del V
        _release_memory()
    return norms, energies, indices, scores, sums


def _select_global(lms, sizes, total, mult, how, progress):
    n = len(lms)
    norms = np.zeros(n)
    energies = np.zeros(n)
    # Random share: spread over the matrices in proportion to their sizes.
    n_rand = int(np.floor(how.rho * total + 0.5))
    k_rand = allocate(sizes.astype(np.float64), sizes, n_rand) if n_rand else np.zeros(n, dtype=np.int64)
    fixed: list[torch.Tensor] = []  # per matrix: random entries + floor entries (always selected)
    fixed_val: list[torch.Tensor] = []
    floors = np.minimum(sizes - k_rand, how.floor)
    pool_total = total - n_rand - int(floors.sum())
    if pool_total < 0:
        raise ValueError(
            f"select: min_per_matrix {how.floor} plus random_share {how.rho} need more than the "
            f"{total:,} weights of the budget"
        )
    # Running pool of the best `pool_total` candidates so far, kept in concatenation order.
    pool_raw = torch.zeros(0, dtype=torch.float64)
    pool_val = torch.zeros(0, dtype=torch.float64)
    pool_mat = torch.zeros(0, dtype=torch.int32)
    pool_idx = torch.zeros(0, dtype=torch.int64)
    for i, lm in enumerate(_bar(lms, "frog select", progress)):
        W = as_matrix(lm.load(), lm.name)
        norms[i] = float(torch.linalg.vector_norm(W))
        S, energies[i] = how.values(W, lm.name)
        del W
        raw = S.reshape(-1)
        val = raw * float(mult[i])
        base = pick(S, int(k_rand[i] + floors[i]), random_share=k_rand[i] / max(k_rand[i] + floors[i], 1),
                    generator=how.generator(lm.name)) if k_rand[i] + floors[i] else torch.zeros(0, dtype=torch.int64)
        fixed.append(base)
        fixed_val.append(raw[base])
        if base.numel():
            val = val.clone()
            val[base] = -math.inf
        cand = topk_flat(val, min(pool_total, raw.numel() - base.numel()))
        pool_raw = torch.cat([pool_raw, raw[cand]])
        pool_val = torch.cat([pool_val, val[cand]])
        pool_mat = torch.cat([pool_mat, torch.full((cand.numel(),), i, dtype=torch.int32)])
        pool_idx = torch.cat([pool_idx, cand])
        del S, raw, val
        if pool_val.numel() > pool_total:
            keep = topk_flat(pool_val, pool_total)
            pool_raw, pool_val, pool_mat, pool_idx = (t[keep] for t in (pool_raw, pool_val, pool_mat, pool_idx))
        _release_memory()
    indices, scores = [], []
    sums = np.zeros(n)
    for i in range(n):
        sel = pool_mat == i
        idx = torch.cat([fixed[i], pool_idx[sel]])
        val = torch.cat([fixed_val[i], pool_raw[sel]])
        order = torch.argsort(idx)
        indices.append(idx[order])
        scores.append(val[order])
        sums[i] = float(val.sum())
    return norms, energies, indices, scores, sums
