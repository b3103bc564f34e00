"""FROG autograd: ``y = op(x, W0 + scatter(delta) [+ noise], b)`` without a saved dense copy.

The custom function saves for backward only the layer input, ``delta``, ``W0`` and the indices
(references, no dense copy). Without noise the effective weight is never materialised: ``W0 +
delta`` is written into the k selected entries of W0's storage for the matmuls and the k original
values are written back bit for bit (:class:`patched`, :mod:`frogwatch.frog.patch`); on the CPU the
forward's write is held until the backward's input gradient has used it (two passes over the k
scattered entries per step instead of four). With noise a dense noisy copy is built for the running
layer. Backward forms delta's gradient only at the selected indices. Dense layers on the CPU take a
sampled dense-dense product (SDDMM, k dot products over the tokens) when it is cheaper than the
dense product, else only the block of rows x columns holding a selection is multiplied; Conv2d
always uses ``torch.nn.grad.conv2d_weight``. Under ``torch.autocast`` the layer casts to the
autocast dtype itself, in forward and backward alike.

Noise amplitude: the relevance S of a frozen weight is kept compactly (:class:`NoiseAmplitude`:
one byte per entry, or rank-r factors) and decoded transiently for the layer that is running.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .patch import W0Cache

__all__ = ["NoiseAmplitude", "SparseDeltaFunction", "derive_seed", "effective", "generator"]

# How dense layers form delta's gradient dL/dW[idx] (dL/dW = A^T B, both (tokens x dim)), per call:
# - SDDMM: ``torch.sparse.sampled_addmm`` on the CSR pattern of the selection (row pointers cached
#   per layer), float32 inputs; one selected entry costs about _SDDMM_COST[dtype] cells of the
#   dense product in the same dtype, so it runs when k * cost <= the cells of the dense (block)
#   product. Measured (``benchmarks/grad_at.py``, BENCHMARKS.md section 7; 2-core AMD EPYC with
#   AVX512-bf16, 1 thread, 64-2048 tokens, 2048x2048 / 5632x2048 / 2048x5632, uniform selections):
#   at 5 % density one entry costs 9-43 bf16 cells (median 17; SDDMM / dense time 0.45-2.1) and
#   3-18 fp32 cells (median 6; 0.14-0.88); at 0.1-1 % SDDMM takes 0.14-0.57x the bf16 and
#   0.02-0.22x the fp32 dense time. Hence the crossovers at 4 % (bf16 / fp16) and 10 % (fp32)
#   density. CPU only: a GPU keeps the dense products (not measured there).
# - else the product restricted to the rows x columns holding a selection when that block is at
#   most _BLOCK_GRAD_MAX_FRACTION of the matrix (FROG's selections concentrate: at G = 1 % on
#   MiniLM they touch ~40 % of rows and ~50 % of columns); else the full dense product.
_SDDMM_COST = {torch.float32: 10.0, torch.float64: 10.0}  # other dtypes (bf16, fp16): _SDDMM_COST_LOW
_SDDMM_COST_LOW = 25.0
_BLOCK_GRAD_MAX_FRACTION = 0.7
_SPARSE_GRAD_CHUNK = 1 << 22  # elements of the float32 token-chunk copies of A and B per SDDMM call
# Entries of S below this fraction of their row's maximum are coded as that floor: it bounds the
# log range one byte covers (ln 1e4 / 255 -> relative coding error <= 1.8 %).
_CODE_FLOOR = 1e-4

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps); stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


# --------------------------------------------------------------------------------------------
# noise amplitude, stored compactly
# --------------------------------------------------------------------------------------------


class NoiseAmplitude:
    """Compact codes of a relevance matrix S (out, in...) and their transient dense decoding.

    ``rank=None``: ``codes`` (uint8, shaped like W reshaped to (out, -1)) on a per-row log scale,
    plus per-row ``lo`` and ``step`` (float32, (out, 1)): ``S ~ exp(lo + code * step)``.
    ``rank=r``: ``a = |W V_r|`` (out, r) and ``b = |V_r|`` (in, r), float32, ``S_r = a b^T``.
    The tensors are registered as non-persistent buffers of the layer's ``frog`` module.
    """

    @staticmethod
    def encode(weight: torch.Tensor, rank: int | None) -> dict[str, torch.Tensor]:
        """Buffers for the noise amplitude of ``weight`` (computed in float64 on its device)."""
        w2 = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
        if rank is not None:
            flip = w2.shape[0] < w2.shape[1]
            a_ = w2.mT if flip else w2
            _, v = torch.linalg.eigh(a_.mT @ a_)  # ascending; S = |A V| |V|^T
            v = v[:, v.shape[1] - min(rank, v.shape[1]):]
            av = (a_ @ v).abs()
            a, b = (v.abs(), av) if flip else (av, v.abs())
            return {"noise_a": a.float().contiguous(), "noise_b": b.float().contiguous()}
        from .scores import relevance

        s = relevance(w2).to(w2.device)
        top = s.amax(1, keepdim=True)
        logs = torch.log(torch.maximum(s, (top * _CODE_FLOOR).clamp_min(1e-300)))
        lo, hi = logs.amin(1, keepdim=True), logs.amax(1, keepdim=True)
        step = (hi - lo) / 255
        codes = torch.where(step > 0, torch.round((logs - lo) / step.clamp_min(1e-300)), 0.0)
        return {"noise_codes": codes.to(torch.uint8), "noise_lo": lo.float(), "noise_step": step.float()}

    @staticmethod
    def decode(buffers: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Dense S (float32 arithmetic, returned in ``dtype``) shaped ``shape``."""
        if "noise_a" in buffers:
            s = buffers["noise_a"] @ buffers["noise_b"].mT
        else:
            s = torch.exp(torch.addcmul(buffers["noise_lo"], buffers["noise_codes"].float(),
                                        buffers["noise_step"]))
        return s.reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------
