"""The in-place patch of W0 with the per-layer cache of W0[idx] (``patch.W0Cache``).

References: ``F.linear`` on the dense effective weight (``W0[mask] += delta`` in the weight's
dtype), the same training without the cache (``frog.w0_cache = None``: W0[idx] read from the
weight on every call, the former path), and the saved W0 itself (restored bit for bit).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frogwatch.frog import patch
from frogwatch.frog.model import merge, prepare


def random_mask(shape, frac, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < frac


def dense_effective(w0: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    w = w0.detach().clone()
    w[mask] += delta.detach().to(w.dtype)
    return w


def make_layer(dtype=torch.bfloat16, seed=0, shape=(18, 24), frac=0.3):
    torch.manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0]).to(dtype)
    mask = random_mask(shape, frac, seed)
    prepare(layer, {"": mask}, init_scale=0.5)
    return layer, mask


def train(layer, cached: bool, steps=3, dtype=torch.bfloat16):
    if not cached:
        layer.frog.w0_cache = None
    opt = torch.optim.AdamW([layer.frog_delta], lr=1e-2)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(7), dtype=dtype,
                    requires_grad=True)
    outs, gxs, gds = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        x.grad = None
        y = layer(x)
        y.float().square().sum().backward()
        outs.append(y.detach().clone())
        gxs.append(x.grad.clone())
        gds.append(layer.frog_delta.grad.clone())
        opt.step()
    return outs, gxs, gds, layer.frog_delta.detach().clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_training_is_bit_identical_to_the_uncached_path(dtype):
    a, _ = make_layer(dtype)
    b, _ = make_layer(dtype)
    ra, rb = train(a, True, dtype=dtype), train(b, False, dtype=dtype)
    for got, want in zip(ra[:3], rb[:3]):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert torch.equal(ra[3], rb[3])
    assert a.frog.w0_cache.entry is not None and b.frog.w0_cache is None


def test_forward_and_input_gradient_equal_the_dense_effective_weight_exactly():
    layer, mask = make_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 24, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 18, dtype=torch.bfloat16)
    for _ in range(2):  # the second call takes W0[idx] from the cache
        x.grad = None
        y = layer(x)
        y.backward(g)
        w_eff = dense_effective(w0, mask, layer.frog_delta)
        xr = x.detach().clone().requires_grad_(True)
        yr = F.linear(xr, w_eff, layer.bias.detach())
        yr.backward(g)
        assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)
        assert torch.equal(layer.weight, w0)
        with torch.no_grad():
            layer.frog_delta.add_(0.25)


def test_cache_holds_the_k_values_and_every_write_takes_them(monkeypatch):
    layer, mask = make_layer()
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    entry = layer.frog.w0_cache.entry
    assert entry[3].dtype == torch.bfloat16 and entry[3].shape == (int(mask.sum()),)
    assert torch.equal(entry[3], layer.weight.detach()[mask])
    reads = []
    real_get = patch.W0Cache.get

    def spy(self, weight, indices):
        out = real_get(self, weight, indices)
        reads.append(out)
        return out

    monkeypatch.setattr(patch.W0Cache, "get", spy)
    layer(x).sum().backward()
    layer(x.detach()).sum().backward()  # no input gradient: written and restored in the forward
    assert layer.frog.w0_cache.entry is entry  # not read again
    assert len(reads) == 2 and all(o is entry[3] for o in reads)


@pytest.mark.parametrize("change", ["no_grad_copy", "load_state_dict", "to_and_back", "assign",
                                    "data_write_then_clear", "new_indices"])
def test_cache_follows_legitimate_changes_of_w0(change):
    """After each change the layer computes with, and restores, the new W0 — not stale values."""
    layer, mask = make_layer()
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # fills the cache
    assert layer.frog.w0_cache.entry is not None
    new = torch.randn(18, 24).to(torch.bfloat16)
    if change == "no_grad_copy":
        with torch.no_grad():
            layer.weight.copy_(new)
    elif change == "load_state_dict":
        sd = layer.state_dict()
        sd["weight"] = new
        layer.load_state_dict(sd)
    elif change == "to_and_back":
        layer.to(torch.float32)
        with torch.no_grad():
            layer.weight.copy_(new.float())
        layer.to(torch.bfloat16)
    elif change == "assign":
        layer.weight = nn.Parameter(new.clone(), requires_grad=False)
    elif change == "data_write_then_clear":
        layer.weight.data.copy_(new)  # bypasses the version counter: the documented clear()
        layer.frog.w0_cache.clear()
    else:  # another selection of the same size, written in place as load_state_dict does
        new = layer.weight.detach().clone()
        mask = mask.roll(1, 0)
        layer.frog.indices.copy_(mask.reshape(-1).nonzero().squeeze(1).to(torch.int32))
    w_eff = dense_effective(new, mask, layer.frog_delta)
    x.grad = None
    y = layer(x)
    y.sum().backward()
    assert torch.equal(layer.weight, new)
    assert torch.equal(y, F.linear(x.detach(), w_eff, layer.bias.detach()))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_w0_restored_after_an_exception_inside_the_layer(where, monkeypatch):
    layer, mask = make_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # cache filled: the failing call patches from it
    op = layer._frog_op
    w_eff = dense_effective(w0, mask, layer.frog_delta)
    seen = []

    def boom(w):
        seen.append(torch.equal(w, w_eff))
        raise RuntimeError("boom")

    if where == "forward":
        monkeypatch.setattr(op, "forward", lambda x_, w, b: boom(w))
    else:
        monkeypatch.setattr(op, "grad_input", lambda g, shape, w: boom(w))
    with pytest.raises(RuntimeError, match="boom"):
        layer(x).sum().backward()
    assert seen == [True]  # it failed while W0 was patched
    assert torch.equal(layer.weight, w0)
    monkeypatch.undo()
    assert torch.equal(layer(x.detach()), F.linear(x.detach(), w_eff, layer.bias.detach()))


def test_copies_and_pickles_start_with_an_empty_cache():
    layer, mask = make_layer()
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    layer(x)
    assert layer.frog.w0_cache.entry is not None
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.frog.w0_cache is not layer.frog.w0_cache and other.frog.w0_cache.entry is None
        with torch.no_grad():
            other.weight.add_(1.0)  # the copy's own W0, not the original's cached values
        w0 = other.weight.detach().clone()
        assert torch.equal(other(x), F.linear(x, dense_effective(w0, mask, other.frog_delta), other.bias))
        assert torch.equal(other.weight, w0)


def test_merge_after_cached_training_adds_the_delta_once():
    layer, mask = make_layer()
    w0 = layer.weight.detach().clone()
    train(layer, True)
    w_eff = dense_effective(w0, mask, layer.frog_delta)
    merge(layer)
    assert torch.equal(layer.weight, w_eff)
