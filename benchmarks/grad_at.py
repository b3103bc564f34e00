"""Delta's gradient at k selected entries (``DenseOp.grad_at``): SDDMM against the dense product.

For ``nn.Linear`` shapes of TinyLlama-1.1B (out x in = 2048x2048, 5632x2048, 2048x5632) and a
uniform random selection of a given density, times (process CPU time, median of ``--reps`` after a
warm-up, the caches evicted before each call as the rest of a model would) three ways to form
``(g^T x)[idx]`` from g (tokens x out) and x (tokens x in):

* ``dense``  the full product ``g^T x`` and a gather (what a dense weight gradient costs);
* ``sddmm``  ``torch.sparse.sampled_addmm`` on the selection's CSR pattern (float32 inputs);
* ``kdot``   k dot products over the tokens from gathered columns (the former sparse path), at
  <= 512 tokens and <= 1 % only (it is slower everywhere it ran);

and ``grad_at`` itself (the path it picks, plan cached). The ratio columns give the SDDMM cost of
one selected entry in cells of the dense product, from which ops.py's ``_SDDMM_COST`` crossover is
set. Run: ``python benchmarks/grad_at.py [--threads 1 2] [--tokens 64 512 2048]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from frogwatch.frog import ops

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]
_junk = torch.empty(64 << 20, dtype=torch.uint8)


def cpu_ms(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        _junk.add_(1)
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return statistics.median(ts) * 1e3


def kdot(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    out = torch.empty(rows.numel(), dtype=torch.float32)
    chunk = max(1, (1 << 22) // g.shape[0])
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        out[s : s + chunk] = (g.index_select(1, r).float() * x.index_select(1, c).float()).sum(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--density", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.05])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    print("| threads | tokens | out x in | density | dtype | dense (ms) | sddmm (ms) | kdot (ms) "
          "| grad_at (ms) | sddmm / dense | entry cost (dense cells) |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for th in a.threads:
        torch.set_num_threads(th)
        for n in a.tokens:
            for shape in SHAPES:
                for d in a.density:
                    size = shape[0] * shape[1]
                    k = int(d * size)
                    gen = torch.Generator().manual_seed(0)
                    idx = torch.randperm(size, generator=gen)[:k].sort().values.to(torch.int32)
                    rows, cols = idx.long() // shape[1], idx.long() % shape[1]
                    for dt in a.dtypes:
                        dtype = getattr(torch, dt)
                        g = torch.randn(n, shape[0], generator=gen).to(dtype)
                        x = torch.randn(n, shape[1], generator=gen).to(dtype)
                        op = ops.DenseOp(False)
                        _, _, crow = op._grad_plan(idx, torch.Size(shape))
                        t_dense = cpu_ms(lambda: (g.t() @ x).view(-1).index_select(0, idx), a.reps)
                        t_sddmm = cpu_ms(lambda: ops._sddmm(g, x, crow, idx % shape[1], torch.Size(shape)), a.reps)
                        t_kdot = (cpu_ms(lambda: kdot(g, x, rows, cols), a.reps)
                                  if n <= 512 and d <= 0.01 else float("nan"))
                        t_op = cpu_ms(lambda: op.grad_at(g, x, torch.Size(shape), idx), a.reps)
                        print(f"| {th} | {n} | {shape[0]}x{shape[1]} | {d:.1%} | {dt} | {t_dense:.1f} | "
                              f"{t_sddmm:.1f} | {t_kdot:.1f} | {t_op:.1f} | {t_sddmm / t_dense:.2f} | "
                              f"{(t_sddmm / k) / (t_dense / size):.1f} |", flush=True)


if __name__ == "__main__":
    main()
