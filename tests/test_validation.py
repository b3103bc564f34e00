"""The one validation helper: TypeError for a wrong type, ValueError for a bad value, one format."""

import numpy as np
import pytest

from frogwatch._validation import check_bool, check_callable, check_choice, check_float, check_int


def test_int_accepts_numpy_and_normalises():
    out = check_int(np.int64(3), "seed", "prepare")
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_int_wrong_type_is_type_error(bad):
    with pytest.raises(TypeError, match=r"^prepare: seed must be an int, got "):
        check_int(bad, "seed", "prepare")


def test_int_range_is_value_error():
    with pytest.raises(ValueError, match=r"^analyze: min_evals must be an int >= 1, got 0$"):
        check_int(0, "min_evals", "analyze", low=1)
    assert check_int(None, "noise_steps", "prepare", allow_none=True) is None


def test_float_checks():
    assert check_float(np.float32(0.5), "blend", "select", low=0, high=1) == 0.5
    with pytest.raises(ValueError, match=r"blend must be a number >= 0 and <= 1, got 2.0"):
        check_float(2.0, "blend", "select", low=0, high=1)
    with pytest.raises(ValueError, match="finite"):
        check_float(float("nan"), "x", "f")
    with pytest.raises(ValueError, match="> 0"):
        check_float(0, "noise_std", "prepare", low=0, low_open=True)
    with pytest.raises(TypeError):
        check_float(False, "x", "f")


def test_bool_choice_callable():
    assert check_bool(np.bool_(True), "pool", "analyze") is True
    with pytest.raises(TypeError, match="pool must be a bool, got 1"):
        check_bool(1, "pool", "analyze")
    assert check_choice("tpl", "fit", "analyze", ("PL", "TPL"), normalize=str.upper) == "TPL"
    with pytest.raises(ValueError, match=r"fit must be one of 'PL', 'TPL', got 'x'"):
        check_choice("x", "fit", "analyze", ("PL", "TPL"))
    with pytest.raises(TypeError):
        check_choice(3, "fit", "analyze", ("PL", "TPL"))
    with pytest.raises(TypeError, match="must be a callable"):
        check_callable(3, "hook", "analyze")
