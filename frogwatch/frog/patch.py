"""The in-place write of ``W0 + delta`` into a FROG layer's selected entries, and its state.

A FROG layer computes with ``W0 + scatter(delta)`` without a dense copy of the weight: the k
selected entries of W0's storage are overwritten with ``W0[idx] + delta`` for the matmuls and the
k original values written back bit for bit (``ops.patched`` drives this per call).
:class:`W0Cache` keeps W0[idx] and what the weight holds now; :class:`Hold` keeps a write in place
from a training forward until its backward.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["Hold", "W0Cache"]


class W0Cache:
    """The in-place patch of one FROG layer: W0[idx] (k values, kept: W0 is frozen) and its state.

    :meth:`write` makes the weight's k selected entries hold ``W0[idx] + delta`` (W0[idx] read from
    the weight once, then taken from here: on an LLM-sized matrix each pass over k scattered
    entries misses the cache about k times), :meth:`restore` writes W0[idx] back. Writes go
    through ``.data``: autograd's version counter of the (frozen) weight is not bumped.

    Between a training forward and its backward the write is *held* (:meth:`hold`, on the CPU):
    the forward leaves W0 + δ in place for the backward's input gradient, which restores W0 when
    the last hold is released — by that backward, or when its graph is freed without one. That
    is two passes over the k entries per step instead of four. While held, ``layer.weight``
    holds W0 + δ at the selection; the layer's ``state_dict``, pickling, copies,
    ``effective_weight``, ``merge`` and ``fully_shard_frog`` restore W0 first, and the backward
    writes again whenever the weight no longer holds this δ (restored, reloaded, or refilled by
    FSDP2: the weight's key and one written entry that differs from W0 are checked).

    The cached values are used while the weight is the same tensor with the same storage, version
    counter, dtype, device and shape, and the indices the same tensor with the same version;
    otherwise they are read from the weight again. So ``load_state_dict`` (an in-place copy bumps
    the version), ``.to()`` / ``.data = ...`` (new storage), replacing the parameter or the
    indices, and any in-place write outside ``.data`` refresh it. Writes through ``weight.data``
    bypass the version counter, and FSDP2 refills its unsharded weight in place keeping the
    version: after such a write, or after loading other base weights into a sharded model, call
    :meth:`clear` between steps (``layer.frog.w0_cache.clear()``). Copies and pickles start empty.
    """

    __slots__ = ("entry", "written", "holds")

    def __init__(self) -> None:
        self.entry: tuple | None = None  # (key, weight ref, indices ref, W0[idx])
        self.written: tuple | None = None  # (key, delta ref, delta version, probe) while W0 + δ is in place
        self.holds = 0

    @staticmethod
    def _key(weight: torch.Tensor, indices: torch.Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape,
                indices.data_ptr(), indices._version, indices.numel())

    def get(self, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """W0[idx], flat (k,), in the weight's dtype (detached; do not write into it)."""
        key, entry = self._key(weight, indices), self.entry
        if entry is not None and entry[1]() is weight and entry[2]() is indices and entry[0] == key:
            return entry[3]
        values = weight.detach().reshape(-1).index_select(0, indices)
        self.entry = (key, weakref.ref(weight), weakref.ref(indices), values)
        return values

    def _holds_delta(self, weight: torch.Tensor, delta: torch.Tensor, key: tuple) -> bool:
        w = self.written
        if w is None or w[0] != key or w[1]() is not delta or w[2] != delta._version:
            return False
        if w[3] is not None:  # one entry where W0 + δ differs from W0: refilled or restored since?
            pos, value = w[3]
            return weight.data.view(-1)[pos].item() == value
        return True

    def write(self, weight: torch.Tensor, delta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Make the selected entries hold ``W0[idx] + delta`` (in the weight's dtype); ``weight.data``.

        Writes nothing when they already hold this δ (same tensor and version).
        """
        key = self._key(weight, indices)
        if self._holds_delta(weight, delta, key):
            return weight.data
        orig = self.get(weight, indices)
        values = orig + delta.detach().to(weight.dtype)
        weight.data.view(-1).index_copy_(0, indices.long(), values)  # index_copy_ takes int64 only
        probe = None
        if self.holds > 0:  # the write outlives this call: remember an entry that tells it apart
            changed = values != orig
            p = int(changed.to(torch.uint8).argmax())
            if bool(changed[p]):
                probe = (int(indices[p]), values[p].item())
        self.written = (key, weakref.ref(delta), delta._version, probe)
        return weight.data

    def restore(self, weight: torch.Tensor, indices: torch.Tensor) -> None:
        """Write W0[idx] back into ``weight`` if this cache wrote W0 + δ there and it still does."""
        w, self.written = self.written, None
        if w is None or self.entry is None or w[0] != self._key(weight, indices):
            return  # replaced, reloaded or (FSDP2) freed since the write: W0 is not ours to restore
        weight.data.view(-1).index_copy_(0, indices.long(), self.entry[3])

    def hold(self, weight: torch.Tensor, delta: torch.Tensor, indices: torch.Tensor) -> Hold:
        """Write W0 + δ and keep it in place until the returned :class:`Hold` is released."""
        self.holds += 1
        try:
            self.write(weight, delta, indices)
        except BaseException:
            self.holds -= 1
            raise
        return Hold(self, weight, indices)

    def clear(self) -> None:
        """Forget W0[idx] and any write (the weight is taken as W0 from now on)."""
        self.entry = self.written = None

    def __reduce__(self) -> tuple:  # copies and pickles start empty
        return (W0Cache, ())


class Hold:
    """One pending backward pass that needs W0 + δ in place; :meth:`release` once, or on deletion.

    The last release restores W0. A graph freed without its backward deletes its holds.
    """

    __slots__ = ("cache", "weight", "indices", "live")

    def __init__(self, cache: W0Cache, weight: torch.Tensor, indices: torch.Tensor) -> None:
        # weak references: a tensor held from the autograd graph's context would tie Python
        # objects into the graph (the graph itself keeps both alive while it exists)
        self.cache, self.weight, self.indices = cache, weakref.ref(weight), weakref.ref(indices)
        self.live = True

    def release(self) -> None:
        if self.live:
            self.live = False
            self.cache.holds -= 1
            weight, indices = self.weight(), self.indices()
            if self.cache.holds == 0 and weight is not None and indices is not None:
                self.cache.restore(weight, indices)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown, a weight already gone: nothing left to restore
            pass
