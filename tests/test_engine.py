"""FROG training engine (frogwatch/frog/engine.py): gradients, state, init, noise, merge, delta I/O.

Masks are plain dicts of bool tensors (random or top-|W|), independent of the selection code.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from frogwatch.frog import ops as E
from frogwatch.frog.config import FrogConfig
from frogwatch.frog.layer import state_of
from frogwatch.frog.engine import (
    current_step, effective_weight, frog_layers, load_delta, merge, parameter_counts, prepare,
    print_trainable_parameters, save_delta, set_step,
)


def numpy_relevance(w: torch.Tensor) -> torch.Tensor:
    """Brute-force S_ij = sum_k sigma_k |u_ik| |v_jk| with numpy's SVD (docs/method.md#relevance)."""
    a = w.detach().double().reshape(w.shape[0], -1).numpy()
    u, sv, vt = np.linalg.svd(a, full_matrices=False)
    s = np.einsum("ik,k,jk->ij", np.abs(u), sv, np.abs(vt.T))
    return torch.from_numpy(s).reshape(w.shape)


def random_mask(shape, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < frac


def topk_mask(w, frac):
    k = max(1, int(frac * w.numel()))
    flat = torch.zeros(w.numel(), dtype=torch.bool)
    flat[w.detach().abs().reshape(-1).topk(k).indices] = True
    return flat.view(w.shape)


def linear_masks(model, frac=0.2, kinds=(nn.Linear,)):
    return {n: random_mask(m.weight.shape, frac, seed=i)
            for i, (n, m) in enumerate(model.named_modules()) if type(m) in kinds}


def scatter(mask, values):
    out = torch.zeros(mask.numel(), dtype=values.dtype)
    out[mask.reshape(-1).nonzero().squeeze(1)] = values
    return out.view(mask.shape)


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    """Two residual blocks; optionally checkpointed."""

    def __init__(self, d=24, ckpt=None):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 3)
        self.ckpt = ckpt  # None, "reentrant" or "nonreentrant"

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            if self.ckpt is None:
                h = b(h)
            else:
                h = checkpoint(b, h, use_reentrant=self.ckpt == "reentrant")
        return self.head(h)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def conv1d_cls():
    return pytest.importorskip("transformers.pytorch_utils").Conv1D


# ----------------------------------------------------------------------------------------------
# gradients against a dense masked reference
# ----------------------------------------------------------------------------------------------


def _make_layer(kind):
    torch.manual_seed(3)
    if kind == "linear":
        layer = nn.Linear(20, 30)
        x = torch.randn(4, 5, 20)
        fn = lambda x, w, b: F.linear(x, w, b)  # noqa: E731
    elif kind == "conv1d":
        layer = conv1d_cls()(30, 20)  # nf=30 out, nx=20 in; weight (20, 30)
        x = torch.randn(4, 5, 20)
        fn = lambda x, w, b: x @ w + b  # noqa: E731
    elif kind == "conv2d":
        layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        x = torch.randn(2, 4, 9, 9)
        fn = lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2)  # noqa: E731
    elif kind == "conv2d_same_reflect":
        layer = nn.Conv2d(3, 5, (3, 4), padding="same", padding_mode="reflect", dilation=(1, 2))
        x = torch.randn(2, 3, 8, 10)
        fn = lambda x, w, b: F.conv2d(  # noqa: E731
            F.pad(x, layer_pad, mode="reflect"), w, b, 1, 0, (1, 2), 1)
    layer_pad = getattr(layer, "_reversed_padding_repeated_twice", None)
    return layer, x, fn


