"""Delta files: ``save_delta``, ``read_delta``, ``load_delta`` (safetensors + JSON metadata).

A delta file holds per layer ``<name>.frog_indices`` (int32, or int64 beyond 2**31 entries),
``<name>.frog_delta`` (the deltas in their training dtype) and, with ``train_bias``,
``<name>.bias``. Its metadata: ``format``/``format_version``, the frogwatch version, each layer's
kind, shape and k (``layers``, JSON), the :class:`FrogConfig` (``config``, JSON) and the
fingerprint of the layers' names and shapes (:func:`frogwatch.frog.masks.shape_fingerprint`, the
one masks files use).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from .config import FrogConfig, Schedule
from .layer import STATE_ATTR, frog_layers, state_of
from .masks import MaskMismatchError, Masks, shape_fingerprint

__all__ = ["DeltaFile", "load_delta", "read_delta", "save_delta"]

FORMAT = "frogwatch.delta"
FORMAT_VERSION = "1"
_KINDS = {"linear": "dense", "conv1d": "conv1d", "conv2d": "conv2d"}


def _key(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_delta(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the FROG deltas (indices, values, trained biases, metadata) of a prepared model.

    The file is written to a temporary name in the same directory and renamed into place. A
    callable ``noise_schedule`` is stored by name; ``load_delta`` then asks for it again. Under
    FSDP2 (:func:`~frogwatch.frog.distributed.fully_shard_frog`) call it on every rank: the
    sharded deltas are gathered first (a collective).
    """
    from safetensors.torch import save_file

    from frogwatch import __version__

    config = state_of(model).config
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, m in frog_layers(model).items():
        layers[name] = {"kind": m._frog_kind, "shape": list(m.weight.shape), "k": m.frog_delta.numel()}
        tensors[_key(name, "frog_indices")] = m.frog_indices.detach().cpu().contiguous()
        tensors[_key(name, "frog_delta")] = _full(m.frog_delta.detach()).cpu().contiguous()
        if config.train_bias and m.bias is not None:
            tensors[_key(name, "bias")] = _full(m.bias.detach()).cpu().contiguous()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "frogwatch_version": __version__,
        "layers": json.dumps(layers), "config": json.dumps(config.to_dict()),
        "fingerprint": shape_fingerprint([(n, v["shape"]) for n, v in layers.items()]),
        "fingerprint_scheme": "shape_fingerprint",
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


@dataclass(frozen=True)
class DeltaFile:
    """Contents of a delta file (see :func:`read_delta`).

    Attributes
    ----------
    config : dict
        The saved :class:`FrogConfig` as a dict (``FrogConfig.from_dict`` rebuilds it).
    masks : Masks
        The selection (indices, shapes, kinds) as :class:`~frogwatch.frog.masks.Masks`.
    kinds : dict[str, str]
        FROG layer kind per layer (``linear``, ``conv1d``, ``conv2d``).
    deltas : dict[str, Tensor]
        Layer name -> delta values (k,), aligned with ``masks.indices(name)``.
    biases : dict[str, Tensor]
        Trained biases (``train_bias``), by layer name.
    meta : dict[str, str]
        The raw file metadata.
    """

    config: dict
    masks: Masks
    kinds: dict[str, str]
    deltas: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    meta: dict[str, str]

    @property
    def fingerprint(self) -> str:
        return self.masks.fingerprint


