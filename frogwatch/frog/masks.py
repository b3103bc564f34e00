"""FROG masks: the selected weights of every targeted matrix, stored compactly.

A :class:`Masks` is a read-only mapping from a qualified module name to a bool tensor shaped like
that module's weight. Internally each matrix keeps only the sorted flat indices (int32) of its
selected entries and their relevance S (float32), plus a per-matrix record (shape, R, importance,
α, multiplier, captured energy). Masks save to and load from safetensors with JSON metadata, check
that they fit a model, and export to PEFT's SHiRA adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .._io import atomic_write
from .budget import topk_flat

__all__ = ["FORMAT", "MaskInfo", "Masks", "MaskMismatchError", "shape_fingerprint"]

FORMAT = "frogwatch.masks"
FORMAT_VERSION = "1"


class MaskMismatchError(ValueError):
    """Raised when masks are applied to a model they were not selected for."""


@dataclass(frozen=True)
class MaskInfo:
    """Per-matrix record of a selection.

    Attributes
    ----------
    name : str
        Qualified module name (or tensor key without ``.weight`` for file sources).
    kind : str
        ``dense``, ``conv1d``, ``conv2d`` or ``embedding`` (see :mod:`frogwatch.sources`).
    shape : tuple of int
        Shape of the module's weight, which is the shape of the mask.
    R : float
        Frobenius importance ``‖W_i‖_F / Σ_j ‖W_j‖_F`` over the targeted matrices
        (docs/method.md#budget).
    importance : float
        The matrix score that allocated the budget: ``R_i · m_i / Σ_j R_j · m_j`` (equal to ``R``
        when ``blend = 0``; docs/method.md#layer-importance).
    alpha : float
        Power-law α used for the multiplier (NaN: failed fit, not given, or not blended).
    multiplier : float
        ``m(α_i)`` (1 when neutral).
    energy : float
        Spectral energy captured by the SVD behind S (1.0 for the exact full SVD; NaN when S was
        not computed because the matrix got no budget).
    score_sum : float
        Sum of S over the selected entries, in float64: the layer importance of a global
        selection (docs/method.md#layer-importance).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    R: float
    importance: float
    alpha: float = math.nan
    multiplier: float = 1.0
    energy: float = 1.0
    score_sum: float = 0.0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def shape_fingerprint(items: Sequence[tuple[str, Sequence[int]]]) -> str:
    """Short SHA-256 fingerprint of an ordered list of (name, shape)."""
    h = hashlib.sha256()
    for name, shape in items:
        h.update(f"{name}:{'x'.join(str(int(s)) for s in shape)};".encode())
    return h.hexdigest()[:16]


def _json_number(x: Any) -> Any:
    return float(x) if isinstance(x, (float, np.floating)) else x


def _info_json(info: MaskInfo) -> dict:
    # JSON-ready record; floats keep their exact repr (NaN included), so equal JSON = equal bits.
    return {k: _json_number(v) for k, v in asdict(info).items()}


class Masks(Mapping):
    """Read-only mapping ``name -> bool mask`` of a FROG selection.

    Built by :func:`frogwatch.select`; rebuilt from disk by :meth:`load`. ``masks[name]`` is a new
    bool tensor shaped like that module's weight (``True`` = trainable); iteration follows the
    order of the targeted matrices in the model.

    Parameters
    ----------
    infos : sequence of MaskInfo
        One per targeted matrix, in model order.
    indices : sequence of Tensor
        Sorted, unique flat indices of the selected entries of each matrix (stored as int32).
    scores : sequence of Tensor
        Relevance S of those entries, same lengths (stored as float32).
    **meta
        Selection settings kept with the masks: ``strategy``, ``budget``, ``blend``,
        ``direction``, ``method``, ``frogwatch_version``.
    """

    def __init__(
        self,
        infos: Sequence[MaskInfo],
        indices: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor],
        **meta: Any,
    ) -> None:
        if not (len(infos) == len(indices) == len(scores)):
            raise ValueError("infos, indices and scores must have one entry per matrix")
        self._infos: dict[str, MaskInfo] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self._scores: dict[str, torch.Tensor] = {}
        for info, idx, sc in zip(infos, indices, scores):
            if info.name in self._infos:
                raise ValueError(f"duplicate matrix name {info.name!r}")
            idx = torch.as_tensor(idx).detach().reshape(-1).to("cpu", torch.int64)
            sc = torch.as_tensor(sc).detach().reshape(-1).to("cpu", torch.float32)
            if idx.numel() != sc.numel():
                raise ValueError(f"{info.name}: {idx.numel()} indices but {sc.numel()} scores")
            if idx.numel() and (
                int(idx[0]) < 0 or int(idx[-1]) >= info.size or not bool((idx[1:] > idx[:-1]).all())
            ):
                raise ValueError(f"{info.name}: indices must be sorted, unique and in [0, {info.size})")
            if info.size > np.iinfo(np.int32).max:
                raise ValueError(f"{info.name}: {info.size} entries exceed int32 flat indices")
            self._infos[info.name] = info
            self._indices[info.name] = idx.to(torch.int32)
            self._scores[info.name] = sc
        from .. import __version__

        meta.setdefault("frogwatch_version", __version__)
        meta["fingerprint"] = shape_fingerprint([(i.name, i.shape) for i in self._infos.values()])
        self._meta = dict(meta)

    # ---- Mapping -------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        mask = torch.zeros(info.size, dtype=torch.bool)
        mask[self._indices[name].long()] = True
        return mask.view(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks):
            return NotImplemented
        return (
            self._meta == other._meta
            and json.dumps([_info_json(i) for i in self._infos.values()])
            == json.dumps([_info_json(i) for i in other._infos.values()])
            and all(
                torch.equal(self._indices[n], other._indices[n])
                and torch.equal(self._scores[n], other._scores[n])
                for n in self._infos
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Masks({len(self)} matrices, {self.n_selected:,} of {self.n_total:,} weights "
            f"({self.n_selected / max(self.n_total, 1):.2%}), strategy={self.meta.get('strategy')!r})"
        )

    # ---- accessors -----------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        """Selection settings (strategy, budget, blend, direction, method, version, fingerprint)."""
        return dict(self._meta)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the targeted matrices' names and shapes."""
        return self._meta["fingerprint"]

    @property
    def n_selected(self) -> int:
        """Total number of selected weights, ``Σ k_i``."""
        return sum(int(i.numel()) for i in self._indices.values())

    @property
    def n_total(self) -> int:
        """Total number of weights in the targeted matrices, ``T``."""
        return sum(i.size for i in self._infos.values())

    def info(self, name: str) -> MaskInfo:
        """The per-matrix record of ``name``."""
        return self._infos[name]

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat indices (int64, shape (k,)) of the selected entries of ``name``."""
        return self._indices[name].long()

    def scores(self, name: str) -> torch.Tensor:
        """Relevance S (float32, shape (k,)) of the selected entries, aligned with :meth:`indices`."""
        return self._scores[name].clone()

    def counts(self) -> dict[str, int]:
        """``{name: k_i}``."""
        return {n: int(i.numel()) for n, i in self._indices.items()}

    def summary(self) -> pd.DataFrame:
        """One row per matrix.

        Columns: ``name``, ``shape``, ``size``, ``k``, ``fraction`` (k / size), ``R`` (Frobenius
        share), ``importance`` (the budget share R·m, normalised), ``selected_score_sum`` (Σ S over
        the selected entries; both in docs/method.md#layer-importance), ``alpha``, ``multiplier``,
        ``kind``, ``energy``.
        """
        rows = []
        for name, info in self._infos.items():
            k = int(self._indices[name].numel())
            rows.append(
                {
                    "name": name,
                    "shape": tuple(info.shape),
                    "size": info.size,
                    "k": k,
                    "fraction": k / info.size if info.size else 0.0,
                    "R": info.R,
                    "importance": info.importance,
                    "selected_score_sum": info.score_sum,
                    "alpha": info.alpha,
                    "multiplier": info.multiplier,
                    "kind": info.kind,
                    "energy": info.energy,
                }
            )
        return pd.DataFrame(rows)

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the masks to a safetensors file (atomically).

        Tensors ``<name>.indices`` (int32) and ``<name>.scores`` (float32); metadata ``format``,
        ``format_version``, ``meta`` (JSON of :attr:`meta`) and ``layers`` (JSON of the records).
        """
        from safetensors.torch import save_file

        tensors = {}
        for name in self._infos:
            tensors[f"{name}.indices"] = self._indices[name].contiguous()
            tensors[f"{name}.scores"] = self._scores[name].contiguous()
        layers = [_info_json(i) for i in self._infos.values()]
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "meta": json.dumps(self._meta),
            "layers": json.dumps(layers),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Masks":
        """Read masks written by :meth:`save`; the result compares equal to the saved masks."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such masks file")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise ValueError(f"{path}: not a frogwatch masks file (format={md.get('format')!r})")
                if md.get("format_version") != FORMAT_VERSION:
                    raise ValueError(
                        f"{path}: masks format version {md.get('format_version')!r} is not supported "
                        f"(this frogwatch reads {FORMAT_VERSION})"
                    )
                meta = json.loads(md["meta"])
                layers = json.loads(md["layers"])
                infos = [MaskInfo(**{**d, "shape": tuple(d["shape"])}) for d in layers]
                idx = [f.get_tensor(f"{i.name}.indices") for i in infos]
                sc = [f.get_tensor(f"{i.name}.scores") for i in infos]
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: corrupt frogwatch masks file ({type(e).__name__}: {e})") from None
        except Exception as e:  # safetensors raises its own error types on a damaged header
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"{path}: could not read masks ({type(e).__name__}: {e})") from None
        saved_fp = meta.pop("fingerprint", None)
        masks = cls(infos, idx, sc, **meta)
        if saved_fp is not None and saved_fp != masks.fingerprint:
            raise ValueError(f"{path}: fingerprint mismatch; the file is corrupt")
        return masks

    @classmethod
    def from_indices(
        cls,
        indices: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Sequence[int]],
        *,
        scores: Mapping[str, torch.Tensor] | None = None,
        kinds: Mapping[str, str] | None = None,
        **meta: Any,
    ) -> "Masks":
        """Masks from sorted flat indices alone (e.g. read back from a delta file).

        Parameters
        ----------
        indices : Mapping[str, Tensor]
            Name -> sorted, unique flat indices (k,) into the weight of that module.
        shapes : Mapping[str, sequence of int]
            Name -> weight shape; same keys, their order is the masks' order.
        scores : Mapping[str, Tensor], optional
            Relevance S of the selected entries; unknown scores are stored as NaN (``prepare``
            then recomputes S when it needs it).
        kinds : Mapping[str, str], optional
            Name -> kind (``dense``, ``conv1d``, ``conv2d``); default ``dense``.
        **meta
            Stored as the masks' metadata (``strategy`` defaults to ``"from_indices"``).
        """
        names = list(shapes)
        if set(indices) != set(names):
            raise ValueError("Masks.from_indices: indices and shapes must name the same matrices")
        infos = [
            MaskInfo(n, (kinds or {}).get(n, "dense"), tuple(int(s) for s in shapes[n]),
                     math.nan, math.nan, energy=math.nan, score_sum=math.nan)
            for n in names
        ]
        idx = [torch.as_tensor(indices[n]) for n in names]
        sc = [torch.as_tensor(scores[n]) if scores is not None and n in scores
              else torch.full((i.numel(),), math.nan) for n, i in zip(names, idx)]
        meta.setdefault("strategy", "from_indices")
        return cls(infos, idx, sc, **meta)

    # ---- compatibility -------------------------------------------------------------------------

    def check_compatible(self, model: Any) -> None:
        """Raise :class:`MaskMismatchError` unless every mask names a weight of ``model`` with its shape.

        Parameters
        ----------
        model : nn.Module, state dict or path
            Anything :func:`frogwatch.sources.layer_matrices` reads.
        """
        from ..sources import layer_matrices

        shapes = {lm.name: tuple(lm.shape) for lm in layer_matrices(model)}
        missing = [n for n in self._infos if n not in shapes]
        wrong = [
            f"{n}: mask {self._infos[n].shape}, model {shapes[n]}"
            for n in self._infos
            if n in shapes and shapes[n] != tuple(self._infos[n].shape)
        ]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} masked matrices are not in the model (e.g. {missing[:3]})"
                )
            if wrong:
                parts.append(f"{len(wrong)} have other shapes ({'; '.join(wrong[:3])})")
            raise MaskMismatchError(
                f"these masks (fingerprint {self.fingerprint}) do not fit the model: "
                + "; ".join(parts)
                + ". Select masks on this model with frogwatch.select."
            )

    # ---- PEFT SHiRA export ---------------------------------------------------------------------

    def to_shira_mask_fn(self, model: torch.nn.Module, *, resize: bool = False) -> Callable:
        """A ``mask_fn(base_layer, r, **kwargs) -> Tensor`` for PEFT's SHiRA adapter.

        PEFT (0.21) sizes every SHiRA layer at exactly ``r · (in + out)`` trainable weights, so a
        layer's FROG count ``k_i`` must equal that number. With ``resize=False`` a mismatch is an
        error; with ``resize=True`` the layer gets the ``r · (in + out)`` entries of largest S
        instead (the top of the stored selection when fewer, the top of S recomputed from the
        layer's weight when more), i.e. FROG's ranking with SHiRA's per-layer count.

        Use it as::

            config = ShiraConfig(r=r, target_modules=list(masks))
            config.mask_fn = masks.to_shira_mask_fn(model)
            peft_model = get_peft_model(model, config)

        or let :meth:`shira_config` build the config. Layers are found by identity among
        ``model``'s modules, so pass the model that ``get_peft_model`` will wrap.
        """
        self.check_compatible(model)
        by_id = {id(mod): name for name, mod in model.named_modules() if name in self._infos}

        def mask_fn(base_layer: torch.nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
            name = by_id.get(id(base_layer))
            if name is None:
                raise MaskMismatchError(
                    f"SHiRA asked for a mask of a layer FROG did not select ({base_layer!r}); "
                    "set ShiraConfig(target_modules=list(masks))"
                )
            w = base_layer.weight
            n_shira = int(r) * (int(base_layer.in_features) + int(base_layer.out_features))
            idx = self._shira_indices(name, w, n_shira, resize)
            mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
            mask[idx.to(w.device)] = 1
            return mask.view(w.shape)

        return mask_fn

    def _shira_indices(self, name: str, weight: torch.Tensor, n: int, resize: bool) -> torch.Tensor:
        idx = self.indices(name)
        k = idx.numel()
        if k == n:
            return idx
        if not resize:
            raise ValueError(
                f"{name}: FROG selected {k} weights but PEFT's SHiRA trains exactly "
                f"r·(in+out) = {n} per layer; pick r so that they agree, or pass resize=True to "
                "take SHiRA's count from FROG's ranking"
            )
        if n > self._infos[name].size:
            raise ValueError(f"{name}: SHiRA asks for {n} weights, the layer has {self._infos[name].size}")
        if n < k:  # the stored selection is a top-k of S, so its top-n is the top-n of S
            return idx[topk_flat(self._scores[name], n)]
        from .scores import relevance_2d

        S, _ = relevance_2d(weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1))
        return topk_flat(S, n)

    def shira_config(self, model: torch.nn.Module, r: int | None = None, *, resize: bool = False, **kwargs: Any):
        """A ``peft.ShiraConfig`` that trains this selection on ``model``.

        Parameters
        ----------
        model : nn.Module
            The model ``get_peft_model`` will wrap; SHiRA supports ``nn.Linear`` layers only.
        r : int, optional
            SHiRA's size parameter. ``None``: the ``r`` with ``k_i = r · (in_i + out_i)`` for
            every layer, an error if there is none (then pass ``r`` and ``resize=True``).
        resize : bool
            See :meth:`to_shira_mask_fn`.
        **kwargs
            Passed to ``ShiraConfig`` (e.g. ``modules_to_save``).
        """
        import warnings

        from peft import ShiraConfig

        modules = dict(model.named_modules())
        not_linear = [n for n in self._infos if not isinstance(modules.get(n), torch.nn.Linear)]
        if not_linear:
            raise ValueError(
                f"PEFT's SHiRA adapts nn.Linear layers only; not nn.Linear: {not_linear[:3]}"
            )
        if r is None:
            rs = set()
            for n, k in self.counts().items():
                lin = modules[n]
                d = lin.in_features + lin.out_features
                rs.add(k // d if k % d == 0 else -1)
            if len(rs) != 1 or min(rs) < 1:
                raise ValueError(
                    "no single SHiRA r gives every layer its FROG count k_i = r·(in+out); "
                    "pass r=... and resize=True"
                )
            r = rs.pop()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*mask_type.*")
            config = ShiraConfig(r=int(r), mask_type="frogwatch", target_modules=list(self._infos), **kwargs)
        config.mask_fn = self.to_shira_mask_fn(model, resize=resize)
        return config