@pytest.mark.parametrize("kind, grad_path", [
    ("linear", "dense"), ("linear", "block"), ("linear", "sparse"),
    ("conv1d", "dense"), ("conv1d", "block"), ("conv1d", "sparse"),
    ("conv2d", "dense"), ("conv2d_same_reflect", "dense"),  # conv2d always gathers densely
])
def test_delta_grad_equals_dense_masked_reference(kind, grad_path, monkeypatch):
    # force one of the three ways dense layers form delta's gradient
    cost = 0.0 if grad_path == "sparse" else float("inf")  # 0: SDDMM always, inf: never
    monkeypatch.setattr(E, "_SDDMM_COST", {torch.float32: cost})
    monkeypatch.setattr(E, "_SDDMM_COST_LOW", cost)
    monkeypatch.setattr(E, "_BLOCK_GRAD_MAX_FRACTION", 1.0 if grad_path == "block" else 0.0)
    layer, x, fn = _make_layer(kind)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    mask = random_mask(w0.shape, 0.3, seed=1)
    if w0.dim() == 2:  # concentrate the selection on some rows and columns, as FROG's does
        mask[::3] = False
        mask[:, 1::4] = False
    prepare(layer, {"": mask}, init_scale=0.05, train_bias=True)
    delta = layer.frog_delta
    assert delta.abs().sum() > 0  # non-trivial start

    x1 = x.clone().requires_grad_(True)
    r = torch.randn_like(layer(x1))
    (layer(x1) * r).sum().backward()

    # reference: autograd through a dense W whose gradient is then masked
    w_ref = (w0 + scatter(mask, delta.detach())).requires_grad_(True)
    b_ref = b0.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_ref = fn(x2, w_ref, b_ref)
    (y_ref * r).sum().backward()

    torch.testing.assert_close(layer(x).detach(), y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.grad, w_ref.grad[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_no_dense_copy_saved_for_backward():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    prepare(layer, {"": random_mask((96, 64), 0.1)})
    x = torch.randn(8, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    # only x, delta, W0 itself, the indices (and a None for relevance) are saved
    params = {layer.weight.data_ptr(), layer.frog_delta.data_ptr(), layer.frog_indices.data_ptr()}
    new = [t for t in saved if t.data_ptr() not in params]
    assert sum(t.numel() for t in new) == x.numel()


# ----------------------------------------------------------------------------------------------
# parameters, optimizer state, frozen entries, merge
# ----------------------------------------------------------------------------------------------


def test_trainable_count_is_k_and_optimizer_state_is_O_k(net, capsys):
    masks = linear_masks(net, 0.1)
    k = sum(int(m.sum()) for m in masks.values())
    n_base = sum(p.numel() for p in net.parameters())
    prepare(net, masks)
    trainable, total = parameter_counts(net)
    assert trainable == k and total == n_base + k
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [
        f"{n}.frog.delta" for n in masks]
    print_trainable_parameters(net)
    assert f"trainable params: {k:,d} || all params: {n_base + k:,d}" in capsys.readouterr().out

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(torch.randn(16, 12)).pow(2).mean().backward()
    opt.step()
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    assert state_numel == 2 * k  # exp_avg + exp_avg_sq, k each; no dense state anywhere
    assert all(p.grad is None for n, p in net.named_parameters() if "frog" not in n)


def test_frozen_entries_bit_identical_after_training_and_merge(net):
    base = copy.deepcopy(net)
    masks = {n: topk_mask(m.weight, 0.15) for n, m in net.named_modules() if type(m) is nn.Linear}
    prepare(net, masks, init_scale=0.01, noise_scale=0.05, seed=7)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        net(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
    sd, sd0 = net.state_dict(), base.state_dict()
    assert set(sd) - set(sd0) == {f"{n}.frog.{s}" for n in masks for s in ("delta", "indices")}
    for n, p0 in sd0.items():
        assert torch.equal(sd[n], p0), n  # W0 and biases untouched by training and noise
    deltas = {n: m.frog_delta.detach().clone() for n, m in frog_layers(net).items()}
    net.eval()
    x = torch.randn(5, 12)
    y_prepared = net(x)

    merge(net)
    for name, mask in masks.items():
        w, w0 = net.get_submodule(name).weight, base.get_submodule(name).weight
        assert torch.equal(w[~mask], w0[~mask])  # frozen entries bit-identical
        assert torch.equal(w[mask], w0[mask] + deltas[name])
        assert not torch.equal(w[mask], w0[mask])
    assert torch.equal(net(x), y_prepared)


def test_merged_model_holds_no_frogwatch_module(net):
    net.head.bias.requires_grad_(False)  # an original flag merge must restore
    prepare(net, linear_masks(net), init_scale=0.02)
    merge(net)
    for m in net.modules():
        assert not type(m).__module__.startswith("frogwatch.frog")
        assert not any(k.startswith("frog") for k in list(m._parameters) + list(m._buffers))
        assert not any(k.startswith("_frog") for k in vars(m))
    assert type(net.inp) is nn.Linear and not net._forward_pre_hooks
    assert not hasattr(net, "_frogwatch_state") and not frog_layers(net)
    assert [p.requires_grad for p in net.parameters()] == [
        not (n == "head.bias") for n, _ in net.named_parameters()]
    pickle.loads(pickle.dumps(net))
    with pytest.raises(ValueError, match="not prepared"):
        merge(net)


def test_init_scale_zero_gives_exact_pretrained_outputs(minilm_session):
    model = copy.deepcopy(minilm_session)
    masks = {n: random_mask(m.weight.shape, 0.01, seed=i)
             for i, (n, m) in enumerate(model.named_modules()) if type(m) is nn.Linear}
    assert len(masks) == 37  # 6 layers x 6 linears + pooler
    prepare(model, masks)
    model.eval()
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state,
                           minilm_session(input_ids=ids).last_hidden_state)


def test_relevance_scaled_init():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    s = numpy_relevance(w)
    assert s.shape == w.shape and bool((s >= w.double().abs() - 1e-12).all())
    mask = random_mask(w.shape, 0.5)

    def init(seed, masks, scale=0.1):
        layer = nn.Linear(30, 40)
        with torch.no_grad():
            layer.weight.copy_(w)
        return prepare(layer, masks, init_scale=scale, seed=seed).frog_delta.detach()

    d = init(1, {"": mask})
    assert torch.equal(d, init(1, {"": mask})) and not torch.equal(d, init(2, {"": mask}))
    eps = d.double() / (0.1 * s[mask])
    assert abs(eps.mean()) < 0.15 and 0.85 < eps.std() < 1.15  # N(0, 1) times 0.1 * S

    class WithScores(dict):  # a mapping that carries its own indices and scores
        def indices(self, name):
            return self[name].reshape(-1).nonzero().squeeze(1)

        def scores(self, name):
            return torch.full((int(self[name].sum()),), 2.0)

    d2 = init(1, WithScores({"": mask}))
    eps2 = d2.double() / (0.1 * 2.0)
    torch.testing.assert_close(eps2, eps, rtol=1e-5, atol=1e-6)  # same draw, scaled by given S


# ----------------------------------------------------------------------------------------------
# dynamic noise
# ----------------------------------------------------------------------------------------------


def test_noise_acts_only_in_train_mode(net):
    base = copy.deepcopy(net)
    prepare(net, linear_masks(net), noise_scale=0.1, seed=3)
    x = torch.randn(6, 12)
    assert current_step(net) == -1
    y1, y2 = net(x), net(x)
    assert current_step(net) == 1
    assert not torch.allclose(y1, y2)  # fresh noise every step
    net.eval()
    e1, e2 = net(x), net(x)
    assert current_step(net) == 1  # eval calls do not advance the step
    assert torch.equal(e1, e2) and torch.equal(e1, base.eval()(x))
    for n, p in base.named_parameters():
        assert torch.equal(net.get_parameter(n), p)  # noise never written into W0


def test_noise_is_reproducible_for_a_seed(net):
    runs = []
    for seed in (5, 5, 6):
        m = prepare(copy.deepcopy(net), linear_masks(net), noise_scale=0.1, seed=seed)
        x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
        runs.append(torch.stack([m(x) for _ in range(3)]))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_noise_regenerated_consistently_in_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32))
    mask = random_mask((32, 16), 0.25)
    prepare(model, {"0": mask}, init_scale=0.05, noise_scale=0.2, noise_std=0.5, seed=11)
    layer = model[0]
    w0, b = layer.weight.detach().clone(), layer.bias.detach()
    set_step(model, 4)
    # realise this step's noise densely: a layer called directly does not advance the step
    w_noisy = (layer(torch.eye(16)) - b).detach().t()
    assert torch.equal(w_noisy, layer(torch.eye(16)).detach().t() - b.unsqueeze(1))  # same step
    torch.testing.assert_close(w_noisy[mask], w0[mask] + layer.frog_delta.detach(), rtol=0,
                               atol=1e-6)
    ratio = ((w_noisy - w0) / numpy_relevance(w0).float())[~mask]
    assert 0.08 < ratio.std() < 0.12  # noise_scale * noise_std * S * N(0, 1) on frozen entries

    x = torch.randn(7, 16, requires_grad=True)
    r = torch.randn(7, 32)
    (layer(x) * r).sum().backward()
    w_ref = w_noisy.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, w_ref, b) * r).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)  # needs the same noise
    torch.testing.assert_close(layer.frog_delta.grad, w_ref.grad[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "callable"])
