"""One scattered pass over W0 against a sparse product, per MLP matrix (issue 12, step time).

``python benchmarks/spmm_vs_patch.py``: a 5632 x 2048 bf16 matrix (TinyLlama's down-projection
shape), a uniformly random 1 % selection, 64 tokens, one thread, caches evicted before each call,
thread CPU time (median of 20). Prints the cost of one ``index_copy_`` pass (FROG's patch or
restore of W0 + delta: four per layer and step), of the sparse product ``D @ x^T`` (CSR, float32)
that an unpatched path (base matmul plus a sparse correction, two per layer and step) would take
instead, and of the dense matmul for scale.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

OUT, IN, TOKENS, DENSITY, REPEATS = 5632, 2048, 64, 0.01, 20


def thread_ms(f: Callable[[], object]) -> float:
    """Median thread CPU time of ``f`` in ms, with the caches evicted before each call."""
    f()
    times = []
    for _ in range(REPEATS):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB written: evicts L2/L3
        t0 = time.thread_time()
        f()
        times.append(time.thread_time() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    gen = torch.Generator().manual_seed(0)
    k = int(DENSITY * OUT * IN)
    idx = torch.randperm(OUT * IN, generator=gen)[:k].sort().values
    weight = torch.randn(OUT, IN, dtype=torch.bfloat16, generator=gen)
    delta = torch.randn(k, generator=gen) * 1e-3
    x = torch.randn(TOKENS, IN, generator=gen).to(torch.bfloat16)
    with torch.sparse.check_sparse_tensor_invariants(False):
        d = torch.sparse_coo_tensor(torch.stack([idx // IN, idx % IN]), delta, (OUT, IN)).coalesce().to_sparse_csr()
    x32 = x.float()
    orig = weight.view(-1)[idx].clone()
    print(f"{OUT} x {IN} bf16, k = {k} ({DENSITY:.0%}), {TOKENS} tokens, torch {torch.__version__}, one thread")
    print(f"one scattered pass (index_copy_ of W0[idx] + delta): {thread_ms(lambda: weight.view(-1).index_copy_(0, idx, (orig.float() + delta).to(weight.dtype))):.2f} ms")
    print(f"sparse product D @ x^T (CSR float32):                 {thread_ms(lambda: torch.sparse.mm(d, x32.t())):.2f} ms")
    print(f"dense matmul x @ W0^T (bf16):                         {thread_ms(lambda: x @ weight.t()):.2f} ms")


if __name__ == "__main__":
    main()
