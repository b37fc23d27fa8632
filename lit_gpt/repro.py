"""Raw results of the reproduction runs (issue #10): one JSON record per run, one schema, built from a finished
run folder (``metrics.csv`` + ``summary.json`` + ``run_config.yaml`` written by :func:`lit_gpt.trainer.fit`).

A record holds what a table row needs and what makes it re-runnable: the row id and regime, the config and the
overrides, the exact command, the hardware and software, steps / tokens / seconds, the final validation and
probe losses, the final Sink_1..k and Sink_1* (one value per extra slot), and the whole evaluated curve
(step, tokens, Sink_1..k, Sink_1*, probe loss; validation loss where it was logged).

    rec = build_record(run_dir, row="default", regime="cpu", config="configs/repro/cpu/default.yaml", ...)
    write_record(rec, "docs/results/repro/cpu")           # -> docs/results/repro/cpu/default.json
    recs = load_records("docs/results/repro")               # {(regime, row): record}

What the numbers mean: Sink_k is the paper's metric (``lit_gpt.sink_metrics``, ε and T of the run's probe);
for attention operations without normalisation the maps are the paper's proxy |sim| / Σ|sim| (its Table 6
asterisk), and Sink_1* is the share of heads whose extra key slot (k*, sink token, sink logit) receives
α > ε, averaged over all T queries. :func:`emergence_step` is the first evaluation from which a curve stays at
or above a threshold to the end of the run.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from lit_gpt.utils import atomic_write_text, invalid_choice

SCHEMA = "asl-repro-run/1"
REQUIRED = ("schema", "row", "regime", "config", "overrides", "command", "hardware", "software", "seed", "steps",
            "tokens", "train_seconds", "final", "curve", "probe")


class RecordError(ValueError):
    """A run folder or a record file is incomplete or does not follow the schema."""


def hardware_of(env: Dict[str, Any], device: str, note: str = "") -> Dict[str, Any]:
    """The hardware part of a record from a run's environment (``lit_gpt.results.environment``)."""
    hw: Dict[str, Any] = {"device": device, "cpu": env.get("cpu"), "cpu_cores": env.get("cpu_count"),
                          "torch_threads": env.get("threads")}
    if env.get("load_average_1min") is not None:
        hw["load_avg_1m_at_end"] = env["load_average_1min"]
    for k in ("gpu_count", "gpu_memory_gib", "cuda"):
        if env.get(k) is not None:
            hw[k] = env[k]
    if note:
        hw["note"] = note
    return hw


