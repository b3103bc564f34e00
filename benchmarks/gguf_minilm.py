"""A quantised MiniLM against its original: what GGUF quantisation does to the spectral metrics.

    python benchmarks/gguf_minilm.py > benchmarks/results_gguf.md

The real all-MiniLM-L6-v2 (``frogwatch.load_default_model()``) is exported here to GGUF with the
``gguf`` package the way llama.cpp's converter does it for ``bert`` (names through gguf's
``TensorNameMap``, the pooler kept under its own name, 1-D tensors in F32, every 2-D tensor in the
chosen type; ``gguf.quants.quantize``), then read back by frogwatch (one tensor dequantised at a
time) and compared with the original layer by layer: |delta alpha|, the warning/flag columns, the
correlation-flow verdicts, and the element-wise quantisation error (``frogwatch.distances``).
Timings are wall-clock on a shared machine; the load average is printed with them.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One BLAS thread (analyze runs one layer per core itself): on a loaded 2-core machine a threaded
# SVD of the 30522 x 384 embedding in distances() spun for minutes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

import frogwatch
from frogwatch.diagnostics.flow import correlation_flow

TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q5_1, Q.Q4_0)
FLAGS = ("warning", "overparameterized", "scale_collapse", "status")


def export(model: torch.nn.Module, path: Path, qtype: Q) -> None:
    """Write a BERT model as a GGUF file, every 2-D tensor in ``qtype``."""
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, model.config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(model.config.num_hidden_layers)
    for key, v in model.state_dict().items():
        a = v.detach().float().numpy()
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias")) or key
        if a.ndim != 2 or qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    model = frogwatch.load_default_model().eval()
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    base = frogwatch.analyze(model, progress=False)
    t_base = time.perf_counter() - t0
    flow_base = correlation_flow(base).groups["verdict"]
    b = base.set_index("name")
    print("# MiniLM (all-MiniLM-L6-v2) from GGUF: quantised against the original\n")
    print("Command: `python benchmarks/gguf_minilm.py` (CPU).  ")
    print(f"{platform.machine()}, {os.cpu_count()} cores (shared); python {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {np.__version__}, gguf {_version('gguf')}, "
          f"frogwatch {frogwatch.__version__}.  ")
    print(f"Original: {n_params / 1e6:.1f} M parameters, {len(base)} matrices analysed "
          f"in {t_base:.1f} s (load average {os.getloadavg()[0]:.1f}).\n")
    print("| type | file MB | analyze s (load) | max abs d-alpha | median abs d-alpha | layer with max | "
          "flags changed | flow verdicts changed | median / max rel. error of W |")
    print("|---|---:|---:|---:|---:|---|---|---|---:|")
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in TYPES:
            path = Path(tmp) / f"minilm-{qtype.name}.gguf"
            export(model, path, qtype)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            df = frogwatch.analyze(str(path), progress=False)
            t_q = time.perf_counter() - t0
            q = df.set_index("name").loc[b.index]  # KeyError if a name did not map back
            d_alpha = (q["alpha"] - b["alpha"]).abs()
            flags = [f"{n}: {c}" for c in FLAGS for n in b.index if str(q.at[n, c]) != str(b.at[n, c])]
            flow_q = correlation_flow(df).groups["verdict"]
            flow = [f"{g}: {flow_base[g]} -> {flow_q[g]}" for g in flow_base.index if flow_q.get(g) != flow_base[g]]
            dist = frogwatch.distances(model, str(path), progress=False)
            assert not (dist.attrs["a_only"] or dist.attrs["b_only"] or dist.attrs["mismatched"])
            print(f"| {qtype.name} | {path.stat().st_size / 2**20:.1f} | {t_q:.1f} ({load:.1f}) | "
                  f"{d_alpha.max():.2e} | {d_alpha.median():.2e} | {d_alpha.idxmax()} | "
                  f"{'; '.join(flags) or 'none'} | {'; '.join(flow) or 'none'} | "
                  f"{dist['rel'].median():.1e} / {dist['rel'].max():.1e} |")
            for n in d_alpha.sort_values(ascending=False).index[:3]:
                details.append(f"| {qtype.name} | {n} | {b.at[n, 'alpha']:.3f} -> {q.at[n, 'alpha']:.3f} | "
                               f"{b.at[n, 'num_pl_spikes']} -> {q.at[n, 'num_pl_spikes']} | "
                               f"{b.at[n, 'xmin']:.3g} -> {q.at[n, 'xmin']:.3g} | "
                               f"{b.at[n, 'warning'] or '-'} -> {q.at[n, 'warning'] or '-'} |")
    print("\nThe three largest |d-alpha| per type:\n")
    print("| type | layer | alpha | num_pl_spikes | xmin | warning |\n|---|---|---|---|---|---|")
    print("\n".join(details))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
