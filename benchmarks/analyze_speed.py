"""frogwatch.analyze vs WeightWatcher 0.7.7 on a randomly initialised GPT-2 small, same run.

    python benchmarks/analyze_speed.py [--repeats 3] [--model gpt2|minilm] [--threads N]

Builds GPT-2 small from ``transformers.GPT2Config()`` (124 M parameters, no download), then
alternates WeightWatcher's ``analyze()`` and ``frogwatch.analyze()`` ``--repeats`` times and reports
medians, the speed-up, the largest |delta alpha| over the matrices both analyse, and the floor:
the bare eigensolver time (Gram matrix + ``numpy.linalg.eigvalsh``, one matrix per core as
frogwatch runs it, and sequentially) over the same matrices. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings

import numpy as np
import torch


def build_model(name: str):
    if name == "minilm":
        import frogwatch

        return frogwatch.load_default_model().eval(), "all-MiniLM-L6-v2 (pretrained, offline)"
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config()).eval(), "GPT2Model(GPT2Config()) random init"


def time_ww(model):
    import weightwatcher as ww

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        df = ww.WeightWatcher(model=model).analyze()
        return time.perf_counter() - t, df


def time_fw(model):
    import frogwatch

    t = time.perf_counter()
    df = frogwatch.analyze(model, progress=False)
    return time.perf_counter() - t, df


def floor(model):
    """Bare eigensolver over the same matrices, in seconds.

    Returns (sequential Gram + eigvalsh with all BLAS threads, sequential eigvalsh alone,
    Gram + eigvalsh one matrix per core with one BLAS thread each — frogwatch's layout).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from frogwatch.analyze import _num_workers, describe
    from frogwatch.sources import layer_matrices

    d = describe(model)
    keep = set(d.loc[d["analyzed"], "name"])
    mats = [m.load().double().numpy() for m in layer_matrices(model) if m.name in keep]

    def gram(A):
        A = A if A.shape[0] >= A.shape[1] else A.T
        return A.T @ A

    t0 = time.perf_counter()
    grams = [gram(A) for A in mats]
    t1 = time.perf_counter()
    for G in grams:
        np.linalg.eigvalsh(G)
    t2 = time.perf_counter()
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(_num_workers()) as pool:
        list(pool.map(lambda A: np.linalg.eigvalsh(gram(A)), mats))
    t3 = time.perf_counter()
    return t2 - t0, t2 - t1, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", choices=("gpt2", "minilm"), default="gpt2")
    ap.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model, label = build_model(args.model)
    ww_times, fw_times, floors = [], [], []
    time_fw(model)  # warm-up: imports, thread pools
    for _ in range(args.repeats):
        t, wdf = time_ww(model)
        ww_times.append(t)
        t, fdf = time_fw(model)
        fw_times.append(t)
        floors.append(floor(model))
    assert len(wdf) == len(fdf), (len(wdf), len(fdf))
    dalpha = np.max(np.abs(fdf["alpha"].to_numpy() - wdf["alpha"].to_numpy()))
    ww_med, fw_med = statistics.median(ww_times), statistics.median(fw_times)
    fl_all = statistics.median(f[0] for f in floors)
    fl_eig = statistics.median(f[1] for f in floors)
    fl_par = statistics.median(f[2] for f in floors)
    import transformers
    import weightwatcher

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"transformers {transformers.__version__}, weightwatcher {weightwatcher.__version__}")  # fmt: skip
    print(f"model: {label}, {len(fdf)} matrices analysed by both\n")
    print("| what | median s | runs (s) |")
    print("|---|---|---|")
    print(f"| WeightWatcher 0.7.7 analyze() | {ww_med:.2f} | {', '.join(f'{t:.2f}' for t in ww_times)} |")
    print(f"| frogwatch.analyze() | {fw_med:.2f} | {', '.join(f'{t:.2f}' for t in fw_times)} |")
    print(f"| floor: Gram + eigvalsh, one matrix per core | {fl_par:.2f} | |")
    print(f"| floor: Gram + eigvalsh, sequential, all BLAS threads | {fl_all:.2f} | |")
    print(f"| floor: eigvalsh alone, sequential | {fl_eig:.2f} | |")
    print(f"\nspeed-up over WeightWatcher: {ww_med / fw_med:.2f}x; frogwatch / floor: "
          f"{fw_med / fl_par:.2f}x (vs the per-core floor); max |delta alpha| vs WeightWatcher: {dalpha:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
