"""SVD smoothing: replace chosen layers by rank-reduced versions (WeightWatcher's SVDSmoothing).

A layer ``W = U S V^T`` is replaced by ``W_k = U_k S_k V_k^T``, its best rank-``k`` approximation
(Eckart-Young): the top ``k`` singular directions are kept and the rest (the random-like bulk of
its spectrum) dropped. ``keep`` chooses ``k``:

* ``"tail"`` (default): the layer's power-law tail, ``k = num_pl_spikes`` from
  :func:`frogwatch.analyze` - the correlated part heavy-tailed self-regularisation theory says
  carries what the layer learned;
* an ``int``: that many singular values;
* a ``float`` in ``(0, 1]``: that fraction of the ``M`` singular values (rounded up).

By default the layers smoothed are the over-parameterized ones (``overparameterized`` in
:func:`frogwatch.analyze`: alpha > 6 with a trusted fit) - the pruning tool for layers whose
spectrum is mostly bulk. conv2d kernels are smoothed slice by slice (each ``W[:, :, i, j]``,
``k`` per slice; ``"tail"`` gives ``ceil(num_pl_spikes / (kh*kw))``); RNN gates are not smoothed.

An ``nn.Module`` comes back as a smoothed copy (the original is untouched). A ``.safetensors``
file or a directory of them (with its index, config and tokenizer files) is streamed one shard at
a time into a new file or directory ``out``, which appears only when complete. Use
:func:`frogwatch.compare` (original, smoothed) to see what it did to every layer's spectrum.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_write
from ._validation import check_bool, fail_type, fail_value
from .analyze import LayerSelector, analyze
from .sources import SourceError

__all__ = ["svd_smoothing", "smoothing_plan", "low_rank"]


def low_rank(W: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-``k`` approximation of a 2-D ``W`` (float64 SVD), in ``W``'s dtype and device.

    For a 4-D conv kernel (out, in, kh, kw) each slice ``W[:, :, i, j]`` is reduced to rank ``k``.
    """
    if W.dim() == 4:
        out = torch.empty_like(W)
        for i in range(W.shape[2]):
            for j in range(W.shape[3]):
                out[:, :, i, j] = low_rank(W[:, :, i, j], k)
        return out
    A = W.detach().to(torch.float64)
    if k >= min(A.shape):
        return W.detach().clone()
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).to(W.dtype)


def _check_keep(keep: Any) -> Any:
    if isinstance(keep, str):
        if keep != "tail":
            raise fail_value("svd_smoothing", "keep", "'tail', an int >= 1 or a float in (0, 1]", keep)
        return keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise fail_type("svd_smoothing", "keep", "'tail', an int or a float", keep)
    if isinstance(keep, (int, np.integer)):
        if keep < 1:
            raise fail_value("svd_smoothing", "keep", "an int >= 1", keep)
        return int(keep)
    if not (0 < keep <= 1):
        raise fail_value("svd_smoothing", "keep", "a float in (0, 1]", keep)
    return float(keep)


def smoothing_plan(
    model: Any, *, layers: LayerSelector = None, keep: Any = "tail", fix_fingers: str | None = None
) -> pd.DataFrame:
    """Which layers :func:`svd_smoothing` reduces, and to which rank. Nothing is changed.

    Returns
    -------
    pandas.DataFrame
        One row per layer to smooth: ``name``, ``layer_type``, ``M``, ``rf``, ``alpha``,
        ``num_pl_spikes``, ``overparameterized`` and ``k`` (rank kept, per conv slice).
    """
    keep = _check_keep(keep)
    df = analyze(model, layers=layers, fix_fingers=fix_fingers, progress=False)
    if layers is None:
        df = df[df["overparameterized"]]
    df = df[df["layer_type"] != "rnn"]
    if keep == "tail":
        df = df[df["status"] == "success"]
        k = np.ceil(df["num_pl_spikes"] / df["rf"])
    elif isinstance(keep, int):
        k = pd.Series(keep, index=df.index)
    else:
        k = np.ceil(keep * df["M"])
    plan = df[["name", "layer_type", "M", "rf", "alpha", "num_pl_spikes", "overparameterized"]].copy()
    plan["k"] = np.minimum(k.astype(int), plan["M"]).astype(int)
    return plan.reset_index(drop=True)


