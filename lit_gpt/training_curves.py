"""Training curves: the metrics CSV that ``pretrain.py`` writes, read back and drawn (loss + Sink_k vs step).

    python -m lit_gpt.training_curves checkpoints/demo_cpu/metrics.csv --out curves.png
    python -m lit_gpt.training_curves A/metrics.csv B/metrics.csv --labels softmax sigmoid --out both.png

One CSV: :func:`plot_curves` (loss and Sink_k of one run). Several: :func:`plot_compare` (the runs side by side:
validation loss, and Sink_1 with Sink_1* of the extra slots where a run has them).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union
from lit_gpt.utils import ArgumentParser, invalid_choice


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


Series = Dict[str, List[tuple]]


def curve_series(curve: Dict[str, List[Optional[float]]]) -> Series:
    """A column-wise curve (``{"step": [...], "sink_1": [...], ...}``, as in a repro record) in the
    ``read_metrics`` form: column -> [(step, value), ...] without the missing values."""
    steps = curve["step"]
    return {k: [(s, v) for s, v in zip(steps, vals) if v is not None] for k, vals in curve.items() if k != "step"}


def plot_compare(runs: Sequence[Tuple[str, Union[str, Path, Series]]], out_png: Union[str, Path],
                 title: Optional[str] = None, x: str = "step") -> Path:
    """Runs side by side: ``runs`` is ``[(label, metrics_csv or read_metrics-style series), ...]``. Left: Sink_1
    (solid) and Sink_1* of every extra slot (dashed), one colour per run; right: validation loss (training loss
    where a run logged no validation). ``x`` is ``step`` or ``tokens``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_gpt.plots import _save

    if x not in ("step", "tokens"):
        raise ValueError(invalid_choice("x", x, ("step", "tokens")))
    fig, (ax2, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = 0.0
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, (label, path) in enumerate(runs):
        m = path if isinstance(path, dict) else read_metrics(path)
        colour = palette(i % palette.N)
        # tokens per optimizer step is constant within a run: read it off any row that logged tokens
        per_step = next((t / st for st, t in m.get("tokens", []) if st > 0), None) if x == "tokens" else 1.0
        if per_step is None:
            raise ValueError(f"{label}: no 'tokens' column to plot against")

        def xs_of(points, per_step=per_step):
            return [s * per_step for s, _ in points], [v for _, v in points]

        loss_key = "val_loss" if "val_loss" in m else "train_loss"
        if loss_key in m:
            ax1.plot(*xs_of(m[loss_key]), "o-", color=colour, markersize=2, label=f"{label} ({loss_key})")
        if "sink_1" in m:
            xs, ys = xs_of(m["sink_1"])
            ax2.plot(xs, ys, "o-", color=colour, markersize=3, label=f"{label}: Sink_1")
            top = max([top] + ys)
        for key in sorted(k for k in m if k.startswith("sink_extra_")):
            xs, ys = xs_of(m[key])
            ax2.plot(xs, ys, "^--", color=colour, markersize=3,
                     label=f"{label}: Sink_1* (slot {key.rsplit('_', 1)[1]})")
            top = max([top] + ys)
    for ax in (ax1, ax2):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("loss (nats/token)")
    ax2.set_ylabel("% of heads with α > ε")
    hi = min(100.0, max(5.0, 1.15 * top))
    ax2.set_ylim(-0.02 * hi, hi)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description="Plot loss and Sink_k curves from pretraining metrics.csv files "
                                             "(one: loss + Sink_k; several: side by side)")
    ap.add_argument("metrics_csv", nargs="+")
    ap.add_argument("--labels", nargs="*", default=None, help="one label per CSV (default: the run folders' names)")
    ap.add_argument("--out", default=None, help="PNG path (default: curves.png next to the (first) CSV)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--x", default="step", choices=["step", "tokens"], help="x axis of the side-by-side plot")
    a = ap.parse_args(argv)
    out = a.out or str(Path(a.metrics_csv[0]).with_name("curves.png"))
    if len(a.metrics_csv) == 1 and not a.labels:
        print(plot_curves(a.metrics_csv[0], out, a.title))
        return 0
    labels = a.labels or [Path(p).parent.name for p in a.metrics_csv]
    if len(labels) != len(a.metrics_csv):
        ap.error(f"--labels: {len(labels)} labels for {len(a.metrics_csv)} CSV files")
    print(plot_compare(list(zip(labels, a.metrics_csv)), out, a.title, x=a.x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
