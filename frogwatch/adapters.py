"""Spectral analysis of LoRA adapters (PEFT), alone or merged with their base.

A LoRA adapter on a layer ``W`` (``out x in``) adds ``dW = s B A`` with ``A`` (``r x in``), ``B``
(``out x r``) and ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). ``dW`` has rank
at most ``r``, so the eigenvalues of ``dW^T dW`` are ``r`` numbers and zeros. They are computed
without forming ``dW``: with thin QR factorisations ``B = Q_B R_B`` and ``A^T = Q_A R_A``,
``dW = s Q_B (R_B R_A^T) Q_A^T``, so the singular values of ``dW`` are those of the ``r x r``
core ``s R_B R_A^T`` - ``O((out + in) r^2)`` work instead of ``O(out in min(out, in))``.

* ``analyze(model, peft=True)`` (:func:`analyze_adapters`): one row per adapter, the ESD of
  ``dW`` alone (``num_evals = r``; the fit uses the small-sample estimator, so it needs
  ``r >= 8``; smaller ranks get norms but ``status == "failed"``). Columns as in
  :func:`frogwatch.analyze` plus ``adapter`` and ``lora_rank``.
* ``analyze(model, peft="merged")``: the dense ``W + dW`` of every adapted layer, analysed exactly
  as :func:`frogwatch.analyze` would the merged model.

FROG delta files (:func:`frogwatch.save_delta`) are read the same way: ``peft=True`` analyses each
layer's sparse update ``dW`` (the saved values scattered at the saved indices; it has no low-rank
shortcut, so ``dW`` is formed one layer at a time), ``peft="merged"`` the fine-tuned ``W0 + dW``
with ``base=`` the model the delta was trained from.

``model`` is a PEFT model (any ``nn.Module`` holding PEFT ``LoraLayer`` modules), a FROG delta
``.safetensors`` file, or an adapter directory saved by ``save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors``/``.bin``); merging an adapter directory needs ``base=`` (any source
:func:`frogwatch.analyze` reads, whose layer names match the adapter's). DoRA adapters are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .sources import SourceError, natural_key

__all__ = ["LoraFactor", "lora_factors", "adapter_eigenvalues", "analyze_adapters", "frog_delta_weights"]

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactor:
    """One adapter on one layer: ``dW = scaling * B @ A`` (``B``: out x r, ``A``: r x in)."""

    name: str
    adapter: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False  # True: the base weight is stored (in x out), e.g. HF Conv1D

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def adapter_eigenvalues(A: torch.Tensor | np.ndarray, B: torch.Tensor | np.ndarray, scaling: float = 1.0) -> np.ndarray:
    """Non-zero spectrum of ``dW = scaling * B A``: the ``r`` eigenvalues of ``dW^T dW``, ascending.

    Parameters
    ----------
    A : (r, in), B : (out, r)

    Returns
    -------
    (r,) float64, the squared singular values of ``dW`` (from the ``r x r`` core, no dense ``dW``).
    """
    A = np.asarray(A.detach().to(torch.float64).cpu() if isinstance(A, torch.Tensor) else A, np.float64)
    B = np.asarray(B.detach().to(torch.float64).cpu() if isinstance(B, torch.Tensor) else B, np.float64)
    Rb = np.linalg.qr(B, mode="r")
    Ra = np.linalg.qr(A.T, mode="r")
    s = np.linalg.svd(scaling * (Rb @ Ra.T), compute_uv=False)
    return np.sort(s**2)


def _strip(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _module_factors(model: nn.Module) -> list[LoraFactor]:
    out = []
    for mname, m in model.named_modules():
        la, lb, sc = getattr(m, "lora_A", None), getattr(m, "lora_B", None), getattr(m, "scaling", None)
        if not isinstance(la, nn.ModuleDict) or not isinstance(lb, nn.ModuleDict) or not isinstance(sc, dict):
            continue
        for adapter in la.keys():
            if adapter not in lb:
                continue
            if getattr(m, "use_dora", {}).get(adapter, False):
                raise SourceError(f"{mname}: DoRA adapters are not supported (their update is not B.A alone)")
            A, B = la[adapter].weight, lb[adapter].weight
            if A.dim() != 2:
                continue  # LoRA on a conv layer: not analysed
            out.append(LoraFactor(_strip(mname), adapter, A.detach(), B.detach(), float(sc[adapter]),
                                  bool(getattr(m, "fan_in_fan_out", False))))  # fmt: skip
    return out


def _pattern_value(pattern: dict, name: str, default):
    for key, value in (pattern or {}).items():
        if re.search(rf"(^|\.){re.escape(key)}$", name) or re.fullmatch(key, name):
            return value
    return default


def _directory_factors(root: Path) -> list[LoraFactor]:
    cfg_path = root / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"{root}: not a PEFT adapter directory ({e})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise SourceError(f"{root}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise SourceError(f"{root}: DoRA adapters are not supported (their update is not B.A alone)")
    if (root / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(root / "adapter_model.safetensors"))
    elif (root / "adapter_model.bin").is_file():
        sd = torch.load(str(root / "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise SourceError(f"{root}: no adapter_model.safetensors or adapter_model.bin")
    out = []
    for key in sorted(sd, key=natural_key):
        m = re.fullmatch(r"(.*)\.lora_A(?:\.([^.]+))?\.weight", key)
        if not m:
            continue
        base, adapter = m.group(1), m.group(2) or "default"
        bkey = key.replace(".lora_A", ".lora_B")
        if bkey not in sd or sd[key].dim() != 2:
            continue
        name = _strip(base)
        r = int(_pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", sd[key].shape[0])))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", r)))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out.append(LoraFactor(name, adapter, sd[key], sd[bkey], scaling, bool(cfg.get("fan_in_fan_out", False))))
    return out


def lora_factors(model: Any) -> list[LoraFactor]:
    """Every LoRA adapter of a PEFT model or adapter directory, in module order."""
    if isinstance(model, nn.Module):
        factors = _module_factors(model)
    elif isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        factors = _directory_factors(Path(model))
    else:
        raise SourceError(f"peft analysis needs a PEFT model or an adapter directory, got {type(model).__name__}")
    if not factors:
        raise SourceError("no LoRA adapter found (expected PEFT LoraLayer modules or lora_A/lora_B tensors)")
    return factors


def _delta(f: LoraFactor) -> torch.Tensor:
    d = f.scaling * (f.B.to(torch.float64) @ f.A.to(torch.float64))
    return d.T if f.fan_in_fan_out else d


def _is_frog_delta(model: Any) -> bool:
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(model), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "frogwatch.delta"
    except Exception:  # not a safetensors file
        return False


def frog_delta_weights(path: Any, base: Any = None) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": dW}`` (or ``W0 + dW`` with ``base``) of a FROG delta file, float64."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        layers = json.loads((f.metadata() or {})["layers"])
        parts = {n: (f.get_tensor(f"{n}.frog_indices"), f.get_tensor(f"{n}.frog_delta")) for n in layers}
    bl = None
    if base is not None:
        from .sources import layer_matrices

        bl = {lm.name: lm for lm in layer_matrices(base)}
    out = {}
    for name, info in layers.items():
        idx, val = parts[name]
        if bl is not None:
            if name not in bl or tuple(bl[name].shape) != tuple(info["shape"]):
                raise SourceError(f"base model has no layer {name!r} of shape {tuple(info['shape'])} for the delta")
            W = bl[name].load().to(torch.float64).clone()
        else:
            W = torch.zeros(info["shape"], dtype=torch.float64)
        W.view(-1).index_add_(0, idx.long(), val.to(torch.float64))
        out[f"{name}.weight"] = W
    return out


def analyze_adapters(model: Any, *, merged: bool = False, base: Any = None, **analyze_kwargs) -> pd.DataFrame:
    """Spectral diagnostics of each LoRA adapter (``merged=False``) or of each merged layer.

    Parameters
    ----------
    model : PEFT model or adapter directory
    merged : bool
        ``False``: the ESD of ``dW = s B A`` alone, from the ``r x r`` problem. ``True``: the
        ESD of ``W + dW`` (dense), as :func:`frogwatch.analyze` computes it.
    base : source, optional
        Base weights for ``merged=True`` with an adapter directory (a PEFT model has its own).
    **analyze_kwargs
        ``fit``, ``fix_fingers``, ``xmax`` for the fits; with ``merged=True`` anything
        :func:`frogwatch.analyze` takes.

    Returns
    -------
    pandas.DataFrame
        One row per adapter: ``layer_id``, ``name`` (the adapted layer), ``adapter``,
        ``lora_rank``, then :func:`frogwatch.analyze`'s columns.
    """
    from .analyze import COLUMNS, analyze
    from .metrics import layer_metrics
    from .powerlaw_fit import fit_power_law
    from .spectra import Spectrum, _rank_from_evals

    kw = {k: v for k, v in analyze_kwargs.items() if k not in ("peft",)}
    if _is_frog_delta(model):
        if merged and base is None:
            raise ValueError("analyze(peft='merged') on a FROG delta file needs base= (the base model)")
        return analyze(frog_delta_weights(model, base if merged else None), **kw)
    factors = lora_factors(model)
    if merged:
        weights: dict[str, torch.Tensor] = {}
        if isinstance(model, nn.Module):
            mods = dict(model.named_modules())
            for f in factors:
                full = next(n for n in mods if _strip(n) == f.name)
                W = mods[full].base_layer.weight.detach().to(torch.float64)
                weights[f"{f.name}[{f.adapter}].weight"] = W + _delta(f)
        else:
            if base is None:
                raise ValueError("analyze(peft='merged') on an adapter directory needs base= (the base model)")
            from .sources import layer_matrices

            bl = {lm.name: lm for lm in layer_matrices(base)}
            for f in factors:
                if f.name not in bl:
                    raise SourceError(f"base model has no layer {f.name!r} for the adapter")
                weights[f"{f.name}[{f.adapter}].weight"] = bl[f.name].load().to(torch.float64) + _delta(f)
        df = analyze(weights, **kw)
        df.insert(2, "adapter", [n[n.rindex("[") + 1 : -1] for n in df["name"]])
        df["name"] = [n[: n.rindex("[")] for n in df["name"]]
        rank = {(f.name, f.adapter): f.rank for f in factors}
        df.insert(3, "lora_rank", [rank[(n, a)] for n, a in zip(df["name"], df["adapter"])])
        return df
    fit_kw = {k: analyze_kwargs[k] for k in ("fit", "fix_fingers", "xmax") if k in analyze_kwargs}
    rows = []
    for i, f in enumerate(factors):
        ev = adapter_eigenvalues(f.A, f.B, f.scaling)
        out_dim, in_dim = f.B.shape[0], f.A.shape[1]
        N, M = max(out_dim, in_dim), min(out_dim, in_dim)
        spec = Spectrum(evals=ev, N=N, M=M, rank=_rank_from_evals(ev, N, "gram"),
                        sv_max=float(math.sqrt(ev[-1])), sv_min=float(math.sqrt(ev[0])))  # fmt: skip
        result = fit_power_law(ev, **fit_kw)
        row = {"layer_id": i, "name": f.name, "adapter": f.adapter, "lora_rank": f.rank,
               "layer_type": "lora", "M": M, "N": N, "Q": N / M, "rf": 1, **layer_metrics(spec, result)}  # fmt: skip
        rows.append(row)
    df = pd.DataFrame(rows)
    cols = ["layer_id", "name", "adapter", "lora_rank"] + [c for c in COLUMNS if c not in ("layer_id", "name")]
    return df.reindex(columns=cols + [c for c in df.columns if c not in cols])
