"""Methods compared by the benchmark, at equal trainable-parameter budgets.

Every sparse method trains ``T_trainable = round(G · T)`` weights of the targeted matrices with the
same engine (``frogwatch.frog.model.prepare``: W0 frozen, a trainable delta on the selected
entries); they differ only in *which* entries are selected:

==================  ===========================================================================
``frog_pm``         FROG per-matrix: ``select(strategy="per_matrix")`` — k_i ∝ R(W_i) = ‖W_i‖_F
                    share, top-k_i relevance S = |U| diag(σ) |V|ᵀ in each matrix.
``frog_global``     FROG global: the top ``T_trainable`` of S over all targeted matrices.
``frog_blend_under`` FROG per-matrix with the α blend, λ = :data:`BLEND`, undertrained-first
                    (larger α, more budget).
``frog_blend_over`` the same, overtrained-first (smaller α, more budget).
``frog_init``       ``frog_pm`` with relevance-scaled init ``δ(0) = init_scale · S · N(0, 1)``.
``frog_noise``      ``frog_pm`` with dynamic noise ``noise_scale · S · N(0, 1)`` on frozen entries.
``frog_init_noise`` both.
``random``          k_i as ``frog_pm`` (Frobenius allocation), entries uniformly at random.
``magnitude``       k_i as ``frog_pm``, the top-k_i |W_ij|.
``lift``            k_i as ``frog_pm``, the top-k_i |(U_r Σ_r V_rᵀ)_ij| (LIFT-style "principal
                    weights" of a rank-r approximation), r = ``lift_rank(m, n)`` = ⌈min(m, n)/16⌉.
``default``         exactly ``frogwatch.select(model, budget)`` with every default (then
                    ``prepare`` with its defaults): whatever the package ships.
``balanced``        ``select(score="balanced")``: row- and column-balanced top-S.
``normalized``      ``select(score="normalized")``: S / (row mean · column mean).
``bulk``            ``select(score="bulk")``: S of the Marchenko–Pastur bulk (spikes removed).
``mix50``           ``select(random_share=0.5)``: half of each k_i random, half top-S.
``sel_random``      ``select(score="random", seed=seed)``: the package's seeded random mask.
``sel_random0``     ``select(score="random")`` with select's default seed (the same mask for every
                    run seed): what ``default`` is when the package's default score is ``random``.
``<x>_blend_under`` ``<x>`` with the α blend λ = :data:`BLEND`, undertrained-first / ``_over``.
``grad``            data-aware reference (SIFT / SpIEL style): k_i as ``frog_pm``, the top-k_i
                    Σ|∂L/∂W_ij| accumulated over :data:`GRAD_BATCHES` training batches of the
                    pretrained model (a generator separate from the training order).
==================  ===========================================================================

``random``, ``magnitude`` and ``lift`` use exactly FROG per-matrix's k_i, so against ``frog_pm``
only the within-matrix criterion differs.

Other methods:

* ``lora`` — PEFT LoRA on the same modules, ``lora_alpha = 2r``, no dropout, rank
  ``r = max(1, round(G · T / Σ_i (m_i + n_i)))``: the rank whose parameter count ``r Σ (m + n)``
  is closest to the budget. A rank cannot go below 1, so at small budgets LoRA trains *more* than
  the budget (the ``trainable`` column says how many; the report flags it).
* ``full`` — every parameter of the model (biases, norms and embeddings included).
* ``pretrained`` — no training (reference: the starting point).
* ``head_only`` — only the task's new head (``Problem.always_trainable``), for the MiniLM task.

The small ``init_scale`` and ``noise_scale`` are calibrated per task (:func:`calibrated_scale`):
``c · rms(W) / mean(S)`` over the targeted matrices with ``c =`` :data:`ABLATION_C`, so that a unit
of S-scaled noise is about ``c`` times a typical weight. (S grows like √n relative to |W| for wide
matrices, so one raw number would mean very different things on a 10-wide head and a 1536-wide
MiniLM layer.) The raw value used is written into the CSV's ``config`` column.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from frogwatch.frog.budget import allocate, resolve_budget, topk_flat
from frogwatch.frog.model import merge, prepare
from frogwatch.frog.scores import matrix_importance
from frogwatch.frog.select import relevance, select

from train import Problem

__all__ = ["ABLATION_C", "BLEND", "METHODS", "Method", "calibrated_scale", "lift_rank", "lora_rank"]

BLEND = 0.5  # λ of the α-blended variants
GRAD_BATCHES = 4  # batches of the data-aware gradient-magnitude reference
ABLATION_C = 0.1  # "small" init / noise: c · rms(W) / mean(S)

MaskDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# helpers on the pretrained model (memoised in problem.cache)
# --------------------------------------------------------------------------------------------


def _exact(names: list[str]) -> list[str]:
    """Regexes that match exactly these qualified module names."""
    return [f"^{re.escape(n)}$" for n in names]


def _alpha(problem: Problem):
    """α per targeted matrix from ``frogwatch.analyze`` of the pretrained model (memoised)."""
    if "alpha" not in problem.cache:
        from frogwatch import analyze

        problem.cache["alpha"] = analyze(problem.model, progress=False)
    return problem.cache["alpha"]


def _relevance(problem: Problem) -> dict[str, torch.Tensor]:
    """Exact FROG relevance S of every targeted matrix (float64, memoised)."""
    if "S" not in problem.cache:
        problem.cache["S"] = {
            name: relevance(m.weight.detach()) for name, m in problem.target_modules().items()
        }
    return problem.cache["S"]


def frobenius_counts(problem: Problem, budget: float) -> dict[str, int]:
    """FROG per-matrix budgets k_i (R = Frobenius share, capped, summing to round(G·T))."""
    mods = problem.target_modules()
    norms = np.array([float(torch.linalg.vector_norm(m.weight.detach().double())) for m in mods.values()])
    sizes = np.array([m.weight.numel() for m in mods.values()], dtype=np.int64)
    k = allocate(matrix_importance(norms), sizes, resolve_budget(float(budget), int(sizes.sum())))
    return {name: int(ki) for name, ki in zip(mods, k)}


def calibrated_scale(problem: Problem, c: float = ABLATION_C) -> float:
    """``c · rms(W) / mean(S)`` over the targeted matrices (the "small" init / noise scale)."""
    key = ("scale", c)
    if key not in problem.cache:
        S = _relevance(problem)
        W = [m.weight.detach().double() for m in problem.target_modules().values()]
        n = sum(w.numel() for w in W)
        rms = math.sqrt(sum(float(w.pow(2).sum()) for w in W) / n)
        mean_s = sum(float(s.sum()) for s in S.values()) / n
        problem.cache[key] = c * rms / mean_s
    return problem.cache[key]


def lift_rank(m: int, n: int) -> int:
    """Rank r of the LIFT-style low-rank approximation: ⌈min(m, n) / 16⌉ (not tuned)."""
    return max(1, math.ceil(min(m, n) / 16))


def lora_rank(problem: Problem, budget: float) -> int:
    """LoRA rank matched to the budget: ``max(1, round(G·T / Σ(m + n)))``."""
    per_rank = sum(sum(m.weight.shape) for m in problem.target_modules().values())
    return max(1, round(budget * problem.n_targeted() / per_rank))


# --------------------------------------------------------------------------------------------
# mask builders: (problem, budget, seed) -> {name: bool mask}
# --------------------------------------------------------------------------------------------


def _topk_masks(problem: Problem, budget: float, score: Callable[[str, torch.Tensor], torch.Tensor]) -> MaskDict:
    counts = frobenius_counts(problem, budget)
    masks: MaskDict = {}
    for name, mod in problem.target_modules().items():
        W = mod.weight.detach()
        flat = torch.zeros(W.numel(), dtype=torch.bool)
        flat[topk_flat(score(name, W).reshape(-1), counts[name])] = True
        masks[name] = flat.reshape(W.shape)
    return masks


def frog_masks(problem: Problem, budget: float, seed: int, *, strategy: str = "per_matrix",
               blend: float = 0.0, direction: str = "undertrained-first") -> Mapping[str, torch.Tensor]:
    """FROG's own selection (``frogwatch.frog.select.select``)."""
    return select(
        problem.model,
        float(budget),
        strategy=strategy,
        score="relevance",
        targets=_exact(problem.targets),
        blend=blend,
        alpha=_alpha(problem) if blend > 0 else None,
        direction=direction,
        progress=False,
    )