# effective weight
# --------------------------------------------------------------------------------------------


def _noisy(noise: dict[str, torch.Tensor] | None, noise_amp: float) -> bool:
    """This call adds noise: a positive amplitude and noise codes to draw it from."""
    return noise_amp > 0.0 and bool(noise)


def _in_place(weight: torch.Tensor, indices: torch.Tensor) -> bool:
    """W0 + delta is written into W0's storage (else a dense copy, or W0 itself when k = 0)."""
    return weight.is_contiguous() and indices.numel() > 0


def effective(
    weight: torch.Tensor,
    delta: torch.Tensor,
    indices: torch.Tensor,
    noise: dict[str, torch.Tensor] | None,
    noise_amp: float,
    noise_seed: int,
) -> torch.Tensor:
    """Dense ``W0 + scatter(delta)`` (+ noise on the frozen entries), a new contiguous tensor.

    The delta is added in the weight's dtype. Noise is ``noise_amp * S * eps`` with
    ``eps ~ N(0, 1)`` drawn from ``noise_seed``; the selected entries get ``W0 + delta`` exactly,
    without noise.
    """
    d = delta.detach().to(weight.dtype)
    if _noisy(noise, noise_amp):
        eps = torch.randn(weight.shape, generator=generator(noise_seed, weight.device),
                          device=weight.device, dtype=weight.dtype)
        w = torch.addcmul(weight, NoiseAmplitude.decode(noise, weight.shape, weight.dtype), eps,
                          value=noise_amp).contiguous()
        del eps
        idx = indices.long()  # index_copy_ takes int64 only
        w.view(-1).index_copy_(0, idx, weight.reshape(-1).index_select(0, idx) + d)
        return w
    w = torch.clone(weight.detach(), memory_format=torch.contiguous_format)
    w.view(-1).index_add_(0, indices, d)
    return w


class patched:
    """``with patched(weight, delta, indices, cache) as w:`` — W0 + scatter(delta) without a dense copy.

    Writes ``W0[idx] + delta`` (rounded to the weight's dtype, as ``effective`` does) into the
    selected entries of the weight's storage through ``cache`` (``W0Cache.write``), yields the
    weight, and on exit writes the k original values back, bit for bit, unless a pending backward
    pass holds the write (``W0Cache.hold``). A non-contiguous weight gets a dense copy instead.
    """

    def __init__(self, weight: torch.Tensor, delta: torch.Tensor, indices: torch.Tensor,
                 cache: W0Cache) -> None:
        self.weight, self.delta, self.indices, self.cache = weight, delta, indices, cache
        self._wrote = False

    def __enter__(self) -> torch.Tensor:
        w = self.weight
        if not _in_place(w, self.indices):
            return effective(w, self.delta, self.indices, None, 0.0, 0) if self.indices.numel() else w.detach()
        self._wrote = True
        return self.cache.write(w, self.delta, self.indices)

    def __exit__(self, *exc: Any) -> None:
        if self._wrote and self.cache.holds == 0:
            self.cache.restore(self.weight, self.indices)
        self._wrote = False


