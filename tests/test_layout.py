"""The shape of the code: one vocabulary for layers, one hand-off after analyze, one table check,
a model source resolved once per call chain, parameters checked before any work, a one-way
import graph and no module over 500 lines."""

from __future__ import annotations

import ast
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import frogwatch
from frogwatch import sources
from frogwatch.handoff import ATTRS_KEY, Analysis, NotATableError, check_table
from frogwatch.layers import (
    ALPHA_HIGH,
    ALPHA_LOW,
    alpha_warning,
    block_of,
    block_prefix,
    is_embedding_name,
    layer_role,
)

PKG = Path(frogwatch.__file__).parent

# --------------------------------------------------------------------------------------------
# layers: roles, blocks, embeddings, alpha bands
# --------------------------------------------------------------------------------------------

ROLE_CASES = {
    # BERT
    "embeddings.word_embeddings": ("embedding", None),
    "encoder.layer.3.attention.self.query": ("query", 3),
    "encoder.layer.3.attention.self.key": ("key", 3),
    "encoder.layer.3.attention.self.value": ("value", 3),
    "encoder.layer.3.attention.output.dense": ("attn_out", 3),
    "encoder.layer.3.intermediate.dense": ("mlp_up", 3),
    "encoder.layer.3.output.dense": ("mlp_down", 3),
    "pooler.dense": ("other", None),
    # GPT-2
    "transformer.wte": ("embedding", None),
    "transformer.wpe": ("embedding", None),
    "transformer.h.11.attn.c_attn": ("qkv", 11),
    "transformer.h.11.attn.c_proj": ("attn_out", 11),
    "transformer.h.11.mlp.c_fc": ("mlp_up", 11),
    "transformer.h.11.mlp.c_proj": ("mlp_down", 11),
    # Llama
    "model.embed_tokens": ("embedding", None),
    "model.layers.0.self_attn.q_proj": ("query", 0),
    "model.layers.0.self_attn.k_proj": ("key", 0),
    "model.layers.0.self_attn.v_proj": ("value", 0),
    "model.layers.0.self_attn.o_proj": ("attn_out", 0),
    "model.layers.0.mlp.gate_proj": ("mlp_up", 0),
    "model.layers.0.mlp.up_proj": ("mlp_up", 0),
    "model.layers.0.mlp.down_proj": ("mlp_down", 0),
    # T5
    "shared": ("embedding", None),
    "encoder.block.5.layer.0.SelfAttention.q": ("query", 5),
    "encoder.block.5.layer.0.SelfAttention.o": ("attn_out", 5),
    "encoder.block.5.layer.1.DenseReluDense.wi": ("mlp_up", 5),
    "decoder.block.2.layer.2.DenseReluDense.wo": ("mlp_down", 2),
}


@pytest.mark.parametrize("name, expected", list(ROLE_CASES.items()))
def test_layer_role_and_block_on_real_architectures(name, expected):
    role, block = expected
    assert layer_role(name) == role
    assert layer_role(name + ".weight") == role
    assert block_of(name) == block
    assert block_of(name + ".weight") == block


