"""frogwatch.frog.model: prepare's mask checks and messages, the relevance-scaled init against numpy's
S, merge and the parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from frogwatch.frog import Masks, MaskMismatchError
from frogwatch.frog import ops
from frogwatch.frog.engine import merge, parameter_counts, prepare, print_trainable_parameters


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _mask(shape, idx):
    m = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    m[list(idx)] = True
    return m.view(shape)


def np_S(W):
    U, s, Vt = np.linalg.svd(W.detach().double().reshape(W.shape[0], -1).numpy(), full_matrices=False)
    return (np.abs(U) * s) @ np.abs(Vt)


def test_init_is_relevance_scaled_gaussian_seeded_per_layer():
    model = _mlp()
    W0, W2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    masks = {"0": _mask((3, 4), [1, 5, 11]), "2": _mask((2, 3), [0, 4])}
    prepare(model, masks, init_scale=0.1, seed=4, delta_dtype="float64")
    for i, (name, W, idx) in enumerate([("0", W0, [1, 5, 11]), ("2", W2, [0, 4])]):
        eps = torch.randn(len(idx), generator=torch.Generator().manual_seed(ops.derive_seed(4, 0, i)),
                          dtype=torch.float64)  # fmt: skip
        want = 0.1 * torch.from_numpy(np_S(W).reshape(-1)[idx]) * eps
        torch.testing.assert_close(model.get_submodule(name).frog_delta.detach(), want, rtol=1e-12, atol=0)


def test_init_uses_given_scores_and_recomputes_unknown_ones():
    model = _mlp()
    W0 = model[0].weight.detach().clone()
    idx = torch.tensor([1, 5, 11])
    given = Masks.from_indices({"0": idx}, {"0": (3, 4)}, scores={"0": torch.tensor([1.0, 2.0, 4.0])})
    prepare(model, given, init_scale=1.0, seed=0, delta_dtype="float64")
    eps = torch.randn(3, generator=torch.Generator().manual_seed(ops.derive_seed(0, 0, 0)), dtype=torch.float64)
    torch.testing.assert_close(model[0].frog_delta.detach(), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) * eps)
    unknown = _mlp()
    prepare(unknown, Masks.from_indices({"0": idx}, {"0": (3, 4)}), init_scale=1.0, seed=0, delta_dtype="float64")
    torch.testing.assert_close(unknown[0].frog_delta.detach(), torch.from_numpy(np_S(W0).reshape(-1)[idx]) * eps,
                               rtol=1e-12, atol=0)  # fmt: skip
    zero = _mlp()
    prepare(zero, {"0": _mask((3, 4), [2])}, init_scale=0.0)
    assert zero[0].frog_delta.tolist() == [0.0] and zero[0].frog_delta.dtype == torch.float32


class _Indexed(dict):
    """A mapping with indices()/scores(), like Masks."""

    def __init__(self, masks, indices, scores=None):
        super().__init__(masks)
        self._i, self._s = indices, scores or {}

    def indices(self, name):
        return self._i[name]

    def scores(self, name):
        return self._s[name]


def test_mask_validation_messages():
    cases = [
        ({"0": [[True]]}, ValueError, "mask for '0' must be a torch.Tensor, got list"),
        ({"0": torch.ones(3, 4)}, ValueError, "mask for '0' must be a bool tensor, got dtype torch.float32"),
        ({"0": torch.ones(4, 3, dtype=torch.bool)}, MaskMismatchError,
         "mask for '0' has shape (4, 3), but the module's weight has shape (3, 4)"),
        ({"x": torch.ones(1, dtype=torch.bool), "y.z": torch.ones(1, dtype=torch.bool)}, MaskMismatchError,
         "masks name 2 module(s) not in the model, e.g. ['x', 'y.z']; keys must be qualified module names as "
         "in model.named_modules()"),
        ({"1": torch.ones(1, dtype=torch.bool)}, ValueError,
         "module '1' is a ReLU; FROG targets nn.Linear, Hugging Face Conv1D and nn.Conv2d (exact classes; "
         "subclasses may be used through their weight by a parent module and are refused)"),
    ]
    for masks, err, message in cases:
        with pytest.raises(err) as e:
            prepare(_mlp(), masks)
        assert str(e.value) == message
    m = _mask((3, 4), [1, 5])
    for idx in ([1], [5, 1], [1, 12], [-1, 5], [1, 1]):
        with pytest.raises(ValueError) as e:
            prepare(_mlp(), _Indexed({"0": m}, {"0": torch.tensor(idx)}))
        assert str(e.value) == "masks.indices('0') must be the 2 sorted, unique flat indices of the mask"
    one = _mask((3, 4), [11])  # one index, the last entry
    model = _mlp()
    prepare(model, _Indexed({"0": one}, {"0": torch.tensor([11])}))
    assert model[0].frog_indices.tolist() == [11] and model[0].frog_indices.dtype == torch.int32
    with pytest.raises(ValueError) as e:
        prepare(_mlp(), _Indexed({"0": m}, {"0": torch.tensor([1, 5])}, {"0": torch.ones(3)}), init_scale=1.0)
    assert str(e.value) == "masks.scores('0') has 3 entries, expected 2"


def test_tied_weights_and_double_prepare_are_refused():
    model = _mlp()
    tied = nn.Sequential(model[0], nn.Linear(4, 3))
    tied[1].weight = model[0].weight
    with pytest.raises(ValueError) as e:
        prepare(tied, {"1": _mask((3, 4), [0])})
    assert str(e.value) == "the weight of '1' is shared with another module (tied); FROG cannot target tied weights"
    prepare(model, {"0": _mask((3, 4), [0])})
    with pytest.raises(ValueError) as e:
        prepare(model, {"2": _mask((2, 3), [0])})
    assert str(e.value) == "model is already prepared by frogwatch; merge() it first"


def test_prepare_warns_about_empty_selections():
    with pytest.warns(UserWarning, match=r"^masks select no layer; prepare\(\) only freezes the model$"):
        prepare(_mlp(), {})
    with pytest.warns(UserWarning, match=r"^2 mask\(s\) select nothing, e.g. \['0', '2'\]; those layers get no"):
        prepare(_mlp(), {"0": torch.zeros(3, 4, dtype=torch.bool), "2": torch.zeros(2, 3, dtype=torch.bool)})


def test_train_bias_and_requires_grad_restored_by_merge():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    prepare(model, {"0": _mask((3, 4), [0, 1]), "2": _mask((2, 3), [2])}, train_bias=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.bias", "2.bias", "0.frog.delta", "2.frog.delta"}
    assert parameter_counts(model) == (3 + 2 + 2 + 1, 12 + 3 + 6 + 2 + 3)
    with torch.no_grad():
        model[0].frog_delta.copy_(torch.tensor([0.5, -0.5]))
    W = model[0].weight.detach().clone().reshape(-1)
    merge(model)
    want = W.clone()
    want[:2] += torch.tensor([0.5, -0.5])
    assert torch.equal(model[0].weight.detach().reshape(-1), want)
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert parameter_counts(model) == (12 + 3 + 6, 12 + 3 + 6 + 2)
    assert not model._forward_pre_hooks


def test_merge_into_a_non_contiguous_weight():
    model = _mlp()
    with torch.no_grad():
        model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())  # Fortran order
    assert not model[0].weight.is_contiguous()
    W = model[0].weight.detach().clone()
    prepare(model, {"0": _mask((3, 4), [1, 6])})
    with torch.no_grad():
        model[0].frog_delta.fill_(1.0)
    merge(model)
    want = W.clone().reshape(-1)
    want[[1, 6]] += 1.0
    assert torch.equal(model[0].weight.detach().reshape(-1), want)


def test_print_trainable_parameters(capsys):
    model = _mlp()
    prepare(model, {"0": _mask((3, 4), [0, 1, 2])})
    print_trainable_parameters(model)
    assert capsys.readouterr().out == "trainable params: 3 || all params: 26 || trainable%: 11.5385\n"
    print_trainable_parameters(nn.Sequential())
    assert capsys.readouterr().out == "trainable params: 0 || all params: 0 || trainable%: 0.0000\n"


# ---- behaviours pinned after reading the mutation survivors (BENCHMARKS.md §6) -------------------


def test_prepare_type_errors_name_the_argument():
    cases = [
        (("not a model", {}), {}, "prepare: model must be an nn.Module, got 'not a model'"),
        ((_mlp(), [1, 2]), {}, "prepare: masks must be a Mapping[str, Tensor], got 'list'"),
        ((_mlp(), {}), {"config": 3}, "prepare: config must be a FrogConfig or None, got 3"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(TypeError) as e:
            prepare(*args, **kwargs)
        assert str(e.value) == message


def _deep(n):
    torch.manual_seed(1)
    return nn.Sequential(*[nn.Linear(3, 3) for _ in range(n)])


def test_messages_list_at_most_three_names():
    with pytest.raises(MaskMismatchError) as e:
        prepare(_mlp(), {n: torch.ones(1, dtype=torch.bool) for n in ("a", "b", "c", "d")})
    assert "masks name 4 module(s) not in the model, e.g. ['a', 'b', 'c']; keys" in str(e.value)
    with pytest.warns(UserWarning, match=r"^4 mask\(s\) select nothing, e.g. \['0', '1', '2'\]; those layers"):
        prepare(_deep(4), {str(i): torch.zeros(3, 3, dtype=torch.bool) for i in range(4)})


def test_prepare_warnings_point_at_the_callers_line():
    with pytest.warns(UserWarning) as rec:
        prepare(_mlp(), {})
    assert rec[0].filename == __file__
    with pytest.warns(UserWarning) as rec:
        prepare(_mlp(), {"0": torch.zeros(3, 4, dtype=torch.bool)})
    assert rec[0].filename == __file__


def test_preparing_a_prepared_model_again_is_refused_also_without_layers_or_state():
    empty = _mlp()
    with pytest.warns(UserWarning):
        prepare(empty, {})  # state on the model, no FROG layer
    with pytest.raises(ValueError, match="already prepared"):
        prepare(empty, {"0": _mask((3, 4), [0])})
    inner = _mlp()
    prepare(inner, {"0": _mask((3, 4), [0])})
    outer = nn.Sequential(inner)  # FROG layers, no state on the wrapper
    with pytest.raises(ValueError, match="already prepared"):
        prepare(outer, {"0.2": _mask((2, 3), [0])})


def test_state_lists_the_targeted_layers_in_model_order():
    from frogwatch.frog.layer import state_of

    model = _mlp()
    prepare(model, {"2": _mask((2, 3), [0]), "0": _mask((3, 4), [1])})
    assert state_of(model).layers == ("0", "2")


def test_init_of_a_single_selected_entry_and_dtype_of_a_zero_init():
    model = _mlp()
    W = model[0].weight.detach().clone()
    prepare(model, {"0": _mask((3, 4), [7])}, init_scale=1.0, seed=2, delta_dtype="float64")
    eps = torch.randn(1, generator=torch.Generator().manual_seed(ops.derive_seed(2, 0, 0)), dtype=torch.float64)
    want = torch.from_numpy(np_S(W).reshape(-1)[[7]]) * eps
    assert float(want.abs()) > 0
    torch.testing.assert_close(model[0].frog_delta.detach(), want, rtol=1e-12, atol=0)
    zero = _mlp()
    prepare(zero, {"0": _mask((3, 4), [2, 3])}, init_scale=0.0, delta_dtype="float64")
    assert zero[0].frog_delta.dtype == torch.float64 and zero[0].frog_delta.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("score, uses_given", [("relevance", True), ("balanced", True), ("magnitude", False),
                                               ("random", False)])  # fmt: skip
def test_init_uses_stored_scores_only_when_they_are_the_relevance(score, uses_given):
    model = _mlp()
    W0 = model[0].weight.detach().clone()
    idx = torch.tensor([1, 5, 11])
    given = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    masks = Masks.from_indices({"0": idx}, {"0": (3, 4)}, scores={"0": given}, score=score)
    prepare(model, masks, init_scale=1.0, seed=0, delta_dtype="float64")
    eps = torch.randn(3, generator=torch.Generator().manual_seed(ops.derive_seed(0, 0, 0)), dtype=torch.float64)
    S = given if uses_given else torch.from_numpy(np_S(W0).reshape(-1)[idx])
    torch.testing.assert_close(model[0].frog_delta.detach(), S * eps, rtol=1e-12, atol=0)


def test_init_keeps_float64_scores_given_as_python_floats():
    model = _mlp()
    m = _mask((3, 4), [1, 5])
    prepare(model, _Indexed({"0": m}, {"0": torch.tensor([1, 5])}, {"0": [0.1, 0.3]}), init_scale=1.0, seed=0,
            delta_dtype="float64")  # fmt: skip
    eps = torch.randn(2, generator=torch.Generator().manual_seed(ops.derive_seed(0, 0, 0)), dtype=torch.float64)
    assert torch.equal(model[0].frog_delta.detach(), torch.tensor([0.1, 0.3], dtype=torch.float64) * eps)


def test_indices_must_be_sorted_beyond_the_first_pair():
    m = _mask((3, 4), [1, 3, 5])
    with pytest.raises(ValueError, match="sorted, unique flat indices"):
        prepare(_mlp(), _Indexed({"0": m}, {"0": torch.tensor([1, 5, 3])}))


def test_indices_of_a_weight_beyond_int32_are_int64():
    from frogwatch.frog.model import _layer_indices

    shape = (2**16 + 1, 2**15)  # 2**31 + 2**15 entries, stored as one expanded zero (no memory)
    weight = torch.zeros(1, 1).expand(*shape)
    mask = torch.sparse_coo_tensor(torch.tensor([[2**16], [5]]), torch.tensor([True]), shape, check_invariants=True)
    flat = 2**16 * 2**15 + 5
    idx = _layer_indices(_Indexed({"0": mask}, {"0": torch.tensor([flat])}), "0", weight)
    assert idx.dtype == torch.int64 and idx.tolist() == [flat]


def test_a_linear_whose_weight_is_a_plain_tensor_can_be_targeted():
    model = _mlp()
    W = model[0].weight.detach().clone()
    del model[0].weight
    model[0].weight = W  # not a Parameter: frozen by construction, not counted as shared
    prepare(model, {"0": _mask((3, 4), [1])})
    assert model[0].frog_indices.tolist() == [1]


def test_merge_leaves_parameters_added_after_prepare_as_they_are():
    model = _mlp()
    prepare(model, {"0": _mask((3, 4), [0])})
    model.append(nn.Linear(2, 2))  # a new head, trainable, unknown to prepare
    merge(model)
    assert all(p.requires_grad for p in model[3].parameters())


def test_noise_amplitude_is_kept_only_with_noise_and_at_the_requested_rank():
    model = _mlp()
    prepare(model, {"0": _mask((3, 4), [0])}, noise_scale=0.0)
    assert model[0].frog.noise_buffers() is None
    ranked = _mlp()
    prepare(ranked, {"0": _mask((3, 4), [0])}, noise_scale=0.1, noise_rank=2)
    assert set(ranked[0].frog.noise_buffers()) == {"noise_a", "noise_b"}
    assert ranked[0].frog.noise_a.shape[-1] == 2 or ranked[0].frog.noise_b.shape[0] == 2
