"""The held write of W0 + δ between a training forward on the CPU and its backward (``patch.Hold``).

A training forward leaves ``W0[idx] + δ`` in the weight's storage for the backward's input
gradient, which writes W0 back. References: ``F.linear`` on the dense effective weight
(``W0[mask] += δ`` in the weight's dtype) and the saved W0 itself (restored bit for bit). Raw
reads of the storage (``weight.data``) show what is in place; the layer's public readers must
never see the held write.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from frogwatch.frog import ops, patch
from frogwatch.frog.layer import effective_weight
from frogwatch.frog.model import merge, prepare


def make_layer(shape=(16, 16), frac=0.3, seed=0, init_scale=0.5):
    torch.manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0]).to(torch.bfloat16)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < frac
    prepare(layer, {"": mask}, init_scale=init_scale)
    return layer, mask, layer.weight.detach().clone()


def w_eff(w0, mask, layer):
    w = w0.clone()
    w[mask] += layer.frog_delta.detach().to(w.dtype)
    return w


def raw(layer):  # the storage as it is, without any of the layer's readers
    return layer.weight.data.clone()


def x_in(layer, seed=1, n=3):
    return torch.randn(n, layer.in_features, dtype=torch.bfloat16,
                       generator=torch.Generator().manual_seed(seed), requires_grad=True)


def reference(layer, w, x, g):
    xr = x.detach().clone().requires_grad_(True)
    y = F.linear(xr, w, layer.bias.detach())
    y.backward(g)
    return y, xr.grad


class CountIndexCopy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index_copy_.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_write_is_held_from_forward_to_backward_and_w0_restored_after():
    layer, mask, w0 = make_layer()
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    with CountIndexCopy() as count:
        y = layer(x)
        assert torch.equal(raw(layer), we) and layer.frog.w0_cache.holds == 1
        y.backward(g)
    assert count.n == 2  # one write in the forward, one restore after the input gradient
    assert torch.equal(raw(layer), w0) and layer.frog.w0_cache.holds == 0
    y_ref, gx_ref = reference(layer, we, x, g)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, gx_ref)


def test_without_an_input_gradient_the_forward_writes_and_restores_itself():
    layer, mask, w0 = make_layer()
    with CountIndexCopy() as count:
        y = layer(x_in(layer).detach())
        assert torch.equal(raw(layer), w0)
        y.sum().backward()
    assert count.n == 2 and layer.frog.w0_cache.holds == 0


def test_a_graph_freed_without_backward_restores_w0():
    layer, mask, w0 = make_layer()
    y = layer(x_in(layer))
    assert torch.equal(raw(layer), w_eff(w0, mask, layer))
    del y
    assert torch.equal(raw(layer), w0) and layer.frog.w0_cache.holds == 0


@pytest.mark.parametrize("reader", ["state_dict", "deepcopy", "pickle", "effective_weight"])
def test_readers_between_forward_and_backward_see_w0_and_backward_stays_exact(reader):
    layer, mask, w0 = make_layer()
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    if reader == "state_dict":
        assert torch.equal(layer.state_dict()["weight"], w0)
    elif reader in ("deepcopy", "pickle"):
        other = copy.deepcopy(layer) if reader == "deepcopy" else pickle.loads(pickle.dumps(layer))
        assert torch.equal(other.weight, w0)
        assert torch.equal(other(x.detach()), F.linear(x.detach(), we, layer.bias.detach()))
    else:
        assert torch.equal(effective_weight(layer), we)  # δ once, not on top of the held write
    assert torch.equal(raw(layer), w0)  # the reader restored W0 ...
    y.backward(g)  # ... and the backward wrote W0 + δ again for its input gradient
    assert torch.equal(x.grad, reference(layer, we, x, g)[1])
    assert torch.equal(raw(layer), w0)


@pytest.mark.parametrize("init_scale", [0.5, 0.0])
def test_a_refill_of_the_weight_between_forward_and_backward_is_detected(init_scale):
    """FSDP2 refills its unsharded weight from the shards before backward, keeping the version."""
    layer, mask, w0 = make_layer(init_scale=init_scale)
    with torch.no_grad():
        layer.frog_delta.add_(0.125 * torch.arange(layer.frog_delta.numel()) / layer.frog_delta.numel())
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    layer.weight.data.copy_(w0)  # W0 back in place, behind the layer's back
    y.backward(g)
    assert torch.equal(x.grad, reference(layer, we, x, g)[1])
    assert torch.equal(raw(layer), w0)


def test_a_refill_with_no_visible_delta_needs_no_write():
    layer, mask, w0 = make_layer(init_scale=0.0)  # δ = 0: W0 + δ is W0
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    layer.weight.data.copy_(w0)
    y.backward(g)
    assert torch.equal(x.grad, reference(layer, w0, x, g)[1])


def test_a_layer_used_twice_and_two_pending_graphs():
    layer, mask, w0 = make_layer()
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    y = layer(layer(x))  # two holds in one graph
    assert layer.frog.w0_cache.holds == 2
    y.float().square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    b = layer.bias.detach()
    F.linear(F.linear(xr, we, b), we, b).float().square().sum().backward()
    assert torch.equal(x.grad, xr.grad) and torch.equal(raw(layer), w0)

    x1, x2 = x_in(layer, 2), x_in(layer, 3)
    y1, y2 = layer(x1), layer(x2)
    y1.sum().backward()
    assert torch.equal(raw(layer), we)  # the second graph still holds the write
    y2.sum().backward()
    assert torch.equal(raw(layer), w0) and layer.frog.w0_cache.holds == 0
    ones = torch.ones(3, 16, dtype=torch.bfloat16)
    assert torch.equal(x1.grad, reference(layer, we, x1, ones)[1])
    assert torch.equal(x2.grad, reference(layer, we, x2, ones)[1])


def test_retain_graph_second_backward_writes_again_and_restores():
    layer, mask, w0 = make_layer()
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    y.backward(g, retain_graph=True)
    first = x.grad.clone()
    assert torch.equal(raw(layer), w0)
    x.grad = None
    y.backward(g)
    assert torch.equal(x.grad, first) and torch.equal(first, reference(layer, we, x, g)[1])
    assert torch.equal(raw(layer), w0)


def test_an_eval_forward_while_a_write_is_held():
    layer, mask, w0 = make_layer()
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x.detach()), F.linear(x.detach(), we, layer.bias.detach()))
    assert torch.equal(raw(layer), we)  # still held for y's backward
    y.sum().backward()
    assert torch.equal(raw(layer), w0)


def test_merge_and_a_new_step_after_an_abandoned_graph():
    layer, mask, w0 = make_layer()
    opt = torch.optim.SGD([layer.frog_delta], lr=0.5)
    x = x_in(layer)
    layer(x).sum().backward()
    opt.step()
    pending = layer(x)  # held with the new δ, never backpropagated
    opt.zero_grad()
    y = layer(x)  # two holds; same δ, nothing written twice
    y.sum().backward()
    we = w_eff(w0, mask, layer)
    assert torch.equal(raw(layer), we)  # `pending` still holds it
    assert torch.equal(merge(copy.deepcopy(layer)).weight, we)
    del pending
    assert torch.equal(raw(layer), w0)
    y = layer(x)  # held again: merge must add δ once
    assert torch.equal(merge(layer).weight, we)


@pytest.mark.parametrize("mode", ["nonreentrant", "reentrant"])
def test_gradient_checkpointing_without_noise(mode):
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
    masks = {f"{i}": torch.rand(16, 16) < 0.3 for i in range(3)}
    plain = prepare(copy.deepcopy(blocks), masks, init_scale=0.5)
    ckpt = prepare(copy.deepcopy(blocks), masks, init_scale=0.5)
    w0 = [b.weight.detach().clone() for b in plain]
    x = torch.randn(4, 16, requires_grad=True)
    for model, wrap in ((plain, False), (ckpt, True)):
        h = x
        for b in model:
            h = checkpoint(b, h, use_reentrant=mode == "reentrant") if wrap else b(h)
        h.square().sum().backward()
        for b, w in zip(model, w0):
            assert torch.equal(b.weight, w) and b.frog.w0_cache.holds == 0
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        if p.requires_grad:
            assert torch.equal(q.grad, p.grad)


def test_an_exception_in_the_forward_releases_the_hold(monkeypatch):
    layer, mask, w0 = make_layer()
    monkeypatch.setattr(layer._frog_op, "forward", lambda x, w, b: 1 / 0)
    with pytest.raises(ZeroDivisionError) as info:
        layer(x_in(layer))
    # checked while the traceback (and with it the forward's frame) is alive, as in a caller's
    # ``except Exception as e`` block
    assert info.tb is not None
    assert torch.equal(raw(layer), w0) and layer.frog.w0_cache.holds == 0


def test_ops_apply_without_a_layer_cache_holds_with_a_cache_of_its_own():
    """``ops.apply`` without a cache makes one per call; the write is still held until backward."""
    torch.manual_seed(0)
    w0 = torch.randn(8, 8).to(torch.bfloat16)
    w = w0.clone()
    idx = torch.tensor([1, 9, 30, 63])
    delta = torch.full((4,), 0.5, requires_grad=True)
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    y = ops.apply(x, delta, w, None, idx, None, ops.DenseOp(False), 0.0, 0)
    we = w0.clone()
    we.view(-1)[idx] += 0.5
    assert torch.equal(w, we)
    y.sum().backward()
    assert torch.equal(w, w0)
    assert torch.equal(x.grad, torch.ones(2, 8, dtype=torch.bfloat16) @ we)


def test_fully_shard_frog_shards_w0_not_a_held_write(monkeypatch):
    import torch.distributed.fsdp as fsdp

    from frogwatch.frog.distributed import fully_shard_frog

    torch.manual_seed(0)
    mask = torch.rand(16, 16) < 0.3
    model = prepare(nn.Sequential(nn.Linear(16, 16).to(torch.bfloat16)), {"0": mask}, init_scale=0.5)
    w0 = model[0].weight.detach().clone()
    seen = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: seen.append(raw(model[0])))
    pending = model(x_in(model[0]))  # noqa: F841  (a graph whose backward never comes)
    assert not torch.equal(raw(model[0]), w0)
    fully_shard_frog(model, blocks=[])
    assert len(seen) == 2 and all(torch.equal(s, w0) for s in seen)


def test_two_passes_also_when_delta_is_invisible():
    layer, mask, w0 = make_layer(init_scale=0.0)  # nothing to probe: W0 + δ is W0
    with CountIndexCopy() as count:
        layer(x_in(layer)).sum().backward()
    assert count.n == 2


def test_a_delta_changed_in_place_while_a_write_is_held_is_written_again():
    layer, mask, w0 = make_layer()
    x = x_in(layer)
    pending = layer(x)  # noqa: F841  (held with this δ)
    with torch.no_grad():
        layer.frog_delta.mul_(-1.0)  # a new version of the same tensor (an optimizer step)
    assert torch.equal(layer(x.detach()), F.linear(x.detach(), w_eff(w0, mask, layer), layer.bias.detach()))


@pytest.mark.parametrize("then", ["forward", "release"])
def test_a_reload_while_a_write_is_held(then):
    """New base weights loaded between a forward and its (never coming) backward are the new W0."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(256.0)  # a bf16 step of 2: δ = 0.5 is invisible against it
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.3
    prepare(layer, {"": mask})
    with torch.no_grad():
        layer.frog_delta.fill_(0.5)
    x = x_in(layer)
    pending = layer(x)
    new = torch.ones(16, 16, dtype=torch.bfloat16)  # δ = 0.5 is visible against 1
    layer.load_state_dict({"weight": new}, strict=False)  # (state_dict() itself would restore W0)
    if then == "forward":
        want = F.linear(x.detach(), w_eff(new, mask, layer), layer.bias.detach())
        assert torch.equal(layer(x.detach()), want)
    else:
        del pending  # its release must not write the old W0 into the new weights
        assert torch.equal(raw(layer), new)