def _weight_for(weight, delta, indices, noise, noise_amp, noise_seed, cache):
    """A context giving the effective weight: patched in place without noise, a new tensor with it."""
    if _noisy(noise, noise_amp):
        from contextlib import nullcontext

        return nullcontext(effective(weight, delta, indices, noise, noise_amp, noise_seed))
    return patched(weight, delta, indices, cache)


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


class DenseOp:
    """y = x W^T + b (``nn.Linear``, W (out, in)) or y = x W + b (HF ``Conv1D``, W (in, out)).

    One instance lives on each FROG dense layer; it caches, per index tensor, the rows and columns
    that hold a selection (computing them needs ``unique``, which waits for the GPU) and the CSR row
    pointers of the selection.
    """

    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed
        self._plan: tuple | None = None  # (key, indices, used rows, used cols, CSR row pointers)

    def _grad_plan(self, indices: torch.Tensor, w_shape: torch.Size) -> tuple[torch.Tensor, ...]:
        """Used rows and columns (sorted) and CSR row pointers (``indices``' dtype) of the selection."""
        # the plan holds the index tensor, so no other tensor can take its address meanwhile
        key = (indices.data_ptr(), indices.device, indices.numel(), indices._version, tuple(w_shape))
        if self._plan is None or self._plan[0] != key:
            rows, cols = indices // w_shape[1], indices % w_shape[1]
            crow = torch.zeros(w_shape[0] + 1, dtype=indices.dtype, device=indices.device)
            torch.cumsum(torch.bincount(rows, minlength=w_shape[0]), 0, out=crow[1:])
            self._plan = (key, indices, torch.unique_consecutive(rows), torch.unique(cols), crow)
        return self._plan[2:]

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w) if b is not None else x2 @ w
        return y.view(*x.shape[:-1], w.shape[1])

    def grad_input(self, g: torch.Tensor, x_shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        return (g @ (w.t() if self.transposed else w)).view(x_shape)

    def grad_bias(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1, g.shape[-1]).sum(0)

    def grad_at(
        self, g: torch.Tensor, x: torch.Tensor, w_shape: torch.Size, indices: torch.Tensor
    ) -> torch.Tensor:
        """Entries ``indices`` (sorted, unique, flat) of dL/dW, dL/dW = A^T B for (A, B) = (g, x) or (x, g).

        Returns (k,): float32 from bf16 / fp16 inputs on the SDDMM path (float32 accumulation),
        else the inputs' dtype.
        """
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a, b = (x2, g2) if self.transposed else (g2, x2)  # dW[i, j] = sum_n a[n, i] b[n, j]
        k, size = indices.numel(), w_shape[0] * w_shape[1]
        r_used, c_used, crow = self._grad_plan(indices, w_shape)
        cells = r_used.numel() * c_used.numel()
        if g.device.type == "cpu" and k * _SDDMM_COST.get(a.dtype, _SDDMM_COST_LOW) <= cells:
            return _sddmm(a, b, crow, indices % w_shape[1], w_shape)
        if cells > _BLOCK_GRAD_MAX_FRACTION * size:
            return (a.t() @ b).view(-1).index_select(0, indices)
        rows, cols = indices // w_shape[1], indices % w_shape[1]
        block = a.index_select(1, r_used).t() @ b.index_select(1, c_used)
        pos = torch.searchsorted(r_used, rows) * c_used.numel() + torch.searchsorted(c_used, cols)
        return block.view(-1).index_select(0, pos)


def _sddmm(a: torch.Tensor, b: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor,
           w_shape: torch.Size) -> torch.Tensor:
    """(A^T B)[i, j] at the CSR pattern (crow, cols) of shape ``w_shape``, float32 or wider, (k,).

    The tokens are taken in chunks whose float32 copies of A and B hold at most
    ``_SPARSE_GRAD_CHUNK`` elements.
    """
    acc = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    n = a.shape[0]
    step = max(1, _SPARSE_GRAD_CHUNK // (a.shape[1] + b.shape[1]))
    zeros = torch.zeros(cols.numel(), dtype=acc, device=a.device)  # beta = 0 still reads them
    with warnings.catch_warnings():  # "sparse CSR support is in beta" is not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, zeros, size=tuple(w_shape))
    out = None
    for s in range(0, n, step):
        # float32 copies with the tokens contiguous: each dot product reads two contiguous rows.
        # Transposed in the input dtype first, then converted: 1.6-3x faster than one strided
        # converting copy (bf16, 64 x 2048 / 5632, one thread), the same values.
        a_t = a[s : s + step].t().contiguous().to(acc)
        b_t = b[s : s + step].t().contiguous().to(acc)
        part = torch.sparse.sampled_addmm(pattern, a_t, b_t.t(), beta=0.0).values()
        out = part if out is None else out.add_(part)
    return out


class Conv2dOp:
    """y = conv2d(x, W, b) with integer padding (string / non-zero padding is applied before)."""

    def __init__(self, stride: tuple, padding: tuple, dilation: tuple, groups: int) -> None:
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def grad_input(self, g: torch.Tensor, x_shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(
            x_shape, w, g, self.stride, self.padding, self.dilation, self.groups
        )

    def grad_bias(self, g: torch.Tensor) -> torch.Tensor:
        return g.sum((0, 2, 3))

    def grad_at(
        self, g: torch.Tensor, x: torch.Tensor, w_shape: torch.Size, indices: torch.Tensor
    ) -> torch.Tensor:
        gw = torch.nn.grad.conv2d_weight(
            x, w_shape, g, self.stride, self.padding, self.dilation, self.groups
        )
        return gw.reshape(-1).index_select(0, indices)


class SparseDeltaFunction(torch.autograd.Function):
    """y = op(x, W0 + scatter(delta) [+ noise], b); saves no dense copy of the effective weight.

    ``noise`` is the dict of noise-amplitude buffers (or None); it is kept on ``ctx`` by reference.
    """

    @staticmethod
    def forward(ctx, x, delta, weight, bias, indices, noise, op, noise_amp, noise_seed, cache=None):
        if weight.requires_grad:
            raise RuntimeError(
                "the frozen weight W0 of a FROG layer requires grad; FROG trains only frog_delta "
                "(and, with train_bias, the bias). Call requires_grad_(False) on it again."
            )
        cdtype = autocast_dtype(x.device.type)
        x_dtype, bias_dtype = x.dtype, None if bias is None else bias.dtype
        cache = cache if cache is not None else W0Cache()  # W0[idx] for backward's write, at least
        hold = None
        if (ctx.needs_input_grad[0] and weight.device.type == "cpu" and not _noisy(noise, noise_amp)
                and _in_place(weight, indices)):
            hold = cache.hold(weight, delta, indices)  # W0 + δ stays in place for backward
        try:
            with torch.autocast(x.device.type, enabled=False), \
                    _weight_for(weight, delta, indices, noise, noise_amp, noise_seed, cache) as w:
                if cdtype is not None:
                    x, w = x.to(cdtype), w.to(cdtype)
                    bias = bias.to(cdtype) if bias is not None else None
                elif x.dtype != w.dtype:
                    raise RuntimeError(
                        f"input dtype {x.dtype} does not match the FROG layer's weight dtype {w.dtype}"
                    )
                y = op.forward(x, w, bias)
                del w
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        ctx.op, ctx.noise, ctx.noise_amp, ctx.noise_seed, ctx.cdtype = op, noise, noise_amp, noise_seed, cdtype
        ctx.cache, ctx.hold = cache, hold
        ctx.x_shape, ctx.x_dtype, ctx.bias_dtype = x.shape, x_dtype, bias_dtype
        need_x = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_x else None, delta, weight, indices)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, weight, indices = ctx.saved_tensors
        need_x, need_delta, _, need_bias = ctx.needs_input_grad[:4]
        gx = gd = gb = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out if ctx.cdtype is None else grad_out.to(ctx.cdtype)
            if need_x:
                try:  # writes W0 + δ again only if the forward's held write is gone
                    with _weight_for(weight, delta, indices, ctx.noise, ctx.noise_amp,
                                     ctx.noise_seed, ctx.cache) as w:
                        if ctx.cdtype is not None:
                            w = w.to(ctx.cdtype)
                        gx = ctx.op.grad_input(g, ctx.x_shape, w).to(ctx.x_dtype)
                        del w
                finally:
                    if ctx.hold is not None:
                        ctx.hold.release()
            if need_delta and indices.numel() > 0:
                gd = ctx.op.grad_at(g, x, weight.shape, indices).to(delta.dtype)
            elif need_delta:
                gd = torch.zeros_like(delta)
            if need_bias:
                gb = ctx.op.grad_bias(g).to(ctx.bias_dtype)
        return gx, gd, None, gb, None, None, None, None, None, None


def apply(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          indices: torch.Tensor, noise: Any, op: Any, amp: float, seed: int,
          cache: W0Cache | None = None) -> torch.Tensor:
    """``SparseDeltaFunction.apply`` with named arguments."""
    return SparseDeltaFunction.apply(x, delta, weight, bias, indices, noise, op, amp, seed, cache)
