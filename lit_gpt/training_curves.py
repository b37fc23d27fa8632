"""Training curves: the metrics CSV that ``pretrain.py`` writes, read back and drawn (loss + Sink_k vs step).

    python -m lit_gpt.training_curves checkpoints/demo_cpu/metrics.csv --out curves.png
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union


def read_metrics(path: Union[str, Path]) -> Dict[str, List[tuple]]:
    """column -> [(step, value), ...] for every non-empty cell of the metrics CSV."""
    out: Dict[str, List[tuple]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for k, v in row.items():
                if k == "step" or v in ("", None):
                    continue
                try:
                    out.setdefault(k, []).append((step, float(v)))
                except ValueError:
                    continue
    return out


def plot_curves(metrics_csv: Union[str, Path], out_png: Union[str, Path], title: Optional[str] = None,
                sink_ks: Sequence[int] = (1, 2)) -> Path:
    """Left: train / validation / probe loss vs step. Right: Sink_k (eps of the run) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(metrics_csv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-"), ("probe_loss", "s--")):
        if key in m:
            xs, ys = zip(*m[key])
            ax1.plot(xs, ys, style, label=key, markersize=3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    drawn, top = False, 0.0
    for k in sink_ks:
        key = f"sink_{k}"
        if key in m:
            xs, ys = zip(*m[key])
            ax2.plot(xs, ys, "o-", label=f"Sink_{k}", markersize=3)
            drawn, top = True, max(top, max(ys))
    for key in sorted(k for k in m if k.startswith("sink_extra_")):
        xs, ys = zip(*m[key])
        ax2.plot(xs, ys, "^--", label=key.replace("sink_extra_", "Sink_1* slot "), markersize=3)
        drawn, top = True, max(top, max(ys))
    ax2.set_xlabel("step")
    ax2.set_ylabel("Sink_k (% of heads, eps=0.3)")
    hi = min(100.0, max(5.0, 1.15 * top))          # small sinks stay visible; 100% is the ceiling
    ax2.set_ylim(-0.02 * hi, hi)
    if drawn:
        ax2.legend()
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Plot loss and Sink_k curves from a pretraining metrics.csv")
    ap.add_argument("metrics_csv")
    ap.add_argument("--out", default=None, help="PNG path (default: curves.png next to the CSV)")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    out = a.out or str(Path(a.metrics_csv).with_name("curves.png"))
    print(plot_curves(a.metrics_csv, out, a.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