def _stream_safetensors(src: Path, dst: Path, ks: dict[str, int], bar) -> None:
    """Copy one safetensors file, reducing the tensors named in ``ks`` (key -> rank)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():
            t = f.get_tensor(key)
            k = ks.get(key)
            if k is not None:
                t = low_rank(t, k).contiguous()
                bar.update()
            tensors[key] = t
    save_file(tensors, str(dst), metadata=meta)


def _key_ranks(keys: list[str], plan: pd.DataFrame) -> dict[str, int]:
    want = dict(zip(plan["name"], plan["k"]))
    out = {}
    for key in keys:
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        if name.endswith(".weight"):
            name = name[: -len(".weight")]
        if name in want:
            out[key] = int(want[name])
    return out


def svd_smoothing(
    model: Any,
    *,
    layers: LayerSelector = None,
    keep: Any = "tail",
    out: str | os.PathLike | None = None,
    fix_fingers: str | None = None,
    progress: bool = True,
) -> nn.Module | Path:
    """A copy of ``model`` with chosen layers replaced by their rank-reduced versions.

    Parameters
    ----------
    model : nn.Module, or path of a ``.safetensors`` file or checkpoint directory
    layers : list of int / str, or callable, optional
        As in :func:`frogwatch.analyze`. Default: the over-parameterized layers.
    keep : "tail", int, or float in (0, 1]
        Rank kept per layer: the power-law tail (``num_pl_spikes``), a number of singular values,
        or a fraction of them.
    out : path, optional
        Required for a path ``model``: the new file or directory (must not exist).
    fix_fingers : {None, "clip_xmax", "xmin_peak"}
        Passed to the analysis that picks the layers and the tails.
    progress : bool

    Returns
    -------
    nn.Module or Path
        The smoothed copy, or the path written. ``result.smoothing_plan`` (module) or the
        returned path's ``smoothing_plan.csv`` lists what was reduced.
    """
    progress = check_bool(progress, "progress", "svd_smoothing")
    plan = smoothing_plan(model, layers=layers, keep=keep, fix_fingers=fix_fingers)
    bar = tqdm(total=len(plan), desc="frogwatch smooth", unit="layer", disable=not progress, leave=False)
    if isinstance(model, nn.Module):
        if out is not None:
            raise fail_value("svd_smoothing", "out", "None for an nn.Module (the copy is returned)", str(out))
        smoothed = copy.deepcopy(model)
        modules = dict(smoothed.named_modules())
        with torch.no_grad():
            for name, k in zip(plan["name"], plan["k"]):
                w = modules[name].weight
                w.copy_(low_rank(w, int(k)))
                bar.update()
        bar.close()
        smoothed.smoothing_plan = plan
        return smoothed
    if not isinstance(model, (str, os.PathLike)):
        raise fail_type("svd_smoothing", "model", "an nn.Module or a path", model)
    if out is None:
        raise fail_value("svd_smoothing", "out", "a new path for a checkpoint model", out)
    src, dst = Path(model), Path(out)
    if dst.exists():
        raise FileExistsError(f"svd_smoothing: out already exists: {dst}")
    from safetensors import safe_open

    def ranks_of(path: Path) -> dict[str, int]:
        with safe_open(str(path), framework="pt") as f:
            return _key_ranks(list(f.keys()), plan)

    if src.is_file():
        if src.suffix != ".safetensors":
            raise SourceError(f"svd_smoothing streams .safetensors checkpoints; load {src} and pass the module")
        atomic_write(dst, lambda tmp: _stream_safetensors(src, Path(tmp), ranks_of(src), bar))
    else:
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise SourceError(f"svd_smoothing: no .safetensors file in {src}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
        try:
            for item in src.iterdir():
                if item.suffix == ".safetensors":
                    _stream_safetensors(item, tmp / item.name, ranks_of(item), bar)
                elif item.is_file():
                    shutil.copy2(item, tmp / item.name)
                elif item.is_dir():
                    shutil.copytree(item, tmp / item.name)
            plan.to_csv(tmp / "smoothing_plan.csv", index=False)
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    bar.close()
    return dst