def select_masks(problem: Problem, budget: float, seed: int, *, seeded: bool = False, **kwargs) -> Mapping[str, torch.Tensor]:
    """``frogwatch.frog.select.select`` with ``kwargs`` (``seeded=True`` passes the run's seed)."""
    if seeded:
        kwargs["seed"] = seed
    if kwargs.get("blend", 0.0) > 0:
        kwargs["alpha"] = _alpha(problem)
    return select(problem.model, float(budget), targets=_exact(problem.targets), progress=False, **kwargs)


def default_masks(problem: Problem, budget: float, seed: int) -> Mapping[str, torch.Tensor]:
    """Exactly what ``frogwatch.select(model, budget)`` returns with its defaults."""
    return select(problem.model, float(budget), targets=_exact(problem.targets), progress=False)


def grad_masks(problem: Problem, budget: float, seed: int) -> MaskDict:
    """Top-k_i accumulated |gradient| over a few batches of the pretrained model (data-aware)."""
    key = ("grad", seed)
    if key not in problem.cache:
        import copy

        model = copy.deepcopy(problem.model).train()
        mods = problem.target_modules(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for m in mods.values():
            m.weight.requires_grad_(True)
        gen = torch.Generator().manual_seed(424_242 + seed)
        acc = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in mods.items()}
        for _ in range(GRAD_BATCHES):
            model.zero_grad(set_to_none=True)
            problem.loss(model, problem.train_batch(gen)).backward()
            for n, m in mods.items():
                acc[n] += m.weight.grad.detach().abs().double()
        problem.cache[key] = acc
    acc = problem.cache[key]
    return _topk_masks(problem, budget, lambda name, W: acc[name])


