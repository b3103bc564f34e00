"""Property-based tests (Hypothesis) of the inputs users hand in: random shapes and dtypes,
NaN/Inf anywhere, truncated or corrupted safetensors headers and bodies, wrong index files.
Each gets a clear error (SourceError / ValueError, one line) or a ``failed`` row, never a raw
traceback from deeper down."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import frogwatch
from frogwatch.cli import main as cli

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def matrices(draw):
    ndim = draw(st.sampled_from([2, 2, 4]))
    if ndim == 2:
        shape = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    else:
        shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 3)),
                 draw(st.integers(1, 3)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    bad = draw(st.lists(st.tuples(st.integers(0, W.numel() - 1),
                                  st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3))
    for i, v in bad:
        W.view(-1)[i] = v
    return W, bool(bad)


@SETTINGS
@given(st.lists(matrices(), min_size=1, max_size=4))
def test_any_state_dict_gives_rows_or_a_clear_error(mats):
    sd = {f"layer.{i}.weight": W for i, (W, _) in enumerate(mats)}
    try:
        df = frogwatch.analyze(sd, progress=False, min_evals=1)
    except frogwatch.SourceError as e:
        assert "\n" not in str(e)
        return
    assert set(df["status"]) <= {"success", "failed"}
    by_name = df.set_index("name")
    for i, (W, has_bad) in enumerate(mats):
        name = f"layer.{i}"
        if name not in by_name.index:
            continue
        row = by_name.loc[name]
        if has_bad:
            assert row["status"] == "failed" and "NaN/Inf" in row["reason"]
        if row["status"] == "failed":
            assert math.isnan(row["alpha"]) and row["reason"]
        else:
            assert 1 < row["alpha"] < math.inf
    frogwatch.summary(df)  # never raises on what analyze returns


@SETTINGS
@given(st.lists(matrices(), min_size=1, max_size=3), st.sampled_from([0.01, 0.2, 1.0, 3]))
def test_any_state_dict_selects_or_fails_clearly(mats, budget):
    sd = {f"layer.{i}.weight": W for i, (W, _) in enumerate(mats) if W.dim() == 2}
    assume(sd)
    try:
        masks = frogwatch.select(sd, budget, progress=False)
    except (ValueError, frogwatch.SourceError) as e:
        assert "\n" not in str(e)
        return
    total = sum(W.numel() for W in sd.values())
    assert masks.n_selected == (budget if isinstance(budget, int) else round(budget * total))
    for name in masks:
        assert masks[name].shape == sd[f"{name}.weight"].shape


def _valid_file(d: Path) -> Path:
    p = d / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(30, 20, generator=g), "b.weight": torch.randn(20, 20, generator=g),
               "c.bias": torch.randn(20, generator=g)}, str(p), metadata={"x": "y"})
    return p


def _check_reads_or_fails_clearly(path: Path) -> None:
    try:
        df = frogwatch.analyze(path, progress=False)
    except frogwatch.SourceError as e:
        assert "\n" not in str(e)
    else:
        assert set(df["status"]) <= {"success", "failed"}
    rc = cli(["describe", str(path)])
    assert rc in (0, 1)


@SETTINGS
@given(data=st.data())
def test_corrupted_or_truncated_safetensors(data, capsys):
    with tempfile.TemporaryDirectory() as d:
        p = _valid_file(Path(d))
        raw = bytearray(p.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        how = data.draw(st.sampled_from(["truncate", "header-bytes", "body-bytes", "length"]))
        if how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif how == "header-bytes":
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(8, 8 + n - 1))] = data.draw(st.integers(0, 255))
        elif how == "body-bytes":
            for _ in range(data.draw(st.integers(1, 16))):
                raw[data.draw(st.integers(8 + n, len(raw) - 1))] = data.draw(st.integers(0, 255))
        else:
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        p.write_bytes(bytes(raw))
        _check_reads_or_fails_clearly(p)
        capsys.readouterr()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(data=st.data())
def test_corrupted_header_json(data, capsys):
    """A header that is valid JSON but not a valid safetensors header."""
    with tempfile.TemporaryDirectory() as d:
        p = _valid_file(Path(d))
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        key = data.draw(st.sampled_from(["a.weight", "b.weight", "c.bias", "__metadata__"]))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = data.draw(JSON)
        if field is None or key == "__metadata__":
            header[key] = value
        else:
            header[key][field] = value
        h = json.dumps(header).encode()
        p.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n :])
        _check_reads_or_fails_clearly(p)
        capsys.readouterr()


@SETTINGS
@given(index=JSON | st.dictionaries(st.just("weight_map"), JSON)
       | st.fixed_dictionaries({"weight_map": st.dictionaries(
           st.sampled_from(["a.weight", "b.weight", "zz.weight"]),
           st.sampled_from(["m.safetensors", "missing.safetensors", "../m.safetensors", ""]))}))
def test_wrong_index_files(index, capsys):
    with tempfile.TemporaryDirectory() as d:
        _valid_file(Path(d))
        (Path(d) / "model.safetensors.index.json").write_text(json.dumps(index))
        _check_reads_or_fails_clearly(Path(d))
        capsys.readouterr()
