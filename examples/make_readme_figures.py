"""Make the README figures from the embedded all-MiniLM-L6-v2 (no network needed).

    python examples/make_readme_figures.py [OUT_DIR]      # default: docs/img

Writes alpha_depth_minilm.png (alpha against depth, coloured by layer kind),
esd_minilm.png (one layer's ESD with its fitted power law) and frog_importance_minilm.png (FROG
layer importance per block, per-matrix against global selection at a 1 % budget).
"""

from __future__ import annotations

import sys
from pathlib import Path

import frogwatch
from frogwatch.diagnostics import layer_spectrum
from frogwatch.plots import plot_alpha_depth, plot_esd
from frogwatch.plots_frog import plot_strategy_comparison

LAYER = "encoder.layer.2.intermediate.dense"


def main(out_dir: str = "docs/img") -> None:
    out = Path(out_dir)
    model = frogwatch.load_default_model()
    df = frogwatch.analyze(model, progress=False)
    plot_alpha_depth(df, title=r"all-MiniLM-L6-v2: $\alpha$ against depth",
                     path=out / "alpha_depth_minilm.png")  # fmt: skip
    row = df.set_index("name").loc[LAYER]
    plot_esd(layer_spectrum(model, LAYER), row, title=f"all-MiniLM-L6-v2: {LAYER}",
             path=out / "esd_minilm.png")  # fmt: skip
    per_matrix = frogwatch.select(model, 0.01, strategy="per_matrix", progress=False)
    global_ = frogwatch.select(model, 0.01, strategy="global", progress=False)
    fig = plot_strategy_comparison(per_matrix, global_, by="block")
    fig.savefig(out / "frog_importance_minilm.png", dpi=100)
    print(f"wrote alpha_depth_minilm.png, esd_minilm.png and frog_importance_minilm.png to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
