"""Correlation flow: layer kinds, flow statistics and verdicts, between-layer subspace overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import theilslopes
from torch import nn

from frogwatch.analyze import analyze
from frogwatch.diagnostics.flow import (
    ERRATIC_DISPERSION,
    TREND_SLOPE,
    correlation_flow,
    flow_stats,
    layer_kind,
    layer_pairs,
    pair_overlap,
    subspace_overlap,
)


# ---------------------------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------------------------

NAMES = {
    # BERT / MiniLM / ViT
    "encoder.layer.0.attention.self.query": "query",
    "encoder.layer.0.attention.self.key": "key",
    "encoder.layer.0.attention.self.value": "value",
    "encoder.layer.0.attention.output.dense": "attn_out",
    "encoder.layer.0.intermediate.dense": "mlp_up",
    "encoder.layer.0.output.dense": "mlp_down",
    "embeddings.word_embeddings": "embedding",
    "pooler.dense": "other",
    # GPT-2 (Conv1D)
    "transformer.h.3.attn.c_attn": "qkv",
    "transformer.h.3.attn.c_proj": "attn_out",
    "transformer.h.3.mlp.c_fc": "mlp_up",
    "transformer.h.3.mlp.c_proj": "mlp_down",
    "transformer.wte": "embedding",
    # Llama / Mistral
    "model.layers.7.self_attn.q_proj": "query",
    "model.layers.7.self_attn.k_proj": "key",
    "model.layers.7.self_attn.v_proj": "value",
    "model.layers.7.self_attn.o_proj": "attn_out",
    "model.layers.7.mlp.gate_proj": "mlp_up",
    "model.layers.7.mlp.up_proj": "mlp_up",
    "model.layers.7.mlp.down_proj": "mlp_down",
    "model.embed_tokens": "embedding",
    "lm_head": "other",
    # T5
    "encoder.block.1.layer.0.SelfAttention.q": "query",
    "encoder.block.1.layer.0.SelfAttention.o": "attn_out",
    "encoder.block.1.layer.1.DenseReluDense.wi": "mlp_up",
    "encoder.block.1.layer.1.DenseReluDense.wo": "mlp_down",
    # OPT / Falcon
    "model.decoder.layers.2.self_attn.out_proj": "attn_out",
    "model.decoder.layers.2.fc1": "mlp_up",
    "model.decoder.layers.2.fc2": "mlp_down",
    "transformer.h.0.self_attention.query_key_value": "qkv",
    "transformer.h.0.self_attention.dense": "attn_out",
    "transformer.h.0.mlp.dense_h_to_4h": "mlp_up",
    "transformer.h.0.mlp.dense_4h_to_h": "mlp_down",
}


@pytest.mark.parametrize("name, kind", list(NAMES.items()))
def test_layer_kind_from_names(name, kind):
    assert layer_kind(name) == kind
    assert layer_kind(name + ".weight") == kind


def test_layer_kind_from_type_and_shape():
    assert layer_kind("features.3", "conv2d") == "conv"
    assert layer_kind("anything", "embedding") == "embedding"
    assert layer_kind("net.0", "dense", (256, 64)) == "mlp_up"  # (out, in)
    assert layer_kind("net.2", "dense", (64, 256)) == "mlp_down"
    assert layer_kind("net.2", "conv1d", (64, 256)) == "mlp_up"  # Conv1D stores (in, out)
    assert layer_kind("net.4", "dense", (64, 64)) == "other"


# ---------------------------------------------------------------------------------------------
# statistics and verdicts
# ---------------------------------------------------------------------------------------------


def test_flow_stats_matches_a_direct_computation():
    a = [2.5, 3.1, 2.8, 9.0, 3.3, 3.0, np.nan, 2.9]
    st = flow_stats(a)
    x = np.array([v for v in a if np.isfinite(v)])
    assert st["n"] == 7
    assert st["share_in_range"] == pytest.approx(6 / 7)
    assert st["alpha_median"] == pytest.approx(np.median(x))
    ts = theilslopes(x, np.linspace(0, 1, 7))
    assert st["slope"] == pytest.approx(ts[0])
    assert (st["slope_low"], st["slope_high"]) == pytest.approx((ts[2], ts[3]))
    assert st["dispersion"] == pytest.approx(np.median(np.abs(np.diff(x))))
    assert st["verdict"] == "flat"  # one outlier is neither a trend nor jitter


@pytest.mark.parametrize(
    "alphas, verdict",
    [
        ([3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 3.1, 2.9], "flat"),
        (list(np.linspace(2.0, 6.5, 8)), "rising"),  # VGG-like
        (list(np.linspace(6.0, 2.5, 8)), "falling"),
        ([2.5, 5.5, 2.2, 6.0, 2.4, 5.8, 2.6, 5.9], "erratic"),  # DenseNet-like
        ([3.0, 4.0], "insufficient"),
    ],
)
def test_verdicts(alphas, verdict):
    assert flow_stats(alphas)["verdict"] == verdict


def test_thresholds_are_the_documented_ones():
    assert TREND_SLOPE == 2.0 and ERRATIC_DISPERSION == 1.0
    just_flat = list(np.linspace(3.0, 3.0 + 0.95 * TREND_SLOPE, 10))
    assert flow_stats(just_flat)["verdict"] == "flat"
    just_rising = list(np.linspace(3.0, 3.0 + 1.05 * TREND_SLOPE, 10))
    assert flow_stats(just_rising)["verdict"] == "rising"


def test_correlation_flow_on_minilm(minilm_session, minilm_df):
    flow = correlation_flow(minilm_df, minilm_session)
    g = flow.groups
    assert list(g.index[:7]) == ["model", "query", "key", "value", "attn_out", "mlp_up", "mlp_down"]
    for kind in ["query", "key", "value", "attn_out", "mlp_up", "mlp_down"]:
        assert g.loc[kind, "n"] == 6
        alphas = [minilm_df.set_index("name").loc[n, "alpha"]
                  for n in flow.layers.loc[flow.layers["kind"] == kind, "name"]]  # fmt: skip
        direct = flow_stats(alphas)
        for c in ["share_in_range", "alpha_median", "slope", "dispersion", "verdict"]:
            assert g.loc[kind, c] == direct[c], (kind, c)
    assert g.loc["model", "n"] == 37  # embeddings left out
    assert flow.verdict in {"flat", "rising", "falling", "erratic"}
    # layers table: module order, depth normalised over the non-embedding layers
    body = flow.layers[flow.layers["kind"] != "embedding"]
    assert body["depth"].iloc[0] == 0.0 and body["depth"].iloc[-1] == 1.0
    assert flow.layers["depth"].isna().sum() == 2
    # between-layer overlaps: value->attn_out and mlp_up->mlp_down in each of the 6 blocks
    p = flow.pairs
    assert p["relation"].value_counts().to_dict() == {"value->attn_out": 6, "mlp_up->mlp_down": 6}
    assert p["overlap"].between(0, 1).all()
    np.testing.assert_allclose(p["baseline"], p["k"] / p["d"])
    np.testing.assert_allclose(p["enrichment"], p["overlap"] / p["baseline"])
    assert set(p.loc[p["relation"] == "mlp_up->mlp_down", "d"]) == {1536}
    # no model: no pairs, same statistics
    assert correlation_flow(minilm_df).pairs is None


def test_correlation_flow_rejects_bad_input(minilm_df):
    with pytest.raises(ValueError):
        correlation_flow(minilm_df[["name", "alpha"]])
    with pytest.raises(ValueError):
        correlation_flow([1, 2, 3])
    with pytest.raises(ValueError):
        correlation_flow(minilm_df, top_k=0)


# ---------------------------------------------------------------------------------------------
# between-layer subspace overlap
# ---------------------------------------------------------------------------------------------


def test_subspace_overlap_extremes_and_random_baseline():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((100, 20)))
    assert subspace_overlap(Q[:, :10], Q[:, :10]) == pytest.approx(1.0)
    assert subspace_overlap(Q[:, :10], Q[:, 10:]) == pytest.approx(0.0, abs=1e-12)
    vals = []
    for _ in range(50):
        A, _ = np.linalg.qr(rng.standard_normal((100, 10)))
        B, _ = np.linalg.qr(rng.standard_normal((100, 10)))
        vals.append(subspace_overlap(A, B))
    assert np.mean(vals) == pytest.approx(10 / 100, rel=0.15)
    with pytest.raises(ValueError):
        subspace_overlap(Q[:50], Q)


def test_pair_overlap_of_aligned_and_random_matrices():
    rng = np.random.default_rng(1)
    W1 = rng.standard_normal((96, 32)) @ np.diag(np.linspace(5, 0.1, 32)) @ rng.standard_normal((32, 32))
    aligned = pair_overlap(W1, W1.T, k=8)  # the second reads exactly what the first writes
    assert aligned["overlap"] == pytest.approx(1.0)
    assert aligned["enrichment"] == pytest.approx(96 / 8)
    rand = pair_overlap(W1, rng.standard_normal((32, 96)), k=8)
    assert rand["overlap"] < 0.3
    with pytest.raises(ValueError):
        pair_overlap(W1, rng.standard_normal((32, 50)))


class _Block(nn.Module):
    def __init__(self, d, h, aligned):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.v_proj = nn.Linear(d, d, bias=False)
        self.self_attn.o_proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d, h, bias=False)
        self.mlp.down_proj = nn.Linear(h, d, bias=False)
        if aligned:  # down reads up's output space: W_down = W_up^T
            with torch.no_grad():
                self.mlp.down_proj.weight.copy_(self.mlp.up_proj.weight.T)


def test_planted_alignment_is_found_between_layers():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([_Block(32, 96, aligned=True), _Block(32, 96, aligned=False)])
    df = analyze(model, progress=False)
    flow = correlation_flow(df, model, top_k=4)
    p = flow.pairs.set_index("first")
    assert p.loc["layers.0.mlp.up_proj", "second"] == "layers.0.mlp.down_proj"
    assert p.loc["layers.0.mlp.up_proj", "overlap"] == pytest.approx(1.0)
    assert p.loc["layers.1.mlp.up_proj", "overlap"] < 0.3
    assert p.loc["layers.1.self_attn.v_proj", "second"] == "layers.1.self_attn.o_proj"


def test_layer_pairs_follow_the_names():
    names = ["m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj", "m.layers.0.mlp.down_proj",
             "m.layers.1.mlp.up_proj", "m.layers.1.mlp.down_proj",
             "d.block.0.layer.0.SelfAttention.v", "d.block.0.layer.0.SelfAttention.o",
             "d.block.0.layer.1.EncDecAttention.v", "d.block.0.layer.1.EncDecAttention.o"]  # fmt: skip
    kinds = [layer_kind(n) for n in names]
    pairs = layer_pairs(names, kinds)
    assert pairs == [
        ("m.layers.0.mlp.gate_proj", "m.layers.0.mlp.down_proj"),
        ("m.layers.0.mlp.up_proj", "m.layers.0.mlp.down_proj"),
        ("m.layers.1.mlp.up_proj", "m.layers.1.mlp.down_proj"),
        ("d.block.0.layer.0.SelfAttention.v", "d.block.0.layer.0.SelfAttention.o"),
        ("d.block.0.layer.1.EncDecAttention.v", "d.block.0.layer.1.EncDecAttention.o"),
    ]
