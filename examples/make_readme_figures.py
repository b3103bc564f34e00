"""Make the README figures from the embedded all-MiniLM-L6-v2 (no network needed).

    python examples/make_readme_figures.py [OUT_DIR]      # default: docs/img

Writes alpha_depth_minilm.png (alpha against depth, coloured by layer kind),
esd_minilm.png (one layer's ESD with its fitted power law, straight from its row of the analyze
table) and frog_importance_minilm.png (FROG layer importance per block, per-matrix against global
selection at a 1 % budget). The files carry no version or date, so rerunning the script on the
same versions reproduces them; every number drawn is the table's (see docs/method.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import frogwatch
from frogwatch.plots import figure_bytes, plot_alpha_depth, plot_esd
from frogwatch.plots_frog import plot_strategy_comparison

LAYER = "encoder.layer.2.intermediate.dense"


def main(out_dir: str = "docs/img") -> None:
    out = Path(out_dir)
    model = frogwatch.load_default_model()
    df = frogwatch.analyze(model, progress=False)
    plot_alpha_depth(df, title=r"all-MiniLM-L6-v2: $\alpha$ against depth",
                     path=out / "alpha_depth_minilm.png")  # fmt: skip
    row = df[df["name"] == LAYER].iloc[0]
    plot_esd(row, title=f"all-MiniLM-L6-v2: {LAYER}", path=out / "esd_minilm.png")
    per_matrix = frogwatch.select(model, 0.01, strategy="per_matrix", score="relevance", progress=False)
    global_ = frogwatch.select(model, 0.01, strategy="global", score="relevance", progress=False)
    fig = plot_strategy_comparison(per_matrix, global_, by="block")
    from frogwatch._io import atomic_write_bytes

    atomic_write_bytes(out / "frog_importance_minilm.png", figure_bytes(fig, "png", dpi=100))
    print(f"wrote alpha_depth_minilm.png, esd_minilm.png and frog_importance_minilm.png to {out}")
    print(f"{LAYER}: alpha = {row['alpha']:.3f}, tail = {int(row['num_pl_spikes'])} eigenvalues")


if __name__ == "__main__":
    main(*sys.argv[1:2])
