"""compare(): before/after tables on the real MiniLM, checked against direct numpy computations."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_limits

from frogwatch.analyze import analyze, summary
from frogwatch.cli import main
from frogwatch.diagnostics.collapse import scale_collapse_vs_reference
from frogwatch.diagnostics.compare import compare, compare_summary
from frogwatch.powerlaw_fit import fit_power_law

PLANT_SCALE = "encoder.layer.1.intermediate.dense"
SVD_CHECKED = [
    f"encoder.layer.{b}.{m}" for b in (0, 5)
    for m in ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense")
] + ["embeddings.position_embeddings"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tuned(minilm_session):
    """MiniLM after 3 Adam steps on a toy objective (pull two random sentences' embeddings together)."""
    torch.manual_seed(0)
    m = copy.deepcopy(minilm_session)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    ids = torch.randint(1000, 5000, (4, 12))
    for _ in range(3):
        h = m(input_ids=ids).last_hidden_state.mean(1)
        loss = 1 - torch.nn.functional.cosine_similarity(h[::2], h[1::2]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m


@pytest.fixture(scope="module")
def cmp_tuned(minilm_session, tuned):
    return compare(minilm_session, tuned)


def _W(model, name):
    return model.get_submodule(name).weight.detach().double().numpy()


def _alpha_by_svd(W):
    return fit_power_law(np.linalg.svd(W, compute_uv=False) ** 2)


def test_planted_scale_collapse_is_flagged_by_compare(minilm_session):
    m = copy.deepcopy(minilm_session)
    with torch.no_grad():
        m.get_submodule(PLANT_SCALE).weight.mul_(0.1)
    cmp = compare(minilm_session, m)
    assert len(cmp) == 39
    assert cmp.loc[cmp["scale_collapse"], "name"].tolist() == [PLANT_SCALE]
    row = cmp.set_index("name").loc[PLANT_SCALE]
    # the weights are fp32, so "0.1" is 0.1 to ~1e-8
    assert row["log_spectral_norm_change"] == pytest.approx(-2.0, abs=1e-6)
    assert row["log_norm_change"] == pytest.approx(-2.0, abs=1e-6)
    assert row["alpha_change"] == pytest.approx(0.0, abs=1e-6)  # alpha does not see the scale
    W = _W(minilm_session, PLANT_SCALE)
    assert row["dW_fro"] == pytest.approx(0.9 * np.linalg.norm(W), rel=1e-6)
    assert row["dW_rel"] == pytest.approx(0.9, rel=1e-6)
    others = cmp[cmp["name"] != PLANT_SCALE]
    assert (others["dW_fro"] == 0).all() and (others["dW_status"] == "unchanged").all()
    s = compare_summary(cmp)
    assert s.loc["num_scale_collapse", "tuned"] == 1
    assert s.loc["log_spectral_norm", "change"] < 0


def test_compare_after_a_few_optimizer_steps_matches_numpy(minilm_session, tuned, cmp_tuned):
    cmp = cmp_tuned.set_index("name")
    assert len(cmp) == 39
    changed = cmp[cmp["dW_fro"] > 0]
    assert len(changed) >= 30  # Adam moves nearly every matrix
    assert not cmp["scale_collapse"].any()  # three small steps collapse nothing
    for name in cmp.index:
        Wb, Wt = _W(minilm_session, name), _W(tuned, name)
        dW = Wt - Wb
        row = cmp.loc[name]
        assert row["dW_fro"] == pytest.approx(np.linalg.norm(dW), rel=1e-9, abs=1e-12), name
        assert row["dW_rel"] == pytest.approx(np.linalg.norm(dW) / np.linalg.norm(Wb), rel=1e-9), name
        if name not in SVD_CHECKED:
            continue  # the SVD checks on 13 layers (every kind, first and last block) keep it fast
        fb, ft = _alpha_by_svd(Wb), _alpha_by_svd(Wt)
        assert row["alpha_base"] == pytest.approx(fb.alpha, abs=1e-6), name
        assert row["alpha_tuned"] == pytest.approx(ft.alpha, abs=1e-6), name
        assert row["alpha_change"] == pytest.approx(ft.alpha - fb.alpha, abs=2e-6), name
        sv = np.linalg.svd(Wt, compute_uv=False)
        assert row["log_spectral_norm_tuned"] == pytest.approx(np.log10(sv[0] ** 2), abs=1e-9), name
        if row["dW_fro"] > 0:
            s = np.linalg.svd(dW, compute_uv=False)
            assert row["dW_stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-6), name
            fd = fit_power_law(s**2)
            if fd.status == "success" and row["dW_status"] == "success":
                assert row["dW_alpha"] == pytest.approx(fd.alpha, rel=1e-3), name
    assert (changed["dW_status"] == "success").mean() > 0.9


def test_compare_summary_is_the_summary_of_both_models(minilm_session, tuned, cmp_tuned):
    s = compare_summary(cmp_tuned)
    sb = summary(analyze(minilm_session, progress=False))
    st = summary(analyze(tuned, progress=False))
    for metric in ["alpha_weighted", "alpha", "log_norm", "log_spectral_norm", "stable_rank"]:
        assert s.loc[metric, "base"] == pytest.approx(sb[metric], rel=1e-12)
        assert s.loc[metric, "tuned"] == pytest.approx(st[metric], rel=1e-12)
        assert s.loc[metric, "change"] == pytest.approx(st[metric] - sb[metric], abs=1e-12)
    assert s.loc["median_dW_rel", "tuned"] == pytest.approx(cmp_tuned["dW_rel"].median())
    # without attrs (e.g. after pandas dropped them) it falls back to matched-row means
    bare = cmp_tuned.copy()
    bare.attrs = {}
    s2 = compare_summary(bare)
    body = cmp_tuned[cmp_tuned["kind"] != "embedding"]
    assert s2.loc["alpha", "base"] == pytest.approx(body["alpha_base"].mean())


def test_reference_collapse_rule():
    got = scale_collapse_vs_reference(
        lsn_base=[1.0, 1.0, 1.0, 1.0, 1.0],
        lsn_tuned=[0.5, 0.5, 0.8, 0.5, 0.5],
        alpha_base=[4.0, 4.0, 4.0, 4.0, np.nan],
        alpha_tuned=[4.0, 3.0, 4.0, 1.5, 3.0],
    )
    # fell + alpha same -> collapse; alpha improved -> not; small fall -> not;
    # alpha fell below 2 is no improvement -> collapse; unknown alpha -> collapse
    assert got.tolist() == [True, False, False, True, True]


def test_compare_errors(minilm_session):
    other = torch.nn.Sequential(torch.nn.Linear(40, 30))
    with pytest.raises(ValueError, match="share no analysed layer"):
        compare(minilm_session, other)
    with pytest.raises(ValueError):
        compare_summary(pd.DataFrame({"a": [1]}))


def test_cli_compare(minilm_session, tmp_path, capsys):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in minilm_session.state_dict().items()}
    save_file(sd, str(tmp_path / "base.safetensors"))
    sd[PLANT_SCALE + ".weight"] = sd[PLANT_SCALE + ".weight"] * 0.1
    save_file(sd, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "cmp.csv"
    rc = main(["compare", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert f"scale collapse against the base: {PLANT_SCALE}" in text
    table = pd.read_csv(out)
    assert len(table) == 39 and table["scale_collapse"].sum() == 1