def read_delta(path: str | os.PathLike) -> DeltaFile:
    """Read a delta file without a model.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a frogwatch delta file, a format version this frogwatch does not read, or a damaged
        file (one line naming the problem; never a raw ``KeyError``).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such delta file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a frogwatch delta file (metadata format "
                                 f"{meta.get('format')!r})")
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path} has delta format version {meta.get('format_version')!r}; "
                                 f"this frogwatch reads version {FORMAT_VERSION}")
            layers: dict[str, dict] = json.loads(meta["layers"])
            config = json.loads(meta["config"] if "config" in meta else meta["settings"])
            indices = {n: f.get_tensor(_key(n, "frog_indices")) for n in layers}
            deltas = {n: f.get_tensor(_key(n, "frog_delta")) for n in layers}
            keys = set(f.keys())
            biases = {n: f.get_tensor(_key(n, "bias")) for n in layers if _key(n, "bias") in keys}
        masks = Masks.from_indices(
            indices, {n: tuple(v["shape"]) for n, v in layers.items()},
            kinds={n: _KINDS.get(v["kind"], "dense") for n, v in layers.items()},
        )
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged or incompatible frogwatch delta file "
                         f"({type(e).__name__}: {e})") from None
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types on a damaged header
        raise ValueError(f"{path}: could not read the delta file ({type(e).__name__}: {e})") from None
    if meta.get("fingerprint_scheme") == "shape_fingerprint" and meta.get("fingerprint") != masks.fingerprint:
        raise ValueError(f"{path}: fingerprint mismatch; the file is corrupt")
    for n, d in deltas.items():
        if d.numel() != masks.indices(n).numel():
            raise ValueError(f"{path}: layer {n!r} has {d.numel()} deltas for "
                             f"{masks.indices(n).numel()} indices; the file is corrupt")
    kinds = {n: v["kind"] for n, v in layers.items()}
    return DeltaFile(config, masks, kinds, deltas, biases, dict(meta))


def check_fits(delta: DeltaFile, shapes: dict[str, tuple], where: Any) -> None:
    """Raise :class:`MaskMismatchError` unless every delta layer has a weight of its shape."""
    problems = []
    for name in delta.masks:
        want = tuple(delta.masks.info(name).shape)
        if name not in shapes:
            problems.append(f"{name!r}: no such module")
        elif tuple(shapes[name]) != want:
            problems.append(f"{name!r}: file shape {want}, model shape {tuple(shapes[name])}")
    if problems:
        raise MaskMismatchError(
            f"delta file {where} (fingerprint {delta.fingerprint}) does not fit this model: "
            + "; ".join(problems[:5])
        )


def load_delta(
    model: nn.Module, path: str | os.PathLike, *, noise_schedule: Schedule | None = None
) -> nn.Module:
    """Load a delta saved by ``save_delta`` into ``model`` (in place) and return it.

    ``model`` is either the base model (it is then prepared with the saved masks and config; the
    init is replaced by the saved values) or a model already prepared with the same masks.
    ``noise_schedule`` overrides the saved schedule (required when it was a callable).

    Raises
    ------
    MaskMismatchError
        The file's layers, shapes or indices do not match the model.
    ValueError
        Not a frogwatch delta file, or one from an incompatible version.
    """
    from .model import prepare

    delta = read_delta(path)
    modules = dict(model.named_modules())
    shapes = {n: tuple(m.weight.shape) for n, m in modules.items()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    check_fits(delta, shapes, path)
    if getattr(model, STATE_ATTR, None) is None:
        config = FrogConfig.from_dict(delta.config, noise_schedule=noise_schedule).replace(init_scale=0.0)
        prepare(model, delta.masks, config)
    present = frog_layers(model)
    if set(present) != set(delta.masks):
        raise MaskMismatchError(
            f"model is prepared with {len(present)} FROG layers, the delta file has "
            f"{len(delta.masks)}; symmetric difference e.g. {sorted(set(present) ^ set(delta.masks))[:3]}"
        )
    with torch.no_grad():
        for name, m in present.items():
            if not torch.equal(m.frog_indices.cpu().long(), delta.masks.indices(name)):
                raise MaskMismatchError(f"layer {name!r}: the model's selected indices differ from the file's")
            m.frog_delta.copy_(delta.deltas[name])
            if name in delta.biases and m.bias is not None:
                m.bias.copy_(delta.biases[name])
    return model
