"""The paper's analysis figures (matplotlib, PNG, headless): attention maps of chosen heads, Sink_1 vs ε and per
layer, ℓ2 norms per layer for token 1 vs the rest, and the cos / norm-product decomposition of q·k."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from lit_gpt.utils import atomic_write_bytes

DPI = 90


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Union[str, Path]) -> Path:
    import io

    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_attention_maps(maps: Dict[str, torch.Tensor], path: Union[str, Path], title: str = "",
                        n_extra: int = 0) -> Path:
    """One heatmap per (T, S+T) map (rows = queries, columns = [extra slots] + keys), averaged over samples."""
    plt = _plt()
    n = len(maps)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, maps.items()):
        im = ax.imshow(m.float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key" + (f" (first {n_extra} = extra slots)" if n_extra else ""), fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_sink(curves: Dict[str, Tuple[torch.Tensor, torch.Tensor]], per_layer: Dict[str, torch.Tensor],
              path: Union[str, Path], title: str = "", eps: Optional[float] = None, k_label: str = "Sink_1") -> Path:
    """Left: Sink_1 (%) vs ε per input; right: Sink_1 (%) per layer at the chosen ε."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, (grid, values) in curves.items():
        a.plot(grid.numpy(), values.numpy(), label=label)
    if eps is not None:
        a.axvline(eps, color="grey", ls=":", lw=1)
    a.set_xlabel("ε")
    a.set_ylabel(f"{k_label} (%)")
    a.set_ylim(-2, 102)
    a.legend(fontsize=8)
    a.set_title(f"{k_label} vs ε", fontsize=9)
    for label, values in per_layer.items():
        b.plot(range(len(values)), values.numpy(), marker="o", ms=3, label=label)
    b.set_xlabel("layer")
    b.set_ylabel(f"{k_label} (%)" + (f" at ε={eps}" if eps is not None else ""))
    b.set_ylim(-2, 102)
    b.set_title(f"{k_label} per layer", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_norms(act, path: Union[str, Path], title: str = "") -> Path:
    """ℓ2 norms per layer for token 1 vs the mean of the other tokens: hidden states, keys, values, and the
    massive-activation ratio ‖h_1‖ / mean‖h_t‖ (``act`` is a :class:`lit_gpt.analysis.ActivationResult`)."""
    from lit_gpt.analysis import first_vs_rest

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    fig.subplots_adjust(wspace=0.3, top=0.82)
    panels = (("hidden_norm", "‖h‖ (input of layer l)"), ("key_norm", "‖k‖"), ("value_norm", "‖v‖"))
    for ax, (name, label) in zip(axes, panels):
        t = getattr(act, name)
        if t is None:
            ax.axis("off")
            continue
        first, rest = first_vs_rest(t)
        ax.plot(first.numpy(), marker="o", ms=3, label="token 1")
        ax.plot(rest.numpy(), marker="s", ms=3, label="tokens 2..T (mean)")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    axes[3].plot(act.massive_ratio.numpy(), marker="o", ms=3, color="C3")
    axes[3].axhline(1.0, color="grey", ls=":", lw=1)
    axes[3].set_yscale("log")
    axes[3].set_xlabel("layer")
    axes[3].set_title("‖h_1‖ / mean_t>1 ‖h_t‖", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_cos_norm(act, path: Union[str, Path], title: str = "") -> Path:
    """Top: mean cos(q_t, k_1) and cos(q_t, k_j>1) per (layer, head), and the (cos, ‖q‖‖k‖) histogram of key 1.
    Bottom: mean ‖q_t‖‖k_1‖ and ‖q_t‖‖k_j>1‖ per (layer, head) (log10), and the histogram of the other keys."""
    import numpy as np

    plt = _plt()
    if act.cos_first is None:
        raise ValueError("plot_cos_norm needs q/k statistics (ActivationMeter.update with q= and k=)")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, name, label in ((axes[0, 0], "cos_first", "cos(q_t, k_1)"), (axes[0, 1], "cos_rest", "cos(q_t, k_j), j>1")):
        im = ax.imshow(getattr(act, name).numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    lo = float(np.log10(max(min(act.normprod_first.min(), act.normprod_rest.min()), 1e-6)))
    hi = float(np.log10(max(act.normprod_first.max(), act.normprod_rest.max(), 1e-6)))
    for ax, name, label in ((axes[1, 0], "normprod_first", "log10 ‖q_t‖‖k_1‖"),
                            (axes[1, 1], "normprod_rest", "log10 ‖q_t‖‖k_j‖, j>1")):
        im = ax.imshow(np.log10(getattr(act, name).clamp_min(1e-6).numpy()), cmap="magma", vmin=lo, vmax=hi,
                       aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    extent = [float(act.logn_edges[0]), float(act.logn_edges[-1]), float(act.cos_edges[0]), float(act.cos_edges[-1])]
    used = ((act.hist_first.sum((0, 1)) + act.hist_rest.sum((0, 1))) > 0).nonzero().flatten()
    xlim = (float(act.logn_edges[max(int(used.min()) - 1, 0)]), float(act.logn_edges[min(int(used.max()) + 2,
                                                                                          len(act.logn_edges) - 1)]))
    for ax, name, label in ((axes[0, 2], "hist_first", "(cos, ‖q‖‖k‖) of key 1, all layers/heads/queries"),
                            (axes[1, 2], "hist_rest", "(cos, ‖q‖‖k‖) of keys j>1, all causal pairs")):
        h = getattr(act, name).sum(0)
        h = h / h.sum().clamp_min(1)
        ax.imshow(np.log10(h.numpy() + 1e-6), origin="lower", extent=extent, aspect="auto", cmap="Blues")
        ax.set_xlim(*xlim)
        ax.set_xlabel("log10 ‖q‖‖k‖")
        ax.set_ylabel("cos(q, k)")
        ax.set_title(label, fontsize=9)
    fig.subplots_adjust(hspace=0.35, wspace=0.35)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_model_bars(values: Dict[str, Dict[str, float]], path: Union[str, Path], ylabel: str = "Sink_1 (%)",
                    title: str = "") -> Path:
    """Grouped bars: values[model][input]."""
    import numpy as np

    plt = _plt()
    models = list(values)
    inputs: Sequence[str] = sorted({i for v in values.values() for i in v},
                                   key=lambda s: ("natural", "random", "repeated").index(s)
                                   if s in ("natural", "random", "repeated") else 9)
    x = np.arange(len(models))
    w = 0.8 / max(len(inputs), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(models) + 2), 3.4))
    for j, inp in enumerate(inputs):
        ax.bar(x + j * w, [values[m].get(inp, float("nan")) for m in models], w, label=inp)
    ax.set_xticks(x + w * (len(inputs) - 1) / 2)
    ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
