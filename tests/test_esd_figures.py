"""analyze(..., savefig=DIR): one ESD figure per analysed layer."""

from __future__ import annotations

import numpy as np
import pytest

from frogwatch.analyze import analyze


def test_savefig_writes_one_png_per_layer(mlp, tmp_path):
    out = tmp_path / "figs"
    df = analyze(mlp, savefig=out, progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == len(df) == 3
    assert files == sorted(p.split("/")[-1] for p in df["esd_figure"])
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(n.startswith(".") for n in files)  # no temporary file left behind


def test_savefig_rejects_a_non_path(mlp):
    with pytest.raises(TypeError, match="savefig"):
        analyze(mlp, savefig=3, progress=False)