def test_a_release_after_the_storage_was_freed_writes_nothing():
    """FSDP2 frees the unsharded weight's storage after forward (``resize_(0)``)."""
    w = torch.randn(8, 8).to(torch.bfloat16)
    idx = torch.tensor([1, 9, 30])
    cache = patch.W0Cache()
    hold = cache.hold(w, torch.full((3,), 0.5), idx)
    w.untyped_storage().resize_(0)
    hold.release()  # no write into the freed storage (its address is not the written one), no error
    assert cache.holds == 0 and cache.written is None


def test_a_failed_write_leaves_no_hold(monkeypatch):
    layer, mask, w0 = make_layer()

    def fail(*args):
        raise RuntimeError("write failed")

    monkeypatch.setattr(patch.W0Cache, "write", fail)
    with pytest.raises(RuntimeError, match="write failed"):
        layer(x_in(layer))
    assert layer.frog.w0_cache.holds == 0


@pytest.mark.parametrize("case", ["one_entry", "noise_decayed_to_zero"])
def test_two_passes_with_one_entry_and_with_noise_at_amplitude_zero(case):
    torch.manual_seed(0)
    layer = nn.Linear(16, 16).to(torch.bfloat16)
    if case == "one_entry":
        mask = torch.zeros(16, 16, dtype=torch.bool)
        mask[3, 5] = True
        prepare(layer, {"": mask}, init_scale=0.5)
    else:  # noise codes are kept, but the linear schedule is at 0 from the second step on
        mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.3
        prepare(layer, {"": mask}, init_scale=0.5, noise_scale=0.1, noise_schedule="linear",
                noise_steps=1)
        layer(x_in(layer)).sum().backward()  # step 0: noise on (a dense noisy copy, no write)
    w0 = layer.weight.detach().clone()
    we = w_eff(w0, mask, layer)
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    with CountIndexCopy() as count:
        y = layer(x)
        assert layer.frog.w0_cache.holds == 1  # written in place and held, not a dense copy
        y.backward(g)
    assert count.n == 2 and torch.equal(raw(layer), w0)
    y_ref, gx_ref = reference(layer, we, x, g)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, gx_ref)


