"""analyze at LLM scale: the CPU floor (blockwise ?syrk, two-stage eigensolver, fp32 Gram for
bf16), the torch path, scheduling, describe's estimate, and torch.distributed with 2 gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import frogwatch
from frogwatch import spectra
from frogwatch.analyze import analyze, describe
from frogwatch.schedule import pipeline, share_by_cost
from frogwatch.sources import layer_matrices
from _procs import free_port
from _shards import write_sharded

ROOT = Path(__file__).resolve().parent.parent


def svd_evals(W: torch.Tensor) -> np.ndarray:
    """Independent reference: squared singular values from numpy's SVD of the float64 matrix."""
    return np.sort(np.linalg.svd(W.double().numpy(), compute_uv=False) ** 2)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A small random-init Llama (transformers' own class) saved as bf16 sharded safetensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=400)
    model = transformers.LlamaForCausalLM(cfg)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    return write_sharded(sd, tmp_path_factory.mktemp("tiny_llama"))


# ------------------------------------------------------------------------------------------
# the CPU floor
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(700, 90), (90, 700)])
def test_gram_by_syrk_in_blocks_equals_brute_force(monkeypatch, dtype, shape):
    monkeypatch.setattr(spectra, "BLOCK_BYTES", 90 * 8 * 100)  # several blocks per matrix
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    A = W.double().numpy()
    ref = A.T @ A if shape[0] >= shape[1] else A @ A.T
    for V in (W, W.T.contiguous().T, W[:, :]):  # C order, Fortran order
        G = spectra.gram_cpu(V)
        tol = 1e-12 if dtype != torch.bfloat16 else 1e-5  # bf16: fp32 accumulation
        np.testing.assert_allclose(np.triu(G), np.triu(ref), rtol=0, atol=tol * np.abs(ref).max())


def test_two_stage_eigensolver_equals_numpy(monkeypatch):
    if spectra._two_stage_solver() is None:
        pytest.skip("this OpenBLAS has no dsyevd_2stage")
    monkeypatch.setattr(spectra, "TWO_STAGE_MIN_M", 1)
    A = np.random.default_rng(0).standard_normal((400, 150))
    G = np.asfortranarray(A.T @ A)
    np.testing.assert_allclose(spectra.eigvalsh_cpu(G.copy()), np.linalg.eigvalsh(G), rtol=0, atol=1e-10)
    np.testing.assert_allclose(spectra.eigenvalues(torch.from_numpy(A)), svd_evals(torch.from_numpy(A)),
                               rtol=0, atol=1e-9)  # fmt: skip


