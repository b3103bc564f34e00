"""FrogConfig, delta dtype, compact noise amplitude, the multi-chunk sparse gradient, delta files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frogwatch
from frogwatch.frog import ops
from frogwatch.frog.config import FrogConfig
from frogwatch.frog.io import load_delta, read_delta, save_delta
from frogwatch.frog.layer import frog_layers, state_of
from frogwatch.frog.model import prepare


def random_mask(shape, frac, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < frac


def numpy_relevance(w: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """S_ij = sum_{k<=rank} sigma_k |u_ik| |v_jk| from numpy's SVD."""
    a = w.detach().double().reshape(w.shape[0], -1).numpy()
    u, sv, vt = np.linalg.svd(a, full_matrices=False)
    r = len(sv) if rank is None else rank
    return torch.from_numpy(np.einsum("ik,k,jk->ij", np.abs(u[:, :r]), sv[:r], np.abs(vt[:r].T)))


# ----------------------------------------------------------------------------------------------
# FrogConfig
# ----------------------------------------------------------------------------------------------


def test_config_validates_and_roundtrips():
    c = FrogConfig(init_scale=0.1, noise_scale=0.2, noise_schedule="cosine", noise_steps=np.int64(5),
                   seed=np.int64(3), delta_dtype="float32")
    assert c.seed == 3 and type(c.seed) is int and type(c.noise_steps) is int
    assert FrogConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(TypeError, match="FrogConfig: seed must be an int"):
        FrogConfig(seed=True)
    with pytest.raises(ValueError, match="noise_std must be"):
        FrogConfig(noise_std=0.0)
    with pytest.raises(ValueError, match="delta_dtype"):
        FrogConfig(delta_dtype="int8")
    with pytest.raises(ValueError, match="noise_steps"):
        FrogConfig(noise_schedule="linear")
    with pytest.raises(TypeError, match="noise_schedule"):
        FrogConfig(noise_schedule=3)


def test_config_from_other_versions():
    with pytest.warns(UserWarning, match="unknown to this frogwatch version.*future_knob"):
        c = FrogConfig.from_dict({"noise_scale": 0.1, "future_knob": 1})
    assert c == FrogConfig(noise_scale=0.1)  # missing keys take their defaults

    def ramp(step):
        return 1.0

    d = FrogConfig(noise_scale=0.1, noise_schedule=ramp).to_dict()
    assert d["noise_schedule"] == "callable:ramp"
    with pytest.raises(ValueError, match="callable"):
        FrogConfig(noise_schedule=ramp).to_dict(strict=True)
    with pytest.raises(ValueError, match="pass noise_schedule="):
        FrogConfig.from_dict(d)
    assert FrogConfig.from_dict(d, noise_schedule=ramp).noise_schedule is ramp
    with pytest.raises(ValueError, match="pass noise_schedule="):  # files of the first version
        FrogConfig.from_dict({"noise_schedule": "callable"})


def test_prepare_accepts_a_config_and_keywords():
    layer = nn.Linear(8, 6)
    mask = random_mask((6, 8), 0.3)
    cfg = FrogConfig(noise_scale=0.1, seed=2)
    prepare(layer, {"": mask}, cfg, seed=5)
    assert state_of(layer).config == cfg.replace(seed=5)


# ----------------------------------------------------------------------------------------------
# delta dtype: fp32 master deltas on a bf16 model, no update lost
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta_dtype, expected", [
    ("auto", torch.float32), ("weight", torch.bfloat16), ("float32", torch.float32),
    ("bfloat16", torch.bfloat16),
])
def test_delta_dtype(delta_dtype, expected):
    layer = nn.Linear(16, 12).to(torch.bfloat16)
    prepare(layer, {"": random_mask((12, 16), 0.3)}, delta_dtype=delta_dtype)
    assert layer.frog_delta.dtype == expected
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.frog_delta.grad.dtype == expected