def test_a_non_contiguous_weight_gets_a_dense_copy_and_is_never_written():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12).to(torch.bfloat16)
    w0 = layer.weight.detach().clone()
    layer.weight = nn.Parameter(w0.t().contiguous().t(), requires_grad=False)  # same values, strided
    mask = torch.rand(12, 16, generator=torch.Generator().manual_seed(0)) < 0.3
    prepare(layer, {"": mask}, init_scale=0.5)
    assert not layer.weight.is_contiguous()
    x = x_in(layer)
    g = torch.randn(3, 12, dtype=torch.bfloat16)
    with CountIndexCopy() as count:
        y = layer(x)
        y.backward(g)
    assert count.n == 0 and torch.equal(layer.weight, w0)
    y_ref, gx_ref = reference(layer, w_eff(w0, mask, layer), x, g)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, gx_ref)


def test_an_empty_selection_computes_with_w0():
    with pytest.warns(UserWarning, match="select nothing"):
        layer, _, w0 = make_layer(frac=0.0)
    x = x_in(layer)
    g = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    y.backward(g)
    y_ref, gx_ref = reference(layer, w0, x, g)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, gx_ref)
    assert layer.frog_delta.grad.shape == (0,)


def test_autocast_without_a_bias():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.3
    prepare(layer, {"": mask}, init_scale=0.5)
    w0 = layer.weight.detach().clone()
    w = w0.clone()
    w[mask] += layer.frog_delta.detach()
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.detach().to(torch.bfloat16), w.to(torch.bfloat16)))
    y.float().sum().backward()
    assert x.grad is not None and torch.equal(layer.weight, w0)


def test_clear_messages_for_a_trainable_w0_and_a_dtype_mismatch():
    layer, _, _ = make_layer()
    with pytest.raises(RuntimeError, match="^input dtype torch.float32 does not match the FROG "
                                           "layer's weight dtype torch.bfloat16$"):
        layer(torch.randn(2, 16))
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"^the frozen weight W0 of a FROG layer requires grad; "
                                           r"FROG trains only frog_delta \(and, with train_bias, "
                                           r"the bias\)\. Call requires_grad_\(False\) on it again\.$"):
        layer(x_in(layer))


def test_state_dict_keep_vars_between_forward_and_backward():
    layer, mask, w0 = make_layer()
    y = layer(x_in(layer))
    sd = layer.state_dict(keep_vars=True)
    assert sd["weight"] is layer.weight and torch.equal(sd["weight"], w0)
    y.sum().backward()
