"""Streaming merge: write ``W0 + scatter(delta)`` into a safetensors checkpoint, one shard at a time.

:func:`merge_checkpoint` reads a Hugging Face style checkpoint directory (shards plus
``model.safetensors.index.json``, or a single ``model.safetensors``) and a delta file, and writes a
new directory with the same files and the same index layout in which every targeted weight is
merged exactly as :func:`frogwatch.merge` does in memory (``index_add_`` of the delta cast to the
weight's dtype), so the two agree bit for bit. Only one shard is in memory at a time. The output
is built in a temporary directory next to ``out_dir`` and renamed into place at the end: on any
failure nothing is left at ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .io import DeltaFile, check_fits, read_delta

__all__ = ["merge_checkpoint"]

INDEX = "model.safetensors.index.json"


def _shards(base: Path) -> list[str]:
    index = base / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in base.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{base}: no {INDEX} and no .safetensors file")
    return files


def _header_shapes(base: Path, shards: list[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with safe_open(str(base / shard), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def merge_checkpoint(
    base_dir: str | os.PathLike,
    delta: str | os.PathLike | DeltaFile,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
) -> Path:
    """Merge a FROG delta into a safetensors checkpoint on disk, shard by shard.

    Parameters
    ----------
    base_dir : path
        Checkpoint directory: ``model.safetensors.index.json`` and its shards, or one or more
        ``.safetensors`` files. Other files (``config.json``, tokenizer files) are copied as is.
    delta : path or DeltaFile
        A file written by :func:`frogwatch.save_delta` (or its :func:`read_delta` contents).
        Layer ``name`` is merged into the tensor ``name + ".weight"``; trained biases replace
        ``name + ".bias"``.
    out_dir : path
        New directory (must not exist, or be empty).
    progress : bool
        Show a progress bar over the shards.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    MaskMismatchError
        A delta layer has no weight of its shape in the checkpoint.
    FileExistsError
        ``out_dir`` exists and is not empty.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    base, out = Path(base_dir), Path(out_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: not a checkpoint directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    d = delta if isinstance(delta, DeltaFile) else read_delta(delta)
    shards = _shards(base)
    shapes = _header_shapes(base, shards)
    check_fits(d, {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight")},
               base)
    missing_bias = [n for n in d.biases if f"{n}.bias" not in shapes]
    if missing_bias:
        raise ValueError(f"the delta trains biases the checkpoint lacks, e.g. {missing_bias[:3]}")
    todo = {f"{n}.weight": n for n in d.masks}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for item in base.iterdir():
            if item.name in shards:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for shard in tqdm(shards, desc="merge", unit="shard", disable=not progress):
            with safe_open(str(base / shard), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            with torch.no_grad():
                for key, w in tensors.items():
                    name = todo.get(key)
                    if name is not None:
                        idx = d.masks.indices(name).to(torch.int32 if w.numel() < 2**31 else torch.int64)
                        w.view(-1).index_add_(0, idx, d.deltas[name].to(w.dtype))
                    elif key.endswith(".bias") and key[: -len(".bias")] in d.biases:
                        w.copy_(d.biases[key[: -len(".bias")]])
            save_file(tensors, str(tmp / shard), metadata=meta)
            del tensors
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
