"""FROG budgets: resolve_budget, allocate (capping, redistribution, exact totals), topk_flat."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from frogwatch.frog.budget import allocate, resolve_budget, topk_flat


def reference_allocate(weights, sizes, total):
    """Exact-arithmetic water-filling + largest remainder, written with plain loops."""
    w = [Fraction(x) for x in weights]
    n = len(w)
    quota = [Fraction(0)] * n
    active = list(range(n))
    remaining = Fraction(total)
    while active:
        wsum = sum(w[i] for i in active)
        basis = {i: (w[i] if wsum > 0 else Fraction(sizes[i])) for i in active}
        bsum = sum(basis.values())
        share = {i: remaining * basis[i] / bsum for i in active}
        capped = [i for i in active if share[i] >= sizes[i]]
        if not capped:
            for i in active:
                quota[i] = share[i]
            break
        for i in capped:
            quota[i] = Fraction(sizes[i])
            remaining -= sizes[i]
            active.remove(i)
    k = [int(q) for q in quota]  # floor (quotas are non-negative)
    short = total - sum(k)
    order = sorted(range(n), key=lambda i: (-(quota[i] - k[i]), i))
    for i in order[:short]:
        k[i] += 1
    return k


# ---- resolve_budget --------------------------------------------------------------------------


def test_resolve_budget_fraction_and_count():
    assert resolve_budget(0.01, 1234) == 12  # round(12.34)
    assert resolve_budget(0.5, 5) == 3  # halves round up
    assert resolve_budget(1.0, 77) == 77
    assert resolve_budget(np.float32(0.25), 100) == 25
    assert resolve_budget(1, 77) == 1  # an int is a count
    assert resolve_budget(np.int64(40), 77) == 40
    assert resolve_budget(77, 77) == 77


@pytest.mark.parametrize("bad", [0, -3, 78, 0.0, -0.1, 1.5, float("nan"), True, "1%", None])
def test_resolve_budget_rejects(bad):
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(bad, 77)


def test_resolve_budget_rounding_to_zero_is_an_error():
    with pytest.raises(ValueError, match="rounds to 0"):
        resolve_budget(0.001, 100)


# ---- allocate --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_allocate_matches_exact_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    sizes = rng.integers(1, 60, size=n)
    weights = rng.random(n) ** 3  # skewed, so caps bind often
    if seed % 5 == 0:
        weights[0] = 0.0
    total = int(rng.integers(0, sizes.sum() + 1))
    k = allocate(weights, sizes, total)
    assert k.dtype == np.int64
    assert int(k.sum()) == total
    assert np.all(k >= 0) and np.all(k <= sizes)
    assert k.tolist() == reference_allocate(weights.tolist(), sizes.tolist(), total)


def test_allocate_caps_and_redistributes_in_proportion():
    # Matrix 0 would get 0.6 * 100 = 60 but holds 10; its 50 extra go to 1 and 2 as 1 : 3.
    k = allocate([0.6, 0.1, 0.3], [10, 1000, 1000], 100)
    assert k.tolist() == [10, 23, 67]  # 90 split as 22.5 : 67.5, the tie goes to the lower index
    # Cascading caps: after the first cap the second matrix overflows too.
    k = allocate([0.5, 0.3, 0.2], [5, 20, 1000], 100)
    assert k.tolist() == [5, 20, 75]


def test_allocate_zero_weight_matrices_fill_last():
    assert allocate([1.0, 0.0], [10, 10], 10).tolist() == [10, 0]
    assert allocate([1.0, 0.0, 0.0], [10, 10, 30], 30).tolist() == [10, 5, 15]
    assert allocate([0.0, 0.0], [3, 4], 7).tolist() == [3, 4]


def test_allocate_validation():
    with pytest.raises(ValueError, match="equally long"):
        allocate([1.0], [1, 2], 1)
    with pytest.raises(ValueError, match="non-negative"):
        allocate([1.0, -1.0], [1, 2], 1)
    with pytest.raises(ValueError, match="total"):
        allocate([1.0, 1.0], [1, 2], 4)
    with pytest.raises(ValueError, match="integers"):
        allocate([1.0], [2.5], 1)


# ---- topk_flat -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_topk_flat_matches_stable_numpy_sort(seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 6, size=(7, 9)).astype(np.float64)  # many ties
    k = int(rng.integers(0, v.size + 1))
    expect = np.sort(np.argsort(-v.reshape(-1), kind="stable")[:k])
    got = topk_flat(torch.from_numpy(v), k)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expect)


def test_topk_flat_ties_go_to_lower_index():
    v = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0])
    assert topk_flat(v, 2).tolist() == [1, 2]
    assert topk_flat(v, 4).tolist() == [1, 2, 3, 4]
    assert topk_flat(torch.zeros(4), 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        topk_flat(v, 6)


def test_allocate_minimum_floor():
    from frogwatch.frog.budget import allocate

    k = allocate([10.0, 1.0, 0.0], [50, 50, 2], 20, minimum=3)
    assert k.tolist() == [3 + 11, 3 + 1, 2]  # floor capped at size 2; the 12 left split 10:1:0
    assert allocate([1.0, 1.0], [5, 5], 4, minimum=0).tolist() == allocate([1.0, 1.0], [5, 5], 4).tolist()
    with pytest.raises(ValueError, match="minimum"):
        allocate([1.0, 1.0], [5, 5], 3, minimum=2)
    with pytest.raises(ValueError, match="minimum"):
        allocate([1.0, 1.0], [5, 5], 3, minimum=-1)


# ---- edges and messages (found by mutation testing, benchmarks/mutation.py) ----------------------


def test_resolve_budget_edges():
    assert resolve_budget(1, 1) == 1 and resolve_budget(1.0, 1) == 1  # a single weight is a model
    assert resolve_budget(0.01, 100) == 1  # rounds to exactly one weight: allowed
    assert resolve_budget(0.005, 100) == 1  # 0.5 rounds up
    with pytest.raises(ValueError, match="rounds to 0"):
        resolve_budget(0.0049, 100)


@pytest.mark.parametrize(
    "budget, total, message",
    [
        (0.5, 0, "the targeted matrices hold no weights"),
        ("1%", 77, "budget must be a fraction in (0, 1] or a positive integer count, got '1%'"),
        (0, 1234, "budget count must be between 1 and the 1,234 targeted weights, got 0"),
        (2000, 1234, "budget count must be between 1 and the 1,234 targeted weights, got 2,000"),
        (0.0, 77, "budget fraction must be in (0, 1], got 0.0; pass an int for a count of weights"),
        (1.5, 77, "budget fraction must be in (0, 1], got 1.5; pass an int for a count of weights"),
        (0.0001, 1000, "budget 0.0001 of 1,000 weights rounds to 0 trainable weights; raise it"),
    ],
)
def test_resolve_budget_messages(budget, total, message):
    with pytest.raises(ValueError) as e:
        resolve_budget(budget, total)
    assert str(e.value) == message


def test_allocate_zero_weight_fallback_splits_by_size_over_the_unfilled_matrices_only():
    # the three weighted matrices fill at once; the 97 left go to the zero-weight ones as 10 : 100
    weights, sizes = [1.0, 1.0, 1.0, 0.0, 0.0], [1, 1, 1, 10, 100]
    k = allocate(weights, sizes, 100)
    assert k.tolist() == reference_allocate(weights, sizes, 100) == [1, 1, 1, 9, 88]


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([1.0], [1, 2], 1), {}, "weights and sizes must be non-empty and equally long (1 vs 2)"),
        (([], [], 0), {}, "weights and sizes must be non-empty and equally long (0 vs 0)"),
        (([1.0, float("nan")], [1, 2], 1), {}, "allocation weights must be finite and non-negative"),
        (([1.0, 1.0], [1, -2], 1), {}, "sizes must be non-negative integers"),
        (([1.0, 1.0], [1, 2], 4), {}, "total must be in [0, 3], got 4"),
        (([1.0, 1.0], [1, 2], -1), {}, "total must be in [0, 3], got -1"),
        (([1.0, 1.0], [5, 5], 3), {"minimum": True}, "allocate: minimum must be an int >= 0, got True"),
        (([1.0, 1.0], [5, 5], 3), {"minimum": 2},
         "allocate: minimum must be at most 1 per matrix for 3 weights over 2 matrices, got 2"),
    ],
)
def test_allocate_messages(args, kwargs, message):
    with pytest.raises(ValueError) as e:
        allocate(*args, **kwargs)
    assert str(e.value) == message


def test_topk_flat_all_and_none():
    v = torch.tensor([[0.5, -1.0], [2.0, 0.5]])
    assert topk_flat(v, 4).tolist() == [0, 1, 2, 3]
    assert topk_flat(v, 4).dtype == torch.int64
    assert topk_flat(v, 0).tolist() == [] and topk_flat(v, 0).dtype == torch.int64
    for k in (-1, 5):
        with pytest.raises(ValueError) as e:
            topk_flat(v, k)
        assert str(e.value) == f"k must be in [0, 4], got {k}"


def test_allocate_minimum_floor_counts_against_each_matrix_size():
    # floors [3, 3] leave room [1, 7]; the 4 left split 2 : 2, matrix 0 caps at 1, its extra goes on
    assert allocate([1.0, 1.0], [4, 10], 10, minimum=3).tolist() == [4, 6]
    assert allocate([1.0, 1.0], [5, 5], 4, minimum=2).tolist() == [2, 2]  # floors use the whole total


def test_allocate_flattens_column_inputs():
    k = allocate(np.array([[1.0], [3.0]]), np.array([[10], [10]]), 8)  # e.g. df[["R"]].to_numpy()
    assert k.shape == (2,) and k.tolist() == [2, 6]
