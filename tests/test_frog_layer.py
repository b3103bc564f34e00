"""frogwatch.frog.layer: the noise amplitude and seed of each step, the step counter, the FROG layer
classes (reprs, conv2d padding modes and unbatched input against torch's own layers), helpers."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from frogwatch.frog import layer as L
from frogwatch.frog import ops
from frogwatch.frog.config import FrogConfig
from frogwatch.frog.engine import current_step, effective_weight, frog_layers, merge, prepare, set_step


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _masks(model, k=2):
    out = {}
    for n, m in model.named_modules():
        if L.frog_class(m) is not None:
            mask = torch.zeros(m.weight.numel(), dtype=torch.bool)
            mask[:k] = True
            out[n] = mask.view(m.weight.shape)
    return out


def test_noise_amplitude_and_seed_per_step_and_layer():
    model = _mlp()
    cfg = FrogConfig(noise_scale=0.5, noise_std=2.0, noise_schedule="linear", noise_steps=4, seed=7)
    prepare(model, _masks(model), cfg)
    x = torch.randn(5, 4)
    for step in range(3):
        model(x)  # one train-mode call = one step
        assert current_step(model) == step
        for i, name in enumerate(["0", "2"]):
            amp, seed = model.get_submodule(name).frog.noise()
            assert amp == pytest.approx(0.5 * 2.0 * (1 - step / 4), rel=1e-15)
            assert seed == ops.derive_seed(7, 1, step, i)
    model.eval()
    model(x)
    assert current_step(model) == 2  # eval calls do not advance the step
    assert model.get_submodule("0").frog.noise() == (0.0, 0)
    model.train()
    set_step(model, 9)
    model(x)
    assert current_step(model) == 10
    assert model.get_submodule("0").frog.noise()[0] == 0.0  # the linear decay is over
    quiet = _mlp()
    prepare(quiet, _masks(quiet), FrogConfig(seed=7))
    quiet(x)
    assert quiet.get_submodule("0").frog.noise() == (0.0, 0)  # noise_scale 0: none


def test_layer_called_before_the_model_warns_once_and_uses_step_zero():
    model = _mlp()
    prepare(model, _masks(model), noise_scale=1.0, seed=3)
    lin = model.get_submodule("2")
    with pytest.warns(UserWarning, match=r"^FROG noise: the step counter has not advanced"):
        amp, seed = lin.frog.noise()
    assert (amp, seed) == (1.0, ops.derive_seed(3, 1, 0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lin.frog.noise() == (1.0, ops.derive_seed(3, 1, 0, 1))  # no second warning


def test_step_helpers_validate():
    model = _mlp()
    with pytest.raises(ValueError) as e:
        current_step(model)
    assert str(e.value) == "model was not prepared by frogwatch.prepare (no FROG state found)"
    prepare(model, _masks(model))
    assert current_step(model) == -1 and L.state_of(model).settings == FrogConfig()
    set_step(model, -1)
    with pytest.raises(ValueError, match="set_step: step must be"):
        set_step(model, -2)


def test_reprs_name_the_trainable_count():
    model = _mlp()
    prepare(model, _masks(model, k=5), delta_dtype="float64")
    lin = model.get_submodule("0")
    assert lin.frog.extra_repr() == "k=5, dtype=torch.float64"
    assert lin.extra_repr() == "in_features=4, out_features=3, bias=True, frog_k=5"
    assert type(lin).__name__ == "FrogLinear" and isinstance(lin, nn.Linear)


def test_conv1d_class_repr_and_pickling(monkeypatch):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    monkeypatch.setattr(L, "_CONV1D_CLASSES", {})  # build the class here, not in an earlier test
    model = nn.Sequential(Conv1D(6, 4))  # nf=6 out, nx=4 in: weight (4, 6)
    assert L.is_conv1d(model[0]) and L.frog_class(model[0]) is L.frog_conv1d_class(Conv1D)
    assert L.frog_conv1d_class(Conv1D) is L.frog_conv1d_class(Conv1D)  # made once per base class
    prepare(model, _masks(model, k=3))
    assert repr(model[0]).startswith("FrogConv1D(nf=6, nx=4, frog_k=3)\n  (frog): FrogDelta(k=3")
    assert L.FrogConv1D is type(model[0])
    x = torch.randn(2, 4)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(x), model(x))
    assert L.FrogConv1D.__qualname__ == "FrogConv1D" and L.FrogConv1D.__module__ == "frogwatch.frog.layer"
    assert L.FrogConv1D._frog_base is Conv1D and L.FrogConv1D._frog_kind == "conv1d"
    assert "W0 + scatter(frog_delta)" in L.FrogConv1D.__doc__
    with pytest.raises(AttributeError) as e:
        L.FrogConv2D  # noqa: B018
    assert str(e.value) == "module 'frogwatch.frog.layer' has no attribute 'FrogConv2D'"
    monkeypatch.setitem(__import__("sys").modules, "transformers.pytorch_utils", None)
    with pytest.raises(AttributeError) as e:
        L.FrogConv1D  # noqa: B018
    assert str(e.value) == "FrogConv1D needs transformers (its Conv1D class)"


def test_frog_class_targets_exact_types_only():
    class MyLinear(nn.Linear):
        pass

    assert L.frog_class(nn.Linear(2, 2)) is L.FrogLinear
    assert L.frog_class(nn.Conv2d(1, 1, 1)) is L.FrogConv2d
    assert L.frog_class(MyLinear(2, 2)) is None and L.frog_class(nn.Embedding(3, 2)) is None
    assert not L.is_conv1d(nn.Linear(2, 2))
    with pytest.raises(ValueError) as e:
        effective_weight(nn.Linear(2, 2))
    assert str(e.value) == "Linear is not a FROG layer"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 1},
        {"padding": "same", "dilation": 2},
        {"padding": 1, "padding_mode": "circular"},
        {"padding": (1, 2), "padding_mode": "reflect"},
        {"padding": "valid", "padding_mode": "replicate"},
        {"padding": 0, "padding_mode": "reflect"},
    ],
)
@pytest.mark.parametrize("batched", [True, False])
def test_conv2d_layer_matches_torch_in_every_padding_mode(kwargs, batched):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, **kwargs).double()
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    x = x if batched else x[0]
    shifted = copy.deepcopy(conv)  # the reference: torch's own layer with W0 + delta
    with torch.no_grad():
        shifted.weight.view(-1)[:4] += 0.25
    want = conv(x)
    model = nn.Sequential(conv)
    prepare(model, _masks(model, k=4), init_scale=0.0)
    got = model(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        model[0].frog_delta.add_(0.25)
    torch.testing.assert_close(model(x), shifted(x), rtol=1e-12, atol=1e-12)
    model(x).square().sum().backward()  # the delta's gradient is that of the weight entries
    shifted(x).square().sum().backward()
    torch.testing.assert_close(model[0].frog_delta.grad, shifted.weight.grad.reshape(-1)[:4], rtol=1e-10, atol=1e-12)


def test_frog_layers_in_model_order_and_merge_restores_classes():
    model = _mlp()
    prepare(model, _masks(model))
    assert list(frog_layers(model)) == ["0", "2"]
    merge(model)
    assert frog_layers(model) == {} and type(model[0]) is nn.Linear
    assert math.isfinite(float(model(torch.randn(1, 4)).detach().sum()))