def read_curve(metrics_csv: Union[str, Path]) -> Dict[str, List[Optional[float]]]:
    """The evaluated rows of ``metrics.csv`` (those with Sink_1) as columns: step, tokens, sink_*, probe_loss,
    val_loss (None where that row did not log it). Tokens are steps x tokens per step."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise RecordError(f"{metrics_csv}: no rows")
    per_step = next((float(r["tokens"]) / float(r["step"]) for r in rows
                     if r.get("tokens") and float(r["step"]) > 0), None)
    cols = [c for c in rows[0] if c.startswith("sink_") or c in ("probe_loss", "val_loss")]
    curve: Dict[str, List[Optional[float]]] = {"step": [], "tokens": []}
    for c in cols:
        curve[c] = []
    for r in rows:
        if not r.get("sink_1"):
            continue
        step = int(float(r["step"]))
        curve["step"].append(step)
        curve["tokens"].append(int(round(step * per_step)) if per_step else None)
        for c in cols:
            curve[c].append(float(r[c]) if r.get(c) not in (None, "") else None)
    if not curve["step"]:
        raise RecordError(f"{metrics_csv}: no row with sink_1 (was the sink evaluated?)")
    return curve


def last_value(curve: Dict[str, List[Optional[float]]], key: str) -> Optional[float]:
    vals = [v for v in curve.get(key, []) if v is not None]
    return vals[-1] if vals else None


def emergence_step(steps: Sequence[int], values: Sequence[Optional[float]], threshold: float) -> Optional[int]:
    """First step from which ``values`` stay >= ``threshold`` at every later evaluation (None if never)."""
    first = None
    for s, v in zip(steps, values):
        if v is not None and v >= threshold:
            if first is None:
                first = s
        elif v is not None:
            first = None
    return first


def build_record(run_dir: Union[str, Path], *, row: str, regime: str, config: str, overrides: Sequence[str] = (),
                 command: str, wall_seconds: Optional[float] = None, note: str = "") -> Dict[str, Any]:
    """The record of one finished run folder: its ``summary.json`` (with the run's config and environment) and
    ``metrics.csv`` (raises RecordError if the run did not finish). Works on a folder fetched from another
    machine: where and with what the run ran comes from the summary, not from this machine."""
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    for p in (summary_path, metrics_path):
        if not p.is_file():
            raise RecordError(f"{p} is missing: the run in {run_dir} did not finish")
    s = json.loads(summary_path.read_text())
    curve = read_curve(metrics_path)
    rc = s.get("run_config")
    if rc is None:
        if not (run_dir / "run_config.yaml").is_file():
            raise RecordError(f"{run_dir}: neither summary.json nor run_config.yaml says what was run")
        import yaml

        rc = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    env = s.get("environment") or {}
    k_max = max(int(c.split("_")[1]) for c in curve if c.startswith("sink_") and c.split("_")[1].isdigit())
    n_extra = len([c for c in curve if c.startswith("sink_extra_")])
    final = {
        "val_loss": last_value(curve, "val_loss") if last_value(curve, "val_loss") is not None
        else s["final"].get("val_loss"),
        "probe_loss": last_value(curve, "probe_loss"),
        "train_loss": s["final"].get("train_loss"),
        "sink": [last_value(curve, f"sink_{k}") for k in range(1, k_max + 1)],
        "sink_extra": [last_value(curve, f"sink_extra_{i}") for i in range(n_extra)],
    }
    probe = dict(rc.get("probe") or {})
    probe["where"] = s.get("probe")
    model = dict(rc.get("model") or {})
    return {
        "schema": SCHEMA,
        "row": row,
        "regime": regime,
        "config": config,
        "overrides": list(overrides),
        "command": command,
        "git_commit": env.get("git_commit"),
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware_of(env, s.get("device", "cpu"), note),
        "software": {k: env[k] for k in ("python", "torch", "platform") if k in env},
        "model": model,
        "params_M": s.get("params_M"),
        "seed": (rc.get("train") or {}).get("seed"),             # model initialisation
        "data_seed": (rc.get("data") or {}).get("seed"),         # data order
        "steps": s["step"],
        "max_steps": s.get("max_steps"),
        "stopped_early": s.get("stopped_early"),
        "tokens": s["tokens_seen"],
        "global_batch_size": (rc.get("train") or {}).get("global_batch_size"),
        "train_seconds": s["train_seconds"],
        "wall_seconds": wall_seconds,
        "tokens_per_s_median": s.get("tokens_per_s_median"),
        "probe": probe,
        "final": final,
        "curve": curve,
    }


FINAL_CHECKS_FILE = "final_checks.json"


def final_checks(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """What the training log does not hold, measured on the run's newest checkpoint (``final/``, else the newest
    ``step-*``: a run stopped by ``train.max_time_s`` saves one at its last step; its name is ``checkpoint`` in the
    result) over the run's own probe: Sink_1
    and the mean α_1 per layer (and Sink_1* per layer for extra slots), and for a sliding-window run the share of
    (sample, layer, head) whose attention on the first token of each query's own window exceeds ε
    (``sink_metrics.window_start_scores``).
    The result is also written to ``<run_dir>/final_checks.json``, so a run folder fetched without its checkpoint
    (the GPU box returns no checkpoints) still carries them: without a checkpoint that file is read, and
    without either the result is empty."""
    from lit_gpt.checkpoint import list_checkpoints

    saved = Path(run_dir) / FINAL_CHECKS_FILE
    found = list_checkpoints(run_dir)
    if not found:
        return json.loads(saved.read_text()) if saved.is_file() else {}
    final_dir = found[0]
    import torch

    from lit_gpt.evaluate import probe_run_checkpoint
    from lit_gpt.sink_metrics import window_start_scores

    # the probe as the trainer feeds it (the run's fixed token in place), so these numbers match the curve's
    rp = probe_run_checkpoint(final_dir, device="cpu")
    model, pc, result = rp.model, rp.cfg.probe, rp.result
    mc = model.config
    S = result.n_extra
    T = rp.tokens.shape[1] - 1
    out: Dict[str, Any] = {
        "checkpoint": final_dir.name,
        "sink_1_per_layer": result.per_layer[:, S].tolist(),
        # mean importance score of token 1 per layer (over heads and samples) and its value under uniform causal
        # attention, (1/T) sum_i 1/i: a layer at that level attends evenly, one far above it sinks
        "alpha_1_per_layer": result.mean_alpha[:, :, S].nanmean(-1).tolist(),
        "alpha_1_uniform": sum(1.0 / i for i in range(1, T + 1)) / T,
    }
    if S:
        out["sink_extra_per_layer"] = [result.per_layer[:, j].tolist() for j in range(S)]
    if mc.attn_mask == "window" and mc.window_size < pc.T:
        hits, total = 0.0, 0
        model.eval()
        with torch.no_grad():
            for batch in rp.inputs[:, :pc.T].split(pc.batch_size):
                _, an = model(batch, return_analysis=("attn",))
                for a in an.attn:
                    score = window_start_scores(a, mc.window_size, an.n_extra)     # (B, H)
                    hits += float((score > pc.eps).sum())
                    total += score.numel()
        out["sink_window_start"] = 100.0 * hits / total
    atomic_write_text(saved, json.dumps(out, indent=1) + "\n")
    return out


EXPLORATION_SCHEMA = "asl-repro-exploration/1"


def exploration_entry(run_dir: Union[str, Path], why_stopped: str = "") -> Dict[str, Any]:
    """A compact record of an exploratory run, finished or not (only ``metrics.csv`` and ``run_config.yaml`` are
    needed): its settings, how far it got and its Sink_1 (Sink_1*) curve."""
    import yaml

    run_dir = Path(run_dir)
    rc = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    m, t, d = rc["model"], rc["train"], rc["data"]
    curve = read_curve(run_dir / "metrics.csv")
    summary = run_dir / "summary.json"
    keep = ("step", "tokens", "sink_1", "sink_extra_0", "val_loss")
    s1 = [v for v in curve["sink_1"] if v is not None]
    return {
        "name": run_dir.name,
        "settings": {"n_layer": m.get("n_layer"), "n_head": m.get("n_head"), "n_embd": m.get("n_embd"),
                     "block_size": m.get("block_size"), "pos_encoding": m.get("pos_encoding", "rope"),
                     "kv_bias": m.get("kv_bias", "none"), "first_token_fixed": d.get("fixed_token") is not None,
                     "lr": t["lr"], "weight_decay": t["weight_decay"],
                     "tokens_per_step": t["global_batch_size"] * m.get("block_size", 0),
                     "seed": t.get("seed"), "data_seed": d.get("seed"), "bias": bool(m.get("bias", False)),
                     "data": f"{d.get('train_dir')}: {', '.join(sorted(d.get('train') or {}))}"},
        "steps": curve["step"][-1],
        "tokens": curve["tokens"][-1],
        "ended": "finished" if summary.is_file() and not json.loads(summary.read_text()).get("stopped_early")
        else (json.loads(summary.read_text())["stopped_early"] if summary.is_file() else why_stopped or "stopped"),
        "sink_1_max": max(s1), "sink_1_last": s1[-1],
        "curve": {k: v for k, v in curve.items() if k in keep},
    }


def add_exploration(path: Union[str, Path], run_dirs: Sequence[Union[str, Path]], why_stopped: str = "") -> List[str]:
    """Append the :func:`exploration_entry` of each run folder to the exploration log at ``path`` (written
    atomically); a name already in the log is refused (RecordError), so no entry is ever replaced. Returns the
    names added."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if doc.get("schema") != EXPLORATION_SCHEMA:
        raise RecordError(f"{path}: {invalid_choice('schema', doc.get('schema'), EXPLORATION_SCHEMA)}")
    have = {r["name"] for r in doc["runs"]}
    entries = [exploration_entry(r, why_stopped) for r in run_dirs]
    names = [e["name"] for e in entries]
    dup = sorted((have & set(names)) | {n for n in names if names.count(n) > 1})
    if dup:
        raise RecordError(f"{path}: runs {dup} are already in the exploration log; a run folder's name must be new")
    doc["runs"].extend(entries)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return names


