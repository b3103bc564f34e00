"""frogwatch.frog.ops building blocks against plain references: the seed mixer (splitmix64's
published outputs), the compact noise amplitude against numpy's S, the effective weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frogwatch.frog import ops

MASK64 = (1 << 64) - 1
GOLDEN, C1, C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def ref_seed(*parts: int) -> int:
    """splitmix64 with each part XORed into the state before its step, top bit dropped."""
    state = GOLDEN
    for p in parts:
        state = ((state ^ (p & MASK64)) + GOLDEN) & MASK64
        z = ((state ^ (state >> 30)) * C1) & MASK64
        z = ((z ^ (z >> 27)) * C2) & MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def np_S(W: np.ndarray, r: int | None = None) -> np.ndarray:
    U, s, Vt = np.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
    r = len(s) if r is None else r
    return (np.abs(U[:, :r]) * s[:r]) @ np.abs(Vt[:r])


def test_derive_seed_is_splitmix64():
    # splitmix64 from state 0 outputs 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, ...: one part 0 is
    # the second output (state 0 + golden, then one step)
    assert ops.derive_seed(0) == 0x6E789E6AA1B965F4
    assert ops.derive_seed() == GOLDEN & ((1 << 63) - 1)
    for parts in [(1,), (1, 2), (2, 1), (7, 0, 3), (2**64 - 1,), (-1,), (123456789, 2**40 + 5, 17)]:
        got = ops.derive_seed(*parts)
        assert got == ref_seed(*parts), parts
        assert 0 <= got < 2**63
    assert ops.derive_seed(1, 2) != ops.derive_seed(2, 1)


def test_generator_is_seeded_on_its_device():
    g = ops.generator(5, "cpu")
    assert g.device == torch.device("cpu")
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (5, 3, 2, 2)])
def test_noise_amplitude_codes_decode_to_s_within_the_coding_error(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    buf = ops.NoiseAmplitude.encode(W, None)
    assert set(buf) == {"noise_codes", "noise_lo", "noise_step"}
    rows = shape[0]
    assert buf["noise_codes"].dtype == torch.uint8 and buf["noise_codes"].shape == (rows, W[0].numel())
    assert buf["noise_lo"].dtype == torch.float32 and buf["noise_lo"].shape == (rows, 1)
    assert buf["noise_step"].dtype == torch.float32 and buf["noise_step"].shape == (rows, 1)
    S = np_S(W.numpy())
    floor = S.max(1, keepdims=True) * 1e-4  # entries below 1e-4 of their row's maximum are coded as that
    want = np.maximum(S, floor)
    got = ops.NoiseAmplitude.decode(buf, W.shape, torch.float64).reshape(rows, -1).numpy()
    np.testing.assert_allclose(got, want, rtol=0.019)  # ln(1e4) / 255 / 2 -> <= 1.8 % per entry
    # each row's extremes are coded exactly: code 0 is the row's smallest log, 255 its largest
    codes = buf["noise_codes"].numpy()
    assert (codes.min(1) == 0).all() and (codes.max(1) == 255).all()
    np.testing.assert_allclose(got.max(1), S.max(1), rtol=1e-6)
    assert ops.NoiseAmplitude.decode(buf, W.shape, torch.bfloat16).dtype == torch.bfloat16


def test_noise_amplitude_constant_rows_and_tiny_entries():
    W = torch.zeros(3, 4, dtype=torch.float64)
    W[0, 0] = 2.0  # rank one: rows 1 and 2 of S are zero, row 0 is 2 at (0, 0) and 0 elsewhere
    buf = ops.NoiseAmplitude.encode(W, None)
    assert torch.isfinite(buf["noise_lo"]).all() and (buf["noise_step"][1:] == 0).all()
    S = ops.NoiseAmplitude.decode(buf, W.shape, torch.float64)
    assert S[0, 0] == pytest.approx(2.0, rel=1e-6)
    assert S[0, 1:].tolist() == pytest.approx([2e-4] * 3, rel=1e-6)  # the 1e-4 floor of row 0
    assert (S[1:] < 1e-200).all()


@pytest.mark.parametrize("shape, r", [((9, 6), 2), ((6, 9), 2), ((7, 4), 10), ((5, 3, 2, 2), 3)])
def test_noise_amplitude_rank_r_factors(shape, r):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    buf = ops.NoiseAmplitude.encode(W, r)
    q = min(r, min(W.shape[0], W[0].numel()))
    assert set(buf) == {"noise_a", "noise_b"} and buf["noise_a"].dtype == torch.float32
    assert buf["noise_a"].shape == (shape[0], q) and buf["noise_b"].shape == (W[0].numel(), q)
    got = ops.NoiseAmplitude.decode(buf, W.shape, torch.float64)
    assert got.shape == W.shape
    np.testing.assert_allclose(got.reshape(shape[0], -1).numpy(), np_S(W.numpy(), q), rtol=1e-5, atol=1e-6)


def test_effective_weight_adds_delta_and_noise_only_off_the_selection():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 4, generator=g)
    idx = torch.tensor([1, 6, 19])
    delta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # added in the weight's dtype
    plain = ops.effective(W, delta, idx, None, 0.0, 0)
    want = W.clone().reshape(-1)
    want[idx] += delta.float()
    assert plain.dtype == W.dtype and plain.is_contiguous() and torch.equal(plain.reshape(-1), want)
    assert torch.equal(ops.effective(W.T, delta, idx, None, 0.0, 0).reshape(-1),
                       W.T.contiguous().reshape(-1).index_add(0, idx, delta.float()))  # fmt: skip
    buf = ops.NoiseAmplitude.encode(W, None)
    noisy = ops.effective(W, delta, idx.int(), buf, 0.3, 11)
    eps = torch.randn(W.shape, generator=torch.Generator().manual_seed(11))
    S = ops.NoiseAmplitude.decode(buf, W.shape, W.dtype)
    expect = (W + 0.3 * S * eps).reshape(-1)
    expect[idx] = W.reshape(-1)[idx] + delta.float()  # selected entries: W0 + delta exactly, no noise
    torch.testing.assert_close(noisy.reshape(-1), expect, rtol=1e-6, atol=1e-7)
    assert torch.equal(noisy.reshape(-1)[idx], W.reshape(-1)[idx] + delta.float())
    assert torch.equal(ops.effective(W, delta, idx, buf, 0.0, 11), plain)  # amplitude 0: no noise
    assert torch.equal(ops.effective(W, delta, idx, None, 0.3, 11), plain)  # no codes: no noise


def _dense_grad(g, x, transposed):
    """dL/dW of y = x Wᵀ (Linear, W (out, in)) or y = x W (Conv1D, W (in, out)), in float64."""
    g2, x2 = g.reshape(-1, g.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    return x2.t() @ g2 if transposed else g2.t() @ x2


def _force_path(monkeypatch, path):
    """SDDMM when k * cost <= cells of the used block; else the block product if it is at most
    _BLOCK_GRAD_MAX_FRACTION of W; else the dense product."""
    cost = 0.0 if path == "sddmm" else float("inf")
    monkeypatch.setattr(ops, "_SDDMM_COST", {torch.float32: cost, torch.float64: cost})
    monkeypatch.setattr(ops, "_SDDMM_COST_LOW", cost)
    monkeypatch.setattr(ops, "_BLOCK_GRAD_MAX_FRACTION", 1.0 if path == "block" else 0.0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("path", ["sddmm", "block", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_grad_at_equals_the_dense_gradient_on_every_path(monkeypatch, transposed, path, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64).to(dtype)  # (batch, seq, in)
    g = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64).to(dtype)  # (batch, seq, out)
    w_shape = torch.Size((7, 6) if transposed else (6, 7))
    idx = torch.tensor([0, 3, 8, 9, 10, 17, 29, 41])  # 8 of 42 entries, several rows and columns
    _force_path(monkeypatch, path)
    monkeypatch.setattr(ops, "_SPARSE_GRAD_CHUNK", 30)  # 30 // (7 + 6) = 2 tokens per chunk: 5 chunks
    got = ops.DenseOp(transposed).grad_at(g, x, w_shape, idx)
    want = _dense_grad(g, x, transposed).reshape(-1)[idx]
    if path == "sddmm":  # accumulated in float32 for bf16/fp16, else in the input's dtype
        assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    elif path == "sddmm":  # exact bf16 products, float32 sums
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # the product itself in bf16
        torch.testing.assert_close(got.double(), want, rtol=0, atol=0.02 * float(want.abs().max()))


def test_grad_at_one_token_per_chunk(monkeypatch):
    _force_path(monkeypatch, "sddmm")
    monkeypatch.setattr(ops, "_SPARSE_GRAD_CHUNK", 4)  # fewer than 7 + 6 columns: one token per chunk
    gen = torch.Generator().manual_seed(4)
    x, g = torch.randn(10, 7, generator=gen, dtype=torch.float64), torch.randn(10, 6, generator=gen, dtype=torch.float64)
    idx = torch.arange(0, 42, 5)
    got = ops.DenseOp(False).grad_at(g, x, torch.Size((6, 7)), idx)
    torch.testing.assert_close(got, _dense_grad(g, x, False).reshape(-1)[idx], rtol=1e-12, atol=1e-12)


def test_sddmm_choice_and_the_cached_plan(monkeypatch):
    """SDDMM runs when k x its cost per entry (in dense cells; set to 4 for float32/64 and 12 for
    bf16 here) is at most the cells of the block of used rows x columns; the plan is cached per
    index tensor."""
    monkeypatch.setattr(ops, "_SDDMM_COST", {torch.float32: 4.0, torch.float64: 4.0})
    monkeypatch.setattr(ops, "_SDDMM_COST_LOW", 12.0)
    calls = []
    real = ops._sddmm
    monkeypatch.setattr(ops, "_sddmm", lambda *a: calls.append(a[0].dtype) or real(*a))
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(4, 100, generator=gen, dtype=torch.float64), torch.randn(4, 50, generator=gen, dtype=torch.float64)
    op, shape = ops.DenseOp(False), torch.Size((50, 100))
    ref = _dense_grad(g, x, False).reshape(-1)
    diagonal = torch.arange(10) * 101  # rows 0-9 x columns 0-9: 100 cells >= 10 x 4
    block = torch.tensor([0, 1, 100, 101, 102, 205, 300, 301, 302, 303, 304])  # 4 x 6 = 24 cells < 11 x 4
    for idx, sddmm in ((diagonal, True), (block, False), (diagonal, True), (block, False)):
        n = len(calls)
        torch.testing.assert_close(op.grad_at(g, x, shape, idx), ref[idx], rtol=1e-12, atol=1e-12)
        assert (len(calls) > n) == sddmm, idx
    spread = torch.arange(0, 5000, 7)  # every row and column: 714 x 12 > 5000 cells in bf16
    got = op.grad_at(g.bfloat16(), x.bfloat16(), shape, spread)
    assert len(calls) == 2 and got.dtype == torch.bfloat16  # the dense bf16 product
    torch.testing.assert_close(got.double(), ref[spread], rtol=0, atol=0.05 * float(ref.abs().max()))
    got = op.grad_at(g, x, shape, spread)  # 714 x 4 <= 5000 cells in float64
    assert len(calls) == 3
    torch.testing.assert_close(got, ref[spread], rtol=1e-12, atol=1e-12)
    # the same index tensor changed in place is a new selection: the plan is rebuilt
    idx = block.clone()
    _force_path(monkeypatch, "block")
    op.grad_at(g, x, shape, idx)
    idx[-1] = 4999
    torch.testing.assert_close(op.grad_at(g, x, shape, idx), ref[idx], rtol=1e-12, atol=1e-12)


def test_single_selected_weight_gets_its_gradient():
    torch.manual_seed(0)
    W, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    delta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([6])  # W[1, 2]
    y = ops.apply(x, delta, W, None, idx, None, ops.DenseOp(False), 0.0, 0)
    y.square().sum().backward()
    Wd = W.clone().requires_grad_(True)
    (x @ Wd.t()).square().sum().backward()
    torch.testing.assert_close(delta.grad, Wd.grad.reshape(-1)[idx], rtol=1e-12, atol=1e-12)
