"""alpha_farms on MiniLM: does the aspect-ratio-free alpha change the correlation-flow verdicts?

    python benchmarks/farms_minilm.py > benchmarks/results_farms.md

Part 1 (the bias FARMS is meant to remove): random matrices of MiniLM's two shapes, 384 x 384
(attention) and 1536 x 384 (MLP), 10 draws each, with the same entry distribution (Gaussian, and
heavy-tailed Student-t with 3 degrees of freedom): alpha and alpha_farms by shape.
Part 2: MiniLM's correlation-flow groups (frogwatch.correlation_flow) from alpha and from
alpha_farms, and the layers whose alpha and alpha_farms disagree most.
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import frogwatch
from frogwatch.diagnostics.farms import farms_eigenvalues
from frogwatch.diagnostics.flow import correlation_flow
from frogwatch.powerlaw_fit import fit_power_law
from frogwatch.spectra import eigenvalues


def main() -> None:
    print("# alpha_farms (FARMS-style, aspect-ratio-free alpha) on MiniLM\n")
    print("Command: `python benchmarks/farms_minilm.py` (deterministic, CPU).  ")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} (no timings reported).\n")
    print("## 1. Random matrices: same entries, two shapes (10 draws each)\n")
    print("| entries | shape (N x M) | Q | alpha median [IQR] | alpha_farms median [IQR] |\n|---|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for label, draw in (("Gaussian", lambda s: rng.standard_normal(s)), ("Student-t, 3 dof", lambda s: rng.standard_t(3, s))):
        for N in (384, 1536):
            a, af = [], []
            for _ in range(10):
                W = draw((N, 384)) / np.sqrt(N)
                a.append(fit_power_law(eigenvalues(W)).alpha)
                af.append(fit_power_law(farms_eigenvalues(W)[0]).alpha)
            q = lambda v: f"{np.median(v):.2f} [{np.percentile(v, 25):.2f}, {np.percentile(v, 75):.2f}]"
            print(f"| {label} | {N} x 384 | {N / 384:g} | {q(a)} | {q(af)} |")
    model = frogwatch.load_default_model().eval()
    df = frogwatch.analyze(model, farms=True, progress=False)
    plain = correlation_flow(df).groups
    farms = correlation_flow(df.assign(alpha=df["alpha_farms"])).groups
    print("\n## 2. Correlation-flow verdicts on MiniLM (all-MiniLM-L6-v2), alpha vs alpha_farms\n")
    print("| group | n | median alpha | median alpha_farms | slope (alpha) | slope (farms) | "
          "dispersion (alpha) | dispersion (farms) | verdict (alpha) | verdict (farms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for g in plain.index:
        p, f = plain.loc[g], farms.loc[g]
        flag = " **changed**" if p["verdict"] != f["verdict"] else ""
        print(f"| {g} | {p['n']} | {p['alpha_median']:.2f} | {f['alpha_median']:.2f} | {p['slope']:.2f} | "
              f"{f['slope']:.2f} | {p['dispersion']:.2f} | {f['dispersion']:.2f} | {p['verdict']} | {f['verdict']}{flag} |")
    from scipy.stats import spearmanr

    ok = df[["alpha", "alpha_farms"]].dropna()
    print(f"\nSpearman(alpha, alpha_farms) over {len(ok)} layers: {spearmanr(ok['alpha'], ok['alpha_farms']).statistic:.3f}. "
          f"Over-parameterized (alpha > 6): {int((df['alpha'] > 6).sum())} layers by alpha, "
          f"{int((df['alpha_farms'] > 6).sum())} by alpha_farms.\n")
    d = (df["alpha_farms"] - df["alpha"]).abs().sort_values(ascending=False)
    print("Largest disagreements:\n\n| layer | N x M | alpha | alpha_farms |\n|---|---|---:|---:|")
    for i in d.index[:6]:
        r = df.loc[i]
        print(f"| {r['name']} | {r['N']} x {r['M']} | {r['alpha']:.2f} | {r['alpha_farms']:.2f} |")


if __name__ == "__main__":
    main()