def check_record(rec: Dict[str, Any], where: str = "record") -> None:
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise RecordError(f"{where}: missing keys {missing}")
    if rec["schema"] != SCHEMA:
        raise RecordError(f"{where}: {invalid_choice('schema', rec['schema'], SCHEMA)}")
    lengths = {k: len(v) for k, v in rec["curve"].items()}
    if len(set(lengths.values())) != 1:
        raise RecordError(f"{where}: curve columns differ in length: {lengths}")


def record_path(results_dir: Union[str, Path], rec: Dict[str, Any]) -> Path:
    return Path(results_dir) / rec["regime"] / f"{rec['row']}.json"


def write_record(rec: Dict[str, Any], results_dir: Union[str, Path]) -> Path:
    check_record(rec)
    path = record_path(results_dir, rec)
    atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    return path


def load_records(results_dir: Union[str, Path]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Every record under ``results_dir/<regime>/<row>.json``, keyed by (regime, row)."""
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for path in sorted(Path(results_dir).glob("*/*.json")):
        rec = json.loads(path.read_text())
        check_record(rec, str(path))
        if (rec["regime"], rec["row"]) != (path.parent.name, path.stem):
            raise RecordError(f"{path}: holds regime={rec['regime']!r} row={rec['row']!r}; the file name must match")
        out[(rec["regime"], rec["row"])] = rec
    return out