def test_noise_schedules_decay(net, schedule):
    sched = (lambda step: max(0.0, 1.0 - step / 2)) if schedule == "callable" else schedule
    prepare(net, linear_masks(net), noise_scale=0.5, noise_schedule=sched, noise_steps=2)
    x = torch.randn(3, 12)
    net.eval()
    clean = net(x)
    net.train()
    outs = [net(x) for _ in range(4)]  # steps 0..3
    assert not torch.allclose(outs[0], clean) and not torch.allclose(outs[1], clean)
    assert torch.equal(outs[2], clean) and torch.equal(outs[3], clean)  # decayed to 0 at step 2
    s = FrogConfig(noise_scale=1, noise_schedule=schedule if schedule != "callable" else sched,
                   noise_steps=4)
    assert s.schedule_factor(0) == 1.0 and s.schedule_factor(1) == pytest.approx(
        {"linear": 0.75, "cosine": 0.8535533905932737, "callable": 0.5}[schedule])


# ----------------------------------------------------------------------------------------------
# autocast, checkpointing, Conv1D models, pickling
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_autocast_bf16(net, sparse_grad, monkeypatch):
    monkeypatch.setattr(E, "_SDDMM_COST_LOW", 0.0 if sparse_grad else float("inf"))
    base = copy.deepcopy(net)
    masks = linear_masks(net)
    prepare(net, masks, init_scale=0.0)
    x = torch.randn(8, 12)
    net.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y, y_base = net(x), base.eval()(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_base)

    net.train()
    prepare_ref = copy.deepcopy(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x).float().pow(2).mean()
    loss.backward()
    for n, m in frog_layers(net).items():
        assert m.frog_delta.grad.dtype == torch.float32 and m.frog_delta.grad.abs().sum() > 0
    # reference: the same model with dense W requiring grad under autocast, gradient masked
    ref = merge(prepare_ref)
    for p in ref.parameters():
        p.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().pow(2).mean().backward()
    for n, m in frog_layers(net).items():
        g_ref = ref.get_submodule(n).weight.grad[masks[n]]
        torch.testing.assert_close(m.frog_delta.grad, g_ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("mode", ["nonreentrant", "reentrant"])
def test_gradient_checkpointing(net, mode):
    masks = linear_masks(net)
    plain = prepare(copy.deepcopy(net), masks, init_scale=0.02, noise_scale=0.1, seed=2)
    ckpt = prepare(copy.deepcopy(net), masks, init_scale=0.02, noise_scale=0.1, seed=2)
    ckpt.ckpt = mode
    x = torch.randn(5, 12)
    for model in (plain, ckpt):
        for _ in range(2):  # two steps: noise changes, recomputation must reuse this step's noise
            model.zero_grad()
            model(x).pow(2).sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
            assert p.grad.abs().sum() > 0


def test_gpt2_conv1d_model_exact_and_trainable():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    base = copy.deepcopy(model)
    masks = {n: random_mask(m.weight.shape, 0.1, i)
             for i, (n, m) in enumerate(model.named_modules()) if type(m).__name__ == "Conv1D"}
    assert len(masks) == 8
    prepare(model, masks, noise_scale=0.01)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(m.frog_delta.grad.abs().sum() > 0 for m in frog_layers(model).values())
    m2 = pickle.loads(pickle.dumps(model))  # FrogConv1D pickles by reference
    assert type(m2.transformer.h[0].attn.c_attn).__name__ == "FrogConv1D"
    merged = merge(model)
    assert type(merged.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D


def test_conv2d_model_train_and_merge(convnet):
    base = copy.deepcopy(convnet)
    masks = {n: topk_mask(m.weight, 0.05) for n, m in convnet.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    prepare(convnet, masks, init_scale=0.01, noise_scale=0.05)
    opt = torch.optim.SGD([p for p in convnet.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 3, 10, 10)
    for _ in range(2):
        opt.zero_grad()
        convnet(x).pow(2).mean().backward()
        opt.step()
    convnet.eval()
    y = convnet(x)
    merge(convnet)
    assert type(convnet.conv1) is nn.Conv2d and torch.equal(convnet(x), y)
    assert not torch.equal(y, base(x))


# ----------------------------------------------------------------------------------------------
# delta save / load
# ----------------------------------------------------------------------------------------------


def test_save_load_delta_roundtrip(net, tmp_path):
    base = copy.deepcopy(net)
    masks = linear_masks(net, 0.05)
    prepare(net, masks, init_scale=0.05, noise_scale=0.02, noise_schedule="linear",
            noise_steps=10, seed=9, train_bias=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(torch.randn(4, 12)).sum().backward()
    opt.step()
    path = save_delta(net, tmp_path / "d" / "delta.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["delta.safetensors"]  # no tmp left
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("inp.frog_indices").dtype == torch.int32
    assert meta["frogwatch_version"] and '"noise_schedule": "linear"' in meta["config"]

    x = torch.randn(3, 12)
    net.eval()
    fresh = load_delta(copy.deepcopy(base), path).eval()  # base model: prepared from the file
    assert torch.equal(fresh(x), net(x))
    assert state_of(fresh).config == state_of(net).config.replace(init_scale=0.0)
    again = prepare(copy.deepcopy(base), masks)  # already prepared with the same masks
    assert torch.equal(load_delta(again, path).eval()(x), net(x))

    other = prepare(copy.deepcopy(base), linear_masks(base, 0.3))
    with pytest.raises(ValueError, match="indices differ"):
        load_delta(other, path)
    wrong = Net(d=16)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_delta(wrong, path)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):
        load_delta(copy.deepcopy(base), tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def test_input_validation(net):
    good = linear_masks(net)
    cases = [
        ({"nope": good["inp"]}, {}, "not in the model"),
        ({"inp": torch.ones(3, 3, dtype=torch.bool)}, {}, "shape"),
        ({"inp": good["inp"].float()}, {}, "bool"),
        (good, {"init_scale": -1.0}, "init_scale"),
        (good, {"noise_std": 0.0}, "noise_std"),
        (good, {"noise_schedule": "exp"}, "noise_schedule"),
        (good, {"noise_schedule": "cosine"}, "noise_steps"),
    ]
    for masks, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            prepare(copy.deepcopy(net), masks, **kw)
    emb = nn.Sequential(nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="Embedding"):
        prepare(emb, {"0": torch.ones(5, 4, dtype=torch.bool)})
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        prepare(tied, {"0": torch.ones(4, 4, dtype=torch.bool)})
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="NonDynamicallyQuantizableLinear"):
        prepare(mha, {"out_proj": torch.ones(8, 8, dtype=torch.bool)})

    empty = {**good, "inp": torch.zeros_like(good["inp"])}
    with pytest.warns(UserWarning, match="select nothing"):
        prepare(net, empty)
    assert net.inp.frog_delta.numel() == 0
    net(torch.randn(2, 12)).sum().backward()  # a layer with k = 0 still runs
    with pytest.raises(ValueError, match="already prepared"):
        prepare(net, good)


def test_noise_step_warning_when_model_not_called():
    model = nn.Sequential(nn.Linear(4, 4))
    prepare(model, {"0": random_mask((4, 4), 0.5)}, noise_scale=0.1)
    with pytest.warns(UserWarning, match="step counter has not advanced"):
        model[0](torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 4))
    assert current_step(model) == 0
    assert effective_weight(model[0]).shape == (4, 4)


def test_analyze_and_compare_see_the_effective_weights():
    """A prepared model is analysed as W0 + scatter(delta), not as the frozen W0."""
    from frogwatch import analyze, compare

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 60), nn.ReLU(), nn.Linear(60, 50))
    tuned = prepare(copy.deepcopy(base), linear_masks(base, 0.3), init_scale=5.0, seed=1)
    for i in (0, 2):
        assert not torch.equal(effective_weight(tuned[i]), base[i].weight)
    df = analyze(tuned, progress=False).set_index("name")
    for i in ("0", "2"):
        w_eff = effective_weight(tuned[int(i)]).double().numpy()
        sv = np.linalg.svd(w_eff, compute_uv=False)
        assert df.loc[i, "norm"] == pytest.approx((sv**2).sum(), rel=1e-10)
        assert df.loc[i, "lambda_max"] == pytest.approx(sv.max() ** 2, rel=1e-10)
    cmp = compare(base, tuned).set_index("name")
    for i in ("0", "2"):
        dw = effective_weight(tuned[int(i)]).double() - base[int(i)].weight.detach().double()
        assert cmp.loc[i, "dW_fro"] == pytest.approx(float(dw.norm()), rel=1e-10)