def random_masks(problem: Problem, budget: float, seed: int) -> MaskDict:
    """Uniformly random entries, FROG per-matrix's k_i."""
    gen = torch.Generator().manual_seed(7919 * (seed + 1))
    return _topk_masks(problem, budget, lambda name, W: torch.rand(W.shape, generator=gen, dtype=torch.float64))


def magnitude_masks(problem: Problem, budget: float, seed: int) -> MaskDict:
    """Top-k_i |W_ij| (FROG per-matrix's k_i)."""
    return _topk_masks(problem, budget, lambda name, W: W.abs().double())


def _low_rank_abs(W: torch.Tensor) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = lift_rank(*W.shape)
    return (U[:, :r] * s[:r] @ Vh[:r]).abs()


def lift_masks(problem: Problem, budget: float, seed: int) -> MaskDict:
    """LIFT-style: top-k_i |U_r Σ_r V_rᵀ| with r = :func:`lift_rank` (FROG per-matrix's k_i)."""
    return _topk_masks(problem, budget, lambda name, W: _low_rank_abs(W))


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def _is_head(name: str, problem: Problem) -> bool:
    """Whether a parameter belongs to the task's always-trained head (PEFT prefix ignored)."""
    return bool(problem.always_trainable) and name.removeprefix("base_model.model.").startswith(problem.always_trainable)


