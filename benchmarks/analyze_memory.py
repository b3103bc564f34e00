"""Peak memory of frogwatch.analyze on a sharded safetensors checkpoint vs loading the model.

    python benchmarks/analyze_memory.py [--shards 6] [--n-layer 6 12 24]

Writes a randomly initialised GPT-2 small (transformers ``GPT2Config()``) as a Hugging Face style
sharded checkpoint into a temporary directory, then in fresh subprocesses measures the peak
resident memory (``ru_maxrss``) above the post-import baseline of (a) ``frogwatch.analyze(dir)``
and (b) reading every tensor of the checkpoint into memory (a state dict). Compares both to the size of the
largest analysed tensor and of the whole model, for GPT-2 small with 6, 12 and 24 blocks: the
analyze peak should not grow with the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import numpy, torch, pandas, psutil, safetensors.torch, frogwatch, frogwatch.analyze
proc = psutil.Process()
peak = [0.0]
def sample():  # RSS sampled every 2 ms: the peak, not just the end state
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
base = peak[0]
def peak_mb():
    time.sleep(0.05)
    return peak[0]
mode, path = sys.argv[1], sys.argv[2]
if mode == "analyze":
    df = frogwatch.analyze(path, progress=False)
    n = len(df)
else:
    from pathlib import Path
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update({k: v.clone() for k, v in safetensors.torch.load_file(str(f)).items()})
    n = len(sd)
print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "n": n}))
"""


def write_checkpoint(root: Path, shards: int, n_layer: int) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in GPT2Model(GPT2Config(n_layer=n_layer)).state_dict().items()
          if not k.endswith(".attn.bias")}  # fmt: skip
    keys = list(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, str(root / fname))
        weight_map.update({k: fname for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    # largest tensor that analyze reads (wte, 50257 x 768, is skipped by max_N)
    largest = max(v.numel() * v.element_size() for k, v in sd.items() if v.dim() == 2 and max(v.shape) <= 50000)
    return total, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--n-layer", type=int, nargs="+", default=[6, 12, 24])
    args = ap.parse_args()
    mb = 1024 * 1024
    print("| GPT-2 blocks | checkpoint MB (fp32) | largest analysed tensor MB (fp32) "
          "| analyze(sharded dir): peak MB above baseline | load all shards: peak MB above baseline |")
    print("|---|---|---|---|---|")
    for n_layer in args.n_layer:
        with tempfile.TemporaryDirectory() as tmp:
            total, largest = write_checkpoint(Path(tmp), args.shards, n_layer)
            res = {}
            for mode in ("analyze", "load_all"):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, tmp], capture_output=True,
                                     text=True, check=True)  # fmt: skip
                r = json.loads(out.stdout.strip().splitlines()[-1])
                res[mode] = r["peak_mb"] - r["base_mb"]
        print(f"| {n_layer} | {total / mb:.0f} | {largest / mb:.1f} | {res['analyze']:.0f} | {res['load_all']:.0f} |")


if __name__ == "__main__":
    main()