def _train_tiny_updates(delta_dtype: str, steps: int = 40):
    """SGD steps whose single updates lie far below the bf16 resolution of the weights."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 24).to(torch.bfloat16)
    mask = random_mask((24, 32), 0.25, seed=1)
    prepare(layer, {"": mask}, delta_dtype=delta_dtype)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    r = torch.randn(8, 24)
    opt = torch.optim.SGD([layer.frog_delta], lr=1e-5)
    total = torch.zeros(layer.frog_delta.numel(), dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        (layer(x).float() * r).sum().backward()
        total -= 1e-5 * layer.frog_delta.grad.double()
        opt.step()
    return layer, mask, total


def test_no_selected_update_lost_to_rounding():
    layer, mask, total = _train_tiny_updates("auto")
    d = layer.frog_delta.detach().double()
    w0 = layer.weight.detach()[mask].float()
    ulp = 2.0 ** (torch.floor(torch.log2(w0.abs().double())) - 7)  # bf16 spacing at |W0|
    step_size = 1e-5 * layer.frog_delta.grad.abs().double()
    assert bool((step_size[total != 0] < 0.5 * ulp[total != 0]).float().mean() > 0.9)  # tiny steps
    assert bool((total != 0).all())
    torch.testing.assert_close(d, total, rtol=1e-4, atol=1e-9)  # every update kept, summed
    # the same training with bf16 deltas loses updates: the check above can fail
    layer16, _, total16 = _train_tiny_updates("bfloat16")
    err = (layer16.frog_delta.detach().double() - total16).abs() / total16.abs().clamp_min(1e-12)
    assert bool((err > 1e-2).any())


# ----------------------------------------------------------------------------------------------
# compact noise amplitude
# ----------------------------------------------------------------------------------------------


def test_noise_amplitude_is_compact_and_close_to_s():
    torch.manual_seed(0)
    layer = nn.Linear(48, 40)
    prepare(layer, {"": random_mask((40, 48), 0.1)}, noise_scale=0.1)
    buffers = dict(layer.frog.named_buffers())
    assert buffers["noise_codes"].dtype == torch.uint8 and buffers["noise_codes"].shape == (40, 48)
    dense_float = [n for n, b in layer.named_buffers() if b.is_floating_point() and b.numel() >= 40 * 48]
    assert dense_float == []  # no dense float copy of S kept
    s = ops.NoiseAmplitude.decode(layer.frog.noise_buffers(), layer.weight.shape, torch.float64)
    ref = numpy_relevance(layer.weight)
    rel = ((s - ref).abs() / ref).max()
    assert rel < 0.02  # one byte, log scale per row


def test_noise_rank_factors_give_the_partial_sum():
    torch.manual_seed(0)
    layer = nn.Linear(48, 40)
    prepare(layer, {"": random_mask((40, 48), 0.1)}, noise_scale=0.1, noise_rank=6)
    buffers = layer.frog.noise_buffers()
    assert sum(b.numel() for b in buffers.values()) == 6 * (40 + 48)
    s = ops.NoiseAmplitude.decode(buffers, layer.weight.shape, torch.float64)
    torch.testing.assert_close(s, numpy_relevance(layer.weight, rank=6), rtol=1e-4, atol=1e-6)
    wide = nn.Linear(60, 20)  # the other orientation (fewer rows than columns)
    prepare(wide, {"": random_mask((20, 60), 0.1)}, noise_scale=0.1, noise_rank=5)
    s = ops.NoiseAmplitude.decode(wide.frog.noise_buffers(), wide.weight.shape, torch.float64)
    torch.testing.assert_close(s, numpy_relevance(wide.weight, rank=5), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the multi-chunk sparse gradient against the dense masked reference
# ----------------------------------------------------------------------------------------------


def _force_sddmm(monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(ops, "_SDDMM_COST", {})  # cost 0 for every dtype: always the SDDMM path
    monkeypatch.setattr(ops, "_SDDMM_COST_LOW", 0.0)
    monkeypatch.setattr(ops, "_SPARSE_GRAD_CHUNK", chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("chunk_tokens, index_dtype", [  # 3 chunks (5, 5, 2 tokens) / all 12 at once
    (5, torch.int32), (12, torch.int32), (5, torch.int64)])
def test_multi_chunk_sparse_gradient(monkeypatch, dtype, transposed, chunk_tokens, index_dtype):
    torch.manual_seed(0)
    tokens, n_in, n_out = 12, 20, 30
    _force_sddmm(monkeypatch, chunk_tokens * (n_in + n_out))
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    mask = random_mask(shape, 0.15, seed=2)
    mask[3] = False  # an empty row in the CSR pattern
    g = torch.randn(tokens, n_out, dtype=dtype)
    x = torch.randn(tokens, n_in, dtype=dtype)
    idx = mask.reshape(-1).nonzero().squeeze(1).to(index_dtype)
    got = ops.DenseOp(transposed).grad_at(g, x, torch.Size(shape), idx)
    dense = (x.double().t() @ g.double()) if transposed else (g.double().t() @ x.double())
    assert got.dtype == torch.float32  # bf16 products are accumulated in float32
    torch.testing.assert_close(got.double(), dense[mask], rtol=1e-5, atol=1e-5)


def test_gradient_plan_follows_the_indices(monkeypatch):
    """The cached CSR pattern follows the layer's indices: a new tensor, or new values copied in."""
    _force_sddmm(monkeypatch, 1 << 20)
    torch.manual_seed(0)
    op, g, x = ops.DenseOp(False), torch.randn(6, 9), torch.randn(6, 7)
    dense = g.double().t() @ x.double()
    masks = [random_mask((9, 7), 0.3, seed=seed) for seed in (1, 2, 3)]
    masks[2] = masks[1].roll(1, 0)  # the same count as masks[1], other rows
    idx = masks[0].reshape(-1).nonzero().squeeze(1).to(torch.int32)
    for i, mask in enumerate(masks):
        new = mask.reshape(-1).nonzero().squeeze(1).to(torch.int32)
        if i == 2:
            idx.copy_(new)  # in place, as load_state_dict writes a buffer
        else:
            idx = new
        got = op.grad_at(g, x, torch.Size((9, 7)), idx)
        torch.testing.assert_close(got.double(), dense[mask], rtol=1e-6, atol=1e-6)