def _set_always_trainable(model: nn.Module, problem: Problem) -> None:
    for name, p in model.named_parameters():
        if _is_head(name, problem):
            p.requires_grad_(True)


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: how to make a model copy trainable, and how to get a plain model back.

    Attributes
    ----------
    name : str
    family : {"sparse", "lora", "full", "head", "none"}
        Selects the learning-rate grid; ``none`` is not trained.
    masks : callable(problem, budget, seed) -> mapping, optional
        For ``sparse`` methods.
    init_c, noise_c : float
        Relative init / noise scale (0: off), see :func:`calibrated_scale`.
    budgeted : bool
        Whether the method runs at every budget (False: one row, budget 1.0 or 0.0).
    """

    name: str
    family: str
    masks: Callable[..., Mapping[str, torch.Tensor]] | None = None
    init_c: float = 0.0
    noise_c: float = 0.0
    budgeted: bool = True
    description: str = field(default="", compare=False)

    def config(self, problem: Problem, budget: float) -> str:
        """Hyper-parameters beyond lr, as a short string for the CSV."""
        if self.family == "sparse":
            parts = []
            if self.init_c:
                parts.append(f"init_scale={calibrated_scale(problem, self.init_c):.3g}")
            if self.noise_c:
                parts.append(f"noise_scale={calibrated_scale(problem, self.noise_c):.3g}")
            return ";".join(parts)
        if self.family == "lora":
            r = lora_rank(problem, budget)
            return f"r={r};lora_alpha={2 * r}"
        return ""

    def attach(self, model: nn.Module, problem: Problem, budget: float, seed: int):
        """Make ``model`` (a deep copy of the pretrained one) trainable the method's way.

        Returns ``(model, trainable, extra_buffers)``: the model to train, the number of trainable
        parameters counted against the budget, and buffers the method adds (for ``state_mb``).
        """
        if self.family == "sparse":
            key = ("masks", self.name if not (self.init_c or self.noise_c) else "frog_pm", budget, seed)
            if key not in problem.cache:
                problem.cache[key] = self.masks(problem, budget, seed)
            masks = problem.cache[key]
            # Without init or noise, prepare with its defaults (``default`` is then exactly the package's
            # select + prepare); the seed only matters for init and noise.
            extra = {} if not (self.init_c or self.noise_c) else dict(
                init_scale=calibrated_scale(problem, self.init_c) if self.init_c else 0.0,
                noise_scale=calibrated_scale(problem, self.noise_c) if self.noise_c else 0.0,
                seed=seed,
            )
            prepare(model, masks, **extra)
            _set_always_trainable(model, problem)
            trainable = sum(int(m.sum()) for m in masks.values())
            # FROG's buffers live in each layer's ``frog`` child: indices and the noise codes
            extra = [b for n, b in model.named_buffers() if ".frog." in f".{n}"]
            return model, trainable, extra
        if self.family == "lora":
            from peft import LoraConfig, get_peft_model

            r = lora_rank(problem, budget)
            cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(problem.targets), bias="none")
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, cfg)
            _set_always_trainable(peft_model, problem)
            trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad)
            return peft_model, trainable, []
        if self.family == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            trainable = sum(p.numel() for n, p in model.named_parameters() if not _is_head(n, problem))
            return model, trainable, []
        if self.family in ("head", "none"):
            for p in model.parameters():
                p.requires_grad_(False)
            if self.family == "head":
                _set_always_trainable(model, problem)
            return model, 0, []
        raise ValueError(f"unknown family {self.family!r}")

    def finalize(self, model: nn.Module) -> nn.Module:
        """A plain model (no frogwatch / PEFT modules) with the trained weights merged in."""
        if self.family == "sparse":
            return merge(model)
        if self.family == "lora":
            return model.merge_and_unload()
        return model


_frog_pm = partial(frog_masks, strategy="per_matrix")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("frog_pm", "sparse", _frog_pm, description="FROG per-matrix"),
        Method("frog_global", "sparse", partial(frog_masks, strategy="global"), description="FROG global"),
        Method("frog_blend_under", "sparse", partial(frog_masks, blend=BLEND, direction="undertrained-first"),
               description=f"FROG + α blend λ={BLEND}, undertrained-first"),
        Method("frog_blend_over", "sparse", partial(frog_masks, blend=BLEND, direction="overtrained-first"),
               description=f"FROG + α blend λ={BLEND}, overtrained-first"),
        Method("frog_init", "sparse", _frog_pm, init_c=ABLATION_C, description="FROG + relevance-scaled init"),
        Method("frog_noise", "sparse", _frog_pm, noise_c=ABLATION_C, description="FROG + dynamic noise"),
        Method("frog_init_noise", "sparse", _frog_pm, init_c=ABLATION_C, noise_c=ABLATION_C,
               description="FROG + init + noise"),
        Method("random", "sparse", random_masks, description="random mask"),
        Method("magnitude", "sparse", magnitude_masks, description="top-|W| mask"),
        Method("lift", "sparse", lift_masks, description="LIFT-style top-|W_r| mask"),
        Method("lora", "lora", description="PEFT LoRA, rank matched to the budget"),
        Method("default", "sparse", default_masks, description="frogwatch.select() defaults"),
        Method("balanced", "sparse", partial(select_masks, score="balanced"), description="row/column-balanced top-S"),
        Method("normalized", "sparse", partial(select_masks, score="normalized"), description="S / (row·column scale)"),
        Method("bulk", "sparse", partial(select_masks, score="bulk"), description="S of the MP bulk"),
        Method("mix50", "sparse", partial(select_masks, random_share=0.5, seeded=True), description="50 % random + top-S"),
        Method("sel_random", "sparse", partial(select_masks, score="random", seeded=True), description="select(score='random')"),
        Method("sel_random0", "sparse", partial(select_masks, score="random"), description="select(score='random'), default seed"),
        Method("grad", "sparse", grad_masks, description="data-aware: top accumulated |grad|"),
        *[Method(f"{x}_blend_{d.split('-')[0][:-7]}", "sparse",
                 partial(select_masks, blend=BLEND, direction=d, **kw), description=f"{x} + α blend, {d}")
          for x, kw in (("balanced", {"score": "balanced"}), ("mix50", {"random_share": 0.5, "seeded": True}),
                        ("sel_random", {"score": "random", "seeded": True}))
          for d in ("undertrained-first", "overtrained-first")],
        Method("full", "full", budgeted=False, description="full fine-tuning"),
        Method("pretrained", "none", budgeted=False, description="no fine-tuning"),
        Method("head_only", "head", budgeted=False, description="new head only"),
    )
}

#: Variants compared against plain FROG per-matrix (the ablations).
FROG_VARIANTS = ("frog_global", "frog_blend_under", "frog_blend_over", "frog_init", "frog_noise", "frog_init_noise")
#: Baselines compared against FROG per-matrix.
BASELINES = ("random", "magnitude", "lift", "lora", "full")
