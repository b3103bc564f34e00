"""What SVD smoothing does to MiniLM's sentence similarities.

Embeds the 48 general-domain sentences of ``benchmarks/finetune/tasks_minilm.py``
(``SIMILARITY_SENTENCES``; mean pooling as sentence-transformers does for all-MiniLM-L6-v2) with the
pretrained model and with smoothed copies, and reports the Spearman correlation of the 1,128
pairwise cosine similarities (1 = the same ranking of sentence pairs) and the mean / max absolute
change of a cosine.

Conditions: the over-parameterized layers keeping their power-law tail (frogwatch's default), the
same layers keeping other ranks, a control that smooths the same number of randomly chosen
*non-flagged* encoder layers to the same rank (5 draws), and every layer keeping its tail.

    python benchmarks/smoothing_minilm.py > benchmarks/results_smoothing.md
"""

from __future__ import annotations

import os
import platform
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent / "finetune"))
import frogwatch  # noqa: E402
from frogwatch.smoothing import smoothing_plan  # noqa: E402
from tasks_minilm import SIMILARITY_SENTENCES  # noqa: E402


def embed(model, texts):
    from transformers import AutoTokenizer

    from frogwatch.sources import default_model_path

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    b = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def pair_cosines(E):
    E = F.normalize(E, dim=1)
    iu = torch.triu_indices(len(E), len(E), offset=1)
    return (E @ E.T)[iu[0], iu[1]].numpy()


def main() -> None:
    torch.manual_seed(0)
    model = frogwatch.load_default_model().eval()
    base = pair_cosines(embed(model, SIMILARITY_SENTENCES))
    df = frogwatch.analyze(model, progress=False)
    flagged = smoothing_plan(model)

    def measure(label, layers, keep, note=""):
        sm = frogwatch.svd_smoothing(model, layers=layers, keep=keep, progress=False)
        c = pair_cosines(embed(sm, SIMILARITY_SENTENCES))
        plan = sm.smoothing_plan
        kept = int((plan["k"] * 1).sum())
        total = int(plan["M"].sum())
        d = np.abs(c - base)
        rho = spearmanr(base, c).statistic
        print(f"| {label} | {len(plan)} | {kept} of {total} | {rho:.4f} | {d.mean():.4f} | {d.max():.4f} | {note} |")
        return rho

    print("# SVD smoothing of MiniLM: effect on sentence similarities\n")
    print("Command: `python benchmarks/smoothing_minilm.py` (deterministic; CPU).  ")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} (no timings reported).\n")
    print("Model: the embedded pretrained all-MiniLM-L6-v2 (`frogwatch.load_default_model()`). "
          "Sentences: the 48 general-domain `SIMILARITY_SENTENCES` of "
          "`benchmarks/finetune/tasks_minilm.py`, mean-pooled; 1,128 pairwise cosines.\n")
    print("Flagged (over-parameterized: alpha > 6 with a trusted fit):\n")
    print("| layer | M | alpha | num_pl_spikes | k kept |\n|---|---:|---:|---:|---:|")
    for _, r in flagged.iterrows():
        print(f"| {r['name']} | {r['M']} | {r['alpha']:.2f} | {r['num_pl_spikes']} | {r['k']} |")
    print("\n| condition | layers | singular values kept | Spearman vs original | mean abs d cos | max abs d cos | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    names = list(flagged["name"])
    measure("flagged, keep tail (default)", names, "tail")
    for keep in (0.5, 0.25, 4, 1):
        measure(f"flagged, keep {keep}", names, keep)
    enc = [n for n in df["name"] if n.startswith("encoder.") and n not in names and "intermediate" not in n
           and "output.dense" not in n or (n.endswith("attention.output.dense") and n not in names)]
    rng = random.Random(0)
    rhos = []
    for draw in range(5):
        pick = rng.sample(enc, len([n for n in names if n.startswith("encoder.")]) or 1)
        rhos.append(measure(f"control draw {draw}: random non-flagged attention layers, keep 16", pick, 16,
                            ", ".join(p.replace("encoder.layer.", "L").replace("attention.", "") for p in pick)))
    print(f"\nControl mean Spearman {np.mean(rhos):.4f} (min {np.min(rhos):.4f}).\n")
    measure("every layer, keep tail", lambda lm: True, "tail")


if __name__ == "__main__":
    main()
