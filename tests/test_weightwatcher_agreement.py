"""frogwatch.analyze against WeightWatcher 0.7.7 itself, on real and random models."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import frogwatch
from frogwatch.analyze import analyze

ww = pytest.importorskip("weightwatcher")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def run_ww(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher(model=model).analyze(**kwargs)


def assert_agrees(fw, wdf, alpha_tol=0.01, norm_tol=1e-3):
    assert len(fw) == len(wdf), (list(fw["name"]), list(wdf["name"]))
    # WeightWatcher names a layer by its last module name; frogwatch by the qualified path.
    for a, b in zip(fw["name"], wdf["name"]):
        assert a.split(".")[-1] == b, (a, b)
    np.testing.assert_array_equal(fw["M"].to_numpy(), wdf["M"].to_numpy())
    np.testing.assert_array_equal(fw["N"].to_numpy(), wdf["N"].to_numpy())
    np.testing.assert_array_equal(fw["num_evals"].to_numpy(), wdf["num_evals"].to_numpy())
    np.testing.assert_allclose(fw["alpha"], wdf["alpha"], rtol=0, atol=alpha_tol)
    np.testing.assert_allclose(fw["log_norm"], wdf["log_norm"], rtol=0, atol=norm_tol)
    np.testing.assert_allclose(fw["log_spectral_norm"], wdf["log_spectral_norm"], rtol=0, atol=norm_tol)
    np.testing.assert_allclose(fw["alpha_weighted"], wdf["alpha_weighted"], rtol=0, atol=0.02)
    np.testing.assert_allclose(fw["stable_rank"], wdf["stable_rank"], rtol=1e-6)
    np.testing.assert_array_equal(fw["matrix_rank"].to_numpy(), wdf["matrix_rank"].to_numpy())
    assert list(fw["warning"]) == list(wdf["warning"])


def test_minilm_all_39_matrices_match_weightwatcher(minilm_session):
    wdf = run_ww(minilm_session)
    fw = analyze(minilm_session, progress=False)
    assert len(wdf) == 39
    assert_agrees(fw, wdf)
    # Beyond the tolerances: the same eigenvalues give the same fit to round-off.
    np.testing.assert_allclose(fw["alpha"], wdf["alpha"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(fw["xmin"], wdf["xmin"], rtol=1e-8)
    np.testing.assert_allclose(fw["D"], wdf["D"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fw["log_alpha_norm"], wdf["log_alpha_norm"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(fw["entropy"], wdf["entropy"], rtol=0, atol=1e-6)
    # the summary's alpha-hat is WeightWatcher's mean alpha_weighted over the same layers
    s = frogwatch.summary(fw, include_embeddings=True)
    assert s["alpha_weighted"] == pytest.approx(wdf["alpha_weighted"].mean(), abs=1e-8)


def test_convnet_matches_weightwatcher(convnet):
    # Random init is the hard case for agreement (flat spectra); train-like structure is added
    # with a low-rank spike so the tails are not pure noise.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in convnet.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                w = m.weight.view(m.weight.shape[0], -1)
                u = torch.randn(w.shape[0], 2, generator=g)
                v = torch.randn(2, w.shape[1], generator=g)
                w += 0.05 * u @ v
    wdf = run_ww(convnet)
    fw = analyze(convnet, progress=False)
    assert set(fw["layer_type"]) == {"conv2d", "dense"}
    assert_agrees(fw, wdf)


def test_fix_fingers_clip_xmax_matches_weightwatcher(minilm_session):
    wdf = run_ww(minilm_session, fix_fingers="clip_xmax")
    fw = analyze(minilm_session, fix_fingers="clip_xmax", progress=False)
    assert_agrees(fw, wdf)
    # it did clip somewhere on this model (otherwise the test shows nothing)
    plain = analyze(minilm_session, progress=False)
    assert (fw["alpha"] < plain["alpha"] - 0.5).any()


def test_gpt2_conv1d_layers_match_weightwatcher():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=500)
    model = transformers.GPT2Model(cfg)
    wdf = run_ww(model)
    fw = analyze(model, progress=False)
    assert (fw["layer_type"] == "conv1d").sum() == 8
    # random init: flat spectra, so compare on exactly the same eigenvalue method as WW
    fw_svd = analyze(model, progress=False, method="svd")
    assert_agrees(fw_svd, wdf)
    np.testing.assert_allclose(fw["log_norm"], wdf["log_norm"], atol=1e-9)