def _spiked(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    # a heavy tail: a few strong directions with power-law strengths
    k = 12
    U, V = torch.randn(rows, k, generator=g), torch.randn(k, cols, generator=g)
    s = torch.tensor([3.0 / (i + 1) ** 0.7 for i in range(k)])
    return W + (U * s) @ V / cols**0.5


def test_fp32_gram_for_bf16_keeps_alpha_on_minilm_and_random_spectra(minilm_session):
    """bf16 weights: the fp32-accumulated Gram gives alpha within 0.01 of the float64 SVD of the
    very same bf16 weights, on the real MiniLM and on random spiked spectra."""
    sd = {k: v.to(torch.bfloat16) for k, v in minilm_session.state_dict().items()}
    for i in range(4):
        sd[f"random.{i}.weight"] = _spiked(1500, 300 + 200 * i, seed=i).to(torch.bfloat16)
    fast = analyze(sd, progress=False)
    exact = analyze(sd, progress=False, method="svd")  # float64 SVD of the bf16 values
    assert len(fast) == 39 + 4 and (fast["status"] == "success").all()
    assert np.abs(fast["alpha"] - exact["alpha"]).max() <= 0.01
    np.testing.assert_allclose(fast["log_spectral_norm"], exact["log_spectral_norm"], atol=1e-5)
    # well-conditioned matrices keep their rank; MiniLM's smallest singular values sit below the
    # fp32 round-off (documented: rank and sv_min need method="svd" there)
    np.testing.assert_array_equal(fast["matrix_rank"][-4:], exact["matrix_rank"][-4:])


def test_fp32_weights_keep_float64_gram_and_weightwatcher_precision(mlp):
    W = mlp[0].weight.detach()
    assert spectra.gram_dtype(W) == np.float64 and spectra.gram_dtype(W.half()) == np.float32
    np.testing.assert_allclose(spectra.eigenvalues(W), svd_evals(W), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# sharded bf16 checkpoint, torch path, CLI
# ------------------------------------------------------------------------------------------


def test_bf16_sharded_llama_matches_float64_svd_per_layer(tiny_llama):
    df = analyze(tiny_llama, progress=False)
    lms = {lm.name: lm for lm in layer_matrices(tiny_llama)}
    assert len(df) == 2 * 7 + 2 and list(df["layer_id"]) == sorted(df["layer_id"])
    for _, row in df.iterrows():
        ev = svd_evals(lms[row["name"]].load())
        assert row["lambda_max"] == pytest.approx(ev[-1], rel=1e-5)
        assert row["norm"] == pytest.approx(ev.sum(), rel=1e-5)


def test_torch_path_on_cpu_equals_lapack_path(tiny_llama, minilm_df, minilm_session):
    for model, ref in ((minilm_session, minilm_df), (tiny_llama, analyze(tiny_llama, progress=False, method="svd"))):
        t = analyze(model, device="cpu", progress=False)
        assert list(t["name"]) == list(ref["name"])
        np.testing.assert_allclose(t["alpha"], ref["alpha"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(t["lambda_max"], ref["lambda_max"], rtol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_lapack_path(minilm_session, minilm_df):
    t = analyze(minilm_session, device="cuda", progress=False)
    np.testing.assert_allclose(t["alpha"], minilm_df["alpha"], rtol=0, atol=1e-6)


def test_cli_device_and_python_m_entry_point(tiny_llama, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "frogwatch", "analyze", str(tiny_llama), "--device", "cpu",
                        "--out", str(out), "--quiet"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(out / "analyze.csv")
    ref = analyze(tiny_llama, progress=False, method="svd")  # torch: float64 Gram, like the SVD
    np.testing.assert_allclose(got["alpha"], ref["alpha"], rtol=0, atol=1e-6)


def test_ctrl_c_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
    import importlib

    from frogwatch.cli import main

    fa = importlib.import_module("frogwatch.analyze")  # the module, not the function

    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = fa.fit_power_law
    monkeypatch.setattr(fa, "fit_power_law", interrupted)
    out = tmp_path / "out"
    assert main(["analyze", str(tiny_llama), "--out", str(out), "--quiet"]) == 130
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------
# scheduling and estimates
# ------------------------------------------------------------------------------------------


def test_share_by_cost_balances_and_covers_everything():
    costs = [100.0, 1, 1, 50, 50, 2, 3, 97]
    parts = share_by_cost(costs, 2)
    assert sorted(parts[0] + parts[1]) == list(range(len(costs)))
    loads = [sum(costs[k] for k in p) for p in parts]
    assert max(loads) - min(loads) <= 3  # brute force: the best split differs by 0
    assert share_by_cost(costs, 2) == parts  # deterministic: every rank computes the same
    assert share_by_cost(costs, 20)[15] == []


def test_pipeline_keeps_results_bounds_memory_and_stops_on_error():
    loaded, in_flight, peak = [], [0], [0]
    lock = threading.Lock()

    def load(x):
        with lock:
            loaded.append(x)
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        return x * 10

    def solve(x, v):
        with lock:
            in_flight[0] -= 1
        if x == 5:
            raise KeyboardInterrupt
        return v + 1

    items = list(range(40))
    got = {}
    with pytest.raises(KeyboardInterrupt):
        for pos, r in pipeline(items, load, solve, workers=2, ahead=1):
            got[pos] = r
    assert all(got[p] == items[p] * 10 + 1 for p in got)
    assert peak[0] <= 3  # workers + ahead tensors at most
    assert len(loaded) < len(items)  # it stopped reading
    assert dict(pipeline(items[:6], load, lambda x, v: v, workers=2)) == {p: 10 * p for p in range(6)}


def test_rows_are_bit_identical_whatever_is_analysed_with_them():
    """One BLAS thread per matrix always (schedule.py): OpenBLAS's bits depend on its thread count
    (at this size 1 and 2 threads differ), so a matrix analysed alone, or last, must not get more
    threads than in a full run."""
    from threadpoolctl import threadpool_limits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(900, 2000), torch.nn.Linear(2000, 900)).double()
    with threadpool_limits(limits=2, user_api="blas"):  # the suite runs with one (conftest)
        full = analyze(model, progress=False).set_index("name")
        alone = {n: analyze(model, layers=[n], progress=False).set_index("name") for n in full.index}
    for name, one in alone.items():
        for col in ("alpha", "xmin", "D", "log_spectral_norm", "log_norm", "stable_rank"):
            assert one.at[name, col] == full.at[name, col], (name, col)


def test_describe_estimates_time_memory_and_device_fit(tiny_llama):
    from frogwatch.estimate import device_bytes, fits_device

    d = describe(tiny_llama)
    assert d["analyzed"].all() and (d["est_seconds"] > 0).all() and (d["est_memory_mb"] > 0).all()
    assert d.attrs["estimate"]["wall_seconds"] > 0 and d["fits_device"].all()
    big = max(layer_matrices(tiny_llama), key=lambda lm: lm.size)
    need = device_bytes(big)
    assert need == big.size * 8 + 3 * big.M**2 * 8
    assert fits_device(big, "cuda", total=int(need / 0.9) + 8)
    assert not fits_device(big, "cuda", total=need)
    skipped = describe(tiny_llama, max_N=300)
    assert not skipped.loc[skipped["name"] == "lm_head", "analyzed"].item()
    assert np.isnan(skipped.loc[skipped["name"] == "lm_head", "est_seconds"].item())


# ------------------------------------------------------------------------------------------
# torch.distributed
# ------------------------------------------------------------------------------------------


def test_distributed_without_process_group_is_a_clear_error(mlp):
    with pytest.raises(ValueError, match="process group"):
        analyze(mlp, distributed=True, progress=False)


def test_torchrun_two_gloo_ranks_give_the_single_process_rows(tiny_llama, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "frogwatch", "analyze", str(tiny_llama), "--out", str(out), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone writes
    got = pd.read_csv(out / "analyze.csv")
    ref = analyze(tiny_llama, progress=False)
    assert list(got["name"]) == list(ref["name"])
    for col in ("alpha", "xmin", "D", "lambda_max", "log_norm", "stable_rank", "matrix_rank"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-12, atol=0, err_msg=col)


RANK_SCRIPT = r"""
import importlib, json, sys
import torch.distributed as dist
fa = importlib.import_module("frogwatch.analyze")
read = []
real = fa._load_checked
fa._load_checked = lambda lm: (read.append(lm.name), real(lm))[1]
dist.init_process_group("gloo")
df = fa.analyze(sys.argv[1], distributed=True, progress=False)
df.to_csv(sys.argv[2] + f"/rank{dist.get_rank()}.csv", index=False)
json.dump(read, open(sys.argv[2] + f"/read{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


def test_distributed_api_each_rank_reads_its_share_and_returns_the_table(tiny_llama, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tiny_llama), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]  # fmt: skip
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    ref = analyze(tiny_llama, progress=False)
    for r in range(2):
        got = pd.read_csv(tmp_path / f"rank{r}.csv")
        assert list(got["name"]) == list(ref["name"])
        np.testing.assert_allclose(got["alpha"], ref["alpha"], rtol=1e-12, atol=0)
    reads = [json.loads((tmp_path / f"read{r}.json").read_text()) for r in range(2)]
    assert reads[0] and reads[1] and not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(ref["name"])


def test_benchmark_fixture_shapes_are_transformers_llama():
    """benchmarks/llm_fixtures.py writes Llama checkpoints by hand (no transformers needed on the
    GPU machine); their names and shapes are those of transformers' LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import llm_fixtures
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name, cfg in llm_fixtures.FIXTURES.items():
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        seen, ref = set(), {}
        for k, p in model.state_dict(keep_vars=True).items():
            if id(p) not in seen:
                seen.add(id(p))
                ref[k] = tuple(p.shape)
        assert llm_fixtures.shapes(name) == ref, name