def test_multi_chunk_gradient_through_the_layer(monkeypatch):
    _force_sddmm(monkeypatch, 4 * (10 + 14))  # 6 tokens in chunks of 4 and 2
    torch.manual_seed(1)
    layer = nn.Linear(10, 14)
    mask = random_mask((14, 10), 0.4, seed=3)
    prepare(layer, {"": mask}, init_scale=0.1)
    x = torch.randn(2, 3, 10)
    r = torch.randn(2, 3, 14)
    (layer(x) * r).sum().backward()
    w = layer.weight.detach().clone()
    w[mask] += layer.frog_delta.detach()
    w.requires_grad_(True)
    (F.linear(x, w, layer.bias.detach()) * r).sum().backward()
    torch.testing.assert_close(layer.frog_delta.grad, w.grad[mask], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# delta files and mask mismatches
# ----------------------------------------------------------------------------------------------


def test_mask_mismatch_error_is_public_and_raised():
    assert issubclass(frogwatch.MaskMismatchError, ValueError)
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(frogwatch.MaskMismatchError, match="not in the model"):
        prepare(net, {"9": torch.ones(6, 4, dtype=torch.bool)})
    with pytest.raises(frogwatch.MaskMismatchError, match="shape"):
        prepare(net, {"0": torch.ones(4, 6, dtype=torch.bool)})


def test_delta_file_from_another_version_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    prepare(net, {"0": random_mask((6, 4), 0.5)}, noise_scale=0.1)
    path = save_delta(net, tmp_path / "d.safetensors")
    f = read_delta(path)
    assert f.masks.fingerprint == f.meta["fingerprint"] and list(f.masks) == ["0"]
    assert FrogConfig.from_dict(f.config) == state_of(net).config
    tensors = {"0.frog_indices": torch.tensor([0, 1], dtype=torch.int32),
               "0.frog_delta": torch.zeros(2)}
    cases = {
        "v2": {"format": "frogwatch.delta", "format_version": "2"},
        "nolayers": {"format": "frogwatch.delta", "format_version": "1", "config": "{}"},
        "badjson": {"format": "frogwatch.delta", "format_version": "1", "layers": "{", "config": "{}"},
    }
    for name, meta in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(p), metadata=meta)
        with pytest.raises(ValueError) as e:
            load_delta(nn.Sequential(nn.Linear(4, 6)), p)
        assert not isinstance(e.value, KeyError) and "\n" not in str(e.value)
    with pytest.raises(frogwatch.MaskMismatchError, match="does not fit"):
        load_delta(nn.Sequential(nn.Linear(5, 6)), path)
    fresh = load_delta(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), path)
    assert list(frog_layers(fresh)) == ["0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_patch_leaves_w0_bit_identical(dtype):
    """Without noise the layer writes W0 + delta into the k selected entries and restores them."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 18).to(dtype)
    w0 = layer.weight.detach().clone()
    version = layer.weight._version
    mask = random_mask((18, 24), 0.3)
    prepare(layer, {"": mask}, init_scale=0.1)
    opt = torch.optim.AdamW([layer.frog_delta], lr=1e-2)
    x = torch.randn(5, 24, dtype=dtype, requires_grad=True)
    for _ in range(3):
        opt.zero_grad()
        layer(x).float().pow(2).sum().backward()
        opt.step()
    assert torch.equal(layer.weight, w0) and layer.weight._version == version
    w_eff = w0.clone()
    w_eff[mask] += layer.frog_delta.detach().to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, w_eff, layer.bias))  # the merged weight, exactly