def test_block_prefix_is_the_one_block_rule():
    assert block_prefix("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert block_prefix("h.0.mlp.c_fc") == "h.0"
    assert block_prefix("pooler.dense") == ""
    assert block_prefix("layer3.fc") == ""  # a number inside a component is not a block
    # the FROG block plot and the flow's pairing use the same rule
    from frogwatch.plots_frog import block_of as frog_block

    for name in ROLE_CASES:
        assert frog_block(name) == (block_prefix(name) or name)


def test_one_embedding_rule_for_roles_and_storage_types():
    names = ["embeddings.word_embeddings.weight", "transformer.wte.weight", "model.embed_tokens.weight",
             "tok_embeddings.weight", "shared.weight", "model.layers.0.mlp.shared_experts.up_proj.weight",
             "encoder.layer.0.attention.self.query.weight", "lm_head.weight"]  # fmt: skip
    sd = {n: torch.zeros(8, 4) for n in names}
    by_name = {lm.name: lm for lm in sources.layer_matrices(sd)}
    for n in names:
        key = n[: -len(".weight")]
        emb = is_embedding_name(n)
        assert (by_name[key].layer_type == "embedding") == emb, n
        assert (layer_role(key) == "embedding") == emb, n
    assert not is_embedding_name("model.layers.0.mlp.shared_experts.up_proj")
    assert is_embedding_name("shared")


def test_embedding_regex_and_alpha_bands_live_in_one_module():
    for path in PKG.rglob("*.py"):
        if path.name == "layers.py":
            continue
        text = path.read_text()
        assert "tok_embeddings" not in text, f"{path} repeats the embedding rule"
        assert "ALPHA_LOW, ALPHA_HIGH = " not in text and "ALPHA_HIGH = 6" not in text, path
    assert (ALPHA_LOW, ALPHA_HIGH) == (2.0, 6.0)
    assert [alpha_warning(a) for a in (1.9, 2.0, 6.0, 6.1, float("nan"))] == [
        "over-trained", "", "", "under-trained", ""]  # fmt: skip
    from frogwatch.metrics import quality_warning

    assert quality_warning is alpha_warning


def test_layer_matrix_layer_type_and_kind_alias():
    lm = sources.layer_matrices(torch.nn.Sequential(torch.nn.Linear(4, 8)))[0]
    assert lm.layer_type == "dense" and lm.kind == "dense"
    with pytest.raises(AttributeError):
        lm.kind = "conv2d"


# --------------------------------------------------------------------------------------------
# import graph and module size
# --------------------------------------------------------------------------------------------

ABOVE_DIAGNOSTICS = {"analyze", "comparison", "report", "plots", "cli", "commands"}


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported at module level (not inside functions), as dotted names relative to the
    frogwatch package where relative."""
    tree = ast.parse(path.read_text())
    package = path.parent.name if path.parent != PKG else ""
    out = []
    for node in tree.body:
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(n, ast.Import):
                out += [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                mod = n.module or ""
                if n.level == 2 or (n.level == 0 and mod.startswith("frogwatch.")):
                    base = mod.removeprefix("frogwatch.") if n.level == 0 else mod
                    out += [base] if base else [a.name for a in n.names]
                elif n.level == 1:
                    inner = [mod] if mod else [a.name for a in n.names]
                    out += [f"{package}.{m}" if package else m for m in inner]
            stack.extend(ast.iter_child_nodes(n))
    return out


def test_nothing_under_diagnostics_imports_analyze_at_module_level():
    files = sorted((PKG / "diagnostics").glob("*.py"))
    assert files
    for path in files:
        for mod in _module_level_imports(path):
            assert mod.split(".")[0] not in ABOVE_DIAGNOSTICS, f"{path.name} imports {mod} at module level"


def test_the_ast_check_sees_a_module_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..analyze import analyze\n\ndef f():\n    from ..report import report\n")
    assert _module_level_imports(bad) == ["analyze"]


def test_rules_and_handoff_sit_below_analyze():
    for name in ("layers.py", "rules.py", "handoff.py", "sources.py"):
        for mod in _module_level_imports(PKG / name):
            assert mod.split(".")[0] not in ABOVE_DIAGNOSTICS | {"diagnostics"}, (name, mod)


def test_no_module_over_500_lines():
    too_long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    too_long.pop("frog/engine.py", None)  # being split into frog/config, layer, model, io
    assert not too_long


def test_public_names_and_dir():
    assert len(frogwatch.__all__) == len(set(frogwatch.__all__))
    for name in frogwatch.__all__:
        assert getattr(frogwatch, name) is not None
    listed = dir(frogwatch)
    assert set(frogwatch.__all__) <= set(listed) and "importlib" not in listed
    for name in ("LayerHook", "LayerSelector", "LayerMatrix", "Spectrum", "PowerLawFit", "Analysis",
                 "resolve_source", "layer_role", "block_of"):  # fmt: skip
        assert name in frogwatch.__all__


# --------------------------------------------------------------------------------------------
# the hand-off: Analysis in attrs, check_table
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_df():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(48, 48) for _ in range(4)])
    return frogwatch.analyze(net, progress=False, fit="pl")


def test_analysis_travels_with_the_table(small_df):
    a = small_df.attrs[ATTRS_KEY]
    assert isinstance(a, Analysis)
    assert a.options["fit"] == "PL" and a.options["min_evals"] == 10
    assert a.version == frogwatch.__version__ and a.skipped == ()
    assert len(a.source.matrices) == 4
    # pandas deep-copies attrs on every operation: the Analysis (and the model) is shared
    for derived in (small_df.copy(), small_df[small_df["alpha"] > 0], copy.deepcopy(small_df)):
        assert derived.attrs[ATTRS_KEY] is a
    # JSON (parquet writes attrs as JSON) and pickle keep working; pickling drops the model
    assert json.loads(json.dumps(small_df.attrs))[ATTRS_KEY]["options"]["fit"] == "PL"
    back = pickle.loads(pickle.dumps(small_df))
    assert back.attrs[ATTRS_KEY].source is None and back.attrs[ATTRS_KEY].options["fit"] == "PL"
    with pytest.raises(AttributeError):
        a.version = "x"


def test_check_table_one_error_one_message():
    with pytest.raises(NotATableError, match=r"^f: df must be a table from frogwatch.analyze\(\) with columns \['name'\], got list$"):
        check_table([1], "f", ("name",))
    with pytest.raises(TypeError):
        check_table(None, "f")
    with pytest.raises(ValueError, match=r"got a DataFrame without \['alpha'\]"):
        check_table(pd.DataFrame({"name": ["a"], "layer_type": ["dense"]}), "f")
    df = pd.DataFrame({"name": ["a"], "layer_type": ["dense"], "alpha": [3.0]})
    assert check_table(df, "f") is df


def _table_users():
    from frogwatch.diagnostics.compare import compare_summary, compare_tables
    from frogwatch.frog.scores import alpha_lookup
    from frogwatch.plots import plot_alpha_depth, plot_compare
    from frogwatch.rules import overparameterized, scale_collapse, trusted_fit

    ok = pd.DataFrame({"name": ["a"], "layer_type": ["dense"], "alpha": [3.0]})
    return {
        "summary": lambda t: frogwatch.summary(t),
        "correlation_flow": lambda t: frogwatch.correlation_flow(t),
        "plot_alpha_depth": lambda t: plot_alpha_depth(t),
        "plot_compare": lambda t: plot_compare(t),
        "compare_summary": lambda t: compare_summary(t),
        "compare_tables": lambda t: compare_tables(t, ok, None, None),
        "scale_collapse": lambda t: scale_collapse(t),
        "trusted_fit": lambda t: trusted_fit(t),
        "overparameterized": lambda t: overparameterized(t),
        "alpha_lookup": lambda t: alpha_lookup(t, ["a"]),
    }


@pytest.mark.parametrize("func", list(_table_users()))
@pytest.mark.parametrize("bad", ["not a table", pd.DataFrame({"other": [1]})])
def test_every_table_user_checks_through_check_table(func, bad):
    if func == "alpha_lookup" and isinstance(bad, str):
        # alpha_lookup also takes a {name: alpha} mapping, so a string gets its own message.
        with pytest.raises(ValueError, match="alpha must be a DataFrame from frogwatch.analyze"):
            _table_users()[func](bad)
        return
    with pytest.raises(NotATableError, match=rf"^{func}: \w+ must be a table from frogwatch\.\w+\(\)"):
        _table_users()[func](bad)


# --------------------------------------------------------------------------------------------
# a source resolved once per call chain
# --------------------------------------------------------------------------------------------


def _sharded_model(root: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"embeddings.word_embeddings.weight": torch.randn(64, 32, generator=g)}
    for i in range(3):
        p = f"encoder.layer.{i}"
        tensors[f"{p}.attention.self.value.weight"] = torch.randn(32, 32, generator=g)
        tensors[f"{p}.attention.output.dense.weight"] = torch.randn(32, 32, generator=g)
        tensors[f"{p}.intermediate.dense.weight"] = torch.randn(96, 32, generator=g)
        tensors[f"{p}.output.dense.weight"] = torch.randn(32, 96, generator=g)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    root.mkdir()
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, str(root / fname))
        weight_map.update({k: fname for k in ks})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.fixture
def count_reads(monkeypatch):
    counts = {"headers": 0, "resolved": 0}
    read_header, read_matrices = sources._safetensors_header, sources._read_matrices

    def header(path):
        counts["headers"] += 1
        return read_header(path)

    def matrices(model):
        counts["resolved"] += 1
        return read_matrices(model)

    monkeypatch.setattr(sources, "_safetensors_header", header)
    monkeypatch.setattr(sources, "_read_matrices", matrices)
    return counts


def test_report_resolves_each_model_once(tmp_path, count_reads):
    tuned = _sharded_model(tmp_path / "tuned", 1)
    base = _sharded_model(tmp_path / "base", 2)
    from frogwatch.report import report  # frogwatch.report is the submodule once it was imported

    page = report(tuned, base=base, out_dir=tmp_path / "out", min_evals=5)
    assert page.is_file() and (tmp_path / "out" / "compare.csv").is_file()
    assert count_reads == {"headers": 4, "resolved": 2}  # 2 shards x 2 models, 1 resolution each


def test_downstream_functions_take_the_handoff_instead_of_the_model(tmp_path, count_reads):
    path = _sharded_model(tmp_path / "m", 3)
    df = frogwatch.analyze(path, progress=False, min_evals=5)
    assert count_reads == {"headers": 2, "resolved": 1}
    a = df.attrs[ATTRS_KEY]
    flow = frogwatch.correlation_flow(df, a)
    assert flow.pairs is not None and len(flow.pairs) == 6  # value->attn_out and up->down, 3 blocks
    frogwatch.compare(a.source, a, min_evals=5)
    frogwatch.describe(a)
    assert count_reads == {"headers": 2, "resolved": 1}
    frogwatch.correlation_flow(df, path)  # the raw path is read again, as before
    assert count_reads == {"headers": 4, "resolved": 2}


# --------------------------------------------------------------------------------------------
# parameters checked before any work
# --------------------------------------------------------------------------------------------

MISSING = "/nonexistent/model/dir"


def report_fn(*args, **kwargs):
    from frogwatch.report import report  # frogwatch.report is the submodule once it was imported

    return report(*args, **kwargs)

ANALYZE_BAD = [
    ("min_evals", True, TypeError), ("min_evals", 0, ValueError), ("max_evals", 1.5, TypeError),
    ("max_N", -1, ValueError), ("fit", "xx", ValueError), ("fit", 3, TypeError),
    ("fix_fingers", "yes", ValueError), ("xmax", -1.0, ValueError), ("xmax", "1", TypeError),
    ("pool", 1, TypeError), ("device", 3, TypeError), ("progress", "no", TypeError),
    ("method", "eig", ValueError), ("hooks", 3, TypeError), ("hooks", [3], TypeError),
    ("randomize", None, TypeError), ("mp_fit", 0, TypeError), ("seed", True, TypeError),
    ("seed", -1, ValueError), ("layers", 1.5, TypeError), ("layers", [None], TypeError),
    ("layers", ["("], ValueError),
]  # fmt: skip


@pytest.mark.parametrize("name, value, error", ANALYZE_BAD)
def test_analyze_options_checked_before_the_model_is_read(name, value, error, count_reads):
    for call, func in ((frogwatch.analyze, "analyze"), (lambda m, **kw: frogwatch.compare(m, m, **kw), "compare"),
                       (lambda m, **kw: report_fn(m, out_dir="/nonexistent/out", **kw), "report")):  # fmt: skip
        if func == "report" and name in ("randomize", "mp_fit", "seed", "progress"):
            continue  # report's own arguments, checked below
        with pytest.raises(error, match=rf"^{func}: "):
            call(MISSING, **{name: value})
    assert count_reads["resolved"] == 0


def test_numpy_ints_are_ints(small_df):
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    df = frogwatch.analyze(net, progress=False, min_evals=np.int64(5), seed=np.int32(1), pool=np.bool_(True))
    assert df.attrs[ATTRS_KEY].options["min_evals"] == 5 and type(df.attrs[ATTRS_KEY].options["seed"]) is int
    assert len(frogwatch.correlation_flow(small_df, top_k=np.int64(4)).layers) == len(small_df)


def test_other_public_functions_check_their_parameters(small_df, tmp_path):
    from frogwatch.plots import plot_alpha_depth, plot_esd, plot_randomized_esd

    cases = [
        (lambda: frogwatch.describe(MISSING, min_evals=True), TypeError, "describe"),
        (lambda: frogwatch.describe(MISSING, layers=[2.5]), TypeError, "describe"),
        (lambda: frogwatch.summary(small_df, include_embeddings=1), TypeError, "summary"),
        (lambda: frogwatch.correlation_flow(small_df, top_k=True), TypeError, "correlation_flow"),
        (lambda: frogwatch.correlation_flow(small_df, top_k=0), ValueError, "correlation_flow"),
        (lambda: frogwatch.compare(MISSING, MISSING, progress=1), TypeError, "compare"),
        (lambda: frogwatch.compare(MISSING, MISSING, colour="red"), TypeError, "compare"),
        (lambda: frogwatch.compare(None, MISSING), TypeError, "compare"),
        (lambda: report_fn(MISSING, out_dir=3), TypeError, "report"),
        (lambda: report_fn(MISSING, out_dir=tmp_path, seed=1.5), TypeError, "report"),
        (lambda: report_fn(MISSING, out_dir=tmp_path, randomize="yes"), TypeError, "report"),
        (lambda: report_fn(MISSING, out_dir=tmp_path, title=5), TypeError, "report"),
        (lambda: plot_alpha_depth(small_df, title=5), TypeError, "plot_alpha_depth"),
        (lambda: plot_alpha_depth(small_df, include_embeddings="no"), TypeError, "plot_alpha_depth"),
        (lambda: plot_esd(np.ones(10), bins=True), TypeError, "plot_esd"),
        (lambda: plot_esd(np.ones(10), bins=0), ValueError, "plot_esd"),
        (lambda: plot_randomized_esd(np.ones((4, 4)), seed=1.0), TypeError, "plot_randomized_esd"),
        (lambda: plot_randomized_esd(np.ones((4, 4)), path=3), TypeError, "plot_randomized_esd"),
    ]
    for call, error, func in cases:
        with pytest.raises(error, match=rf"^{func}: "):
            call()
