"""Render the reproduction tables (issue #10) from the raw records, the one place where they are written.

    python scripts/repro_tables.py            # rewrite the tables in scripts/*.md and docs/repro.md, and the plots
    python scripts/repro_tables.py --check    # exit 1 if a table differs from what the records give (tests use it)

Inputs: ``scripts/repro_rows.yaml`` (rows, sections, the paper's numbers, the agreement rules) and the records
``docs/results/repro/<regime>/<row>.json`` written by ``scripts/repro_run.py``. Every number in a table comes
from a record; a row without a record is listed as not run. Each table sits between the markers
``<!-- repro:<section>:<regime>:begin -->`` and ``<!-- repro:<section>:<regime>:end -->`` of its markdown
file (appended at the end of the file, under a heading, when the markers are not there yet). Plots:
``docs/img/repro_<regime>_<section>.png`` (Sink_1 / Sink_1* and validation loss of the section's rows).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_gpt.doc_tables import region_markers, splice_region, update_files  # noqa: E402
from lit_gpt.repro import emergence_step, load_records  # noqa: E402
from lit_gpt.utils import ArgumentParser, invalid_choice  # noqa: E402

ROWS = REPO / "scripts" / "repro_rows.yaml"
RESULTS = REPO / "docs" / "results" / "repro"
IMG_DIR = Path("docs") / "img"
REGIMES = ("cpu", "cpu2", "gpu")   # cpu2: the second CPU regime (configs/repro/cpu2/, docs/repro.md)
EMERGE_AT = 5.0          # a sink "has emerged" from the first evaluation after which Sink_1 stays >= this (%)


def load_rows(path: Path = ROWS) -> dict:
    d = yaml.safe_load(path.read_text())
    for rid, r in d["rows"].items():
        if "what" not in r and twin_of(rid) is not None:
            continue        # what the registry adds to a derived seed twin (with_twins), e.g. its note
        bad = [s for s in r.get("sections", ["(none)"]) if s not in d["sections"]]
        if bad:
            raise ValueError(f"{path}: row {rid!r} names unknown sections {bad}")
        if "baseline" in r and r["baseline"] not in d["rows"] and twin_of(r["baseline"]) is None:
            raise ValueError(f"{path}: row {rid!r} baseline={r['baseline']!r} is invalid; "
                             "allowed: a row of the registry")
        if r.get("expect") is not None and r["expect"] not in EXPECT:
            raise ValueError(f"{path}: row {rid!r} {invalid_choice('expect', r.get('expect'), EXPECT)}")
        field = NEEDS.get(r.get("expect"))
        if field and not (isinstance(r.get(field), int) and r[field] >= 1):
            raise ValueError(f"{path}: row {rid!r} {invalid_choice(field, r.get(field), 'an integer >= 1')} "
                             f"(expect: {r['expect']})")
    return d


# ---------------------------------------------------------------------------- seed twins
TWIN_RE = re.compile(r"^(?:(?P<base>.+)_)?seed(?P<seed>\d+)$")


def twin_of(rid: str) -> Optional[Tuple[str, int]]:
    """``X_seedN`` -> (X, N): row X with model and data seed N; ``seedN`` -> ("default", N)."""
    m = TWIN_RE.match(rid)
    return (m["base"] or "default", int(m["seed"])) if m else None


def with_twins(spec: dict, records: Dict[Tuple[str, str], dict]) -> dict:
    """The registry with an entry for every recorded seed twin: ``X_seedN`` (configs/repro/<regime>/X_seedN.yaml,
    row X with ``data.seed = train.seed = N``) takes X's sections, paper number and rule and is judged against
    ``seedN``, the default of that seed; ``seedN`` is the default's twin (the emergence map's run-to-run spread).
    What the registry writes for a twin (a note, say) goes over the derived entry. Twins follow their row."""
    rows = spec["rows"]
    recorded = {rid for _, rid in records}
    derived: Dict[str, dict] = {}
    for rid in sorted(recorded | set(rows), key=lambda r: (twin_of(r) or (r, 0))[1]):
        tw = twin_of(rid)
        if tw is None or tw[0] not in rows or twin_of(tw[0]) is not None:
            continue
        base, seed = tw
        b = rows[base]
        if base == "default":
            entry = {"sections": ["emergence_map"],
                     "what": f"the default with other seeds (model {seed}, data {seed}): run-to-run spread",
                     "paper": "-"}
        else:
            entry = {k: b[k] for k in ("sections", "paper", "expect", "prefix", "position") if k in b}
            entry["sections"] = [x for x in b["sections"] if x != "emergence_map"]
            entry.update(what=f"{base} with seeds {seed} (model {seed}, data {seed}), against seed{seed}",
                         baseline=f"seed{seed}")
        regimes = sorted({g for g, r in records if r == rid}) or list(b.get("regimes", REGIMES))
        entry["regimes"] = regimes
        entry.update(rows.get(rid, {}))
        derived[rid] = entry
    ordered: Dict[str, dict] = {}
    for rid, row in rows.items():
        if rid in derived:
            continue
        ordered[rid] = row
        for tid in (t for t in derived if twin_of(t)[0] == rid):
            ordered[tid] = derived[tid]
    return dict(spec, rows=ordered)


def twins(rid: str, spec: dict) -> List[str]:
    """The seed twins of row ``rid`` in the registry (``with_twins``), in its order."""
    return [t for t in spec["rows"] if (twin_of(t) or ("",))[0] == rid]


def baseline_record(row: dict, regime: str, records: Dict[Tuple[str, str], dict]) -> Optional[dict]:
    """The record a row is judged against: its ``baseline`` row (a seed twin's seedN), else the regime's default."""
    return records.get((regime, row.get("baseline", "default")))


# ---------------------------------------------------------------------------- agreement rules
def _sinks(rec: dict) -> Tuple[float, List[float], List[float]]:
    f = rec["final"]
    return f["sink"][0], f["sink"], [v for v in f["sink_extra"] if v is not None]


def _small(D: float) -> float:
    return max(1.0, 0.1 * D)


def _rule_sink(rec, D, row):
    return _sinks(rec)[0] >= 5.0


def _rule_no_sink(rec, D, row):
    return _sinks(rec)[0] <= _small(D)


def _rule_lower(rec, D, row):
    return _sinks(rec)[0] <= 0.75 * D


def _rule_higher(rec, D, row):
    return _sinks(rec)[0] >= 1.25 * D


def _rule_similar(rec, D, row):
    return 0.5 * D <= _sinks(rec)[0] <= 2.0 * D


def _rule_slot(rec, D, row):
    s1, _, extra = _sinks(rec)
    return bool(extra) and max(extra) >= 0.5 * D and s1 <= _small(D)


def _rule_in_prefix(rec, D, row):
    _, sk, _ = _sinks(rec)
    p = int(row["prefix"])
    return max(sk[:p]) >= 0.5 * D and all(v <= _small(D) for v in sk[p:])


def _rule_at_position(rec, D, row):
    s1, sk, _ = _sinks(rec)
    k = int(row["position"])
    return len(sk) >= k and sk[k - 1] >= 0.5 * D and s1 <= _small(D)


EXPECT = {
    "sink": ("Sink_1 >= 5%", _rule_sink),
    "no_sink": ("Sink_1 <= max(1, 0.1 D)", _rule_no_sink),
    "lower": ("Sink_1 <= 0.75 D", _rule_lower),
    "higher": ("Sink_1 >= 1.25 D", _rule_higher),
    "similar": ("0.5 D <= Sink_1 <= 2 D", _rule_similar),
    "slot": ("Sink_1* >= 0.5 D, Sink_1 <= max(1, 0.1 D)", _rule_slot),
    "in_prefix": ("max Sink_1..p >= 0.5 D, Sink_k <= max(1, 0.1 D) for k > p", _rule_in_prefix),
    "at_position": ("Sink_{position} >= 0.5 D, Sink_1 <= max(1, 0.1 D)", _rule_at_position),
}
NEEDS = {"in_prefix": "prefix", "at_position": "position"}      # the row field each rule reads


def agreement(rec: dict, default: Optional[dict], row: dict) -> str:
    if row.get("expect") is None:
        return "-"
    if default is None:
        return "no default run to compare with"
    D = default["final"]["sink"][0]
    return "yes" if EXPECT[row["expect"]][1](rec, D, row) else "**no**"


# ---------------------------------------------------------------------------- cells
def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_tokens(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def fmt_loss(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def other_sinks(rec: dict, row: dict) -> str:
    """Sink_1* of the extra slots, else the largest Sink_k for k >= 2 (within the prefix for prefix rows)."""
    s1, sk, extra = _sinks(rec)
    if extra:
        return " / ".join(f"Sink_1* {v:.1f}" for v in extra)
    if rec["final"].get("sink_window_start") is not None:
        return f"each window's first token: {rec['final']['sink_window_start']:.1f}"
    if "position" in row and len(sk) >= int(row["position"]):
        k = int(row["position"])
        return f"Sink_{k} {sk[k - 1]:.1f}"
    lo, hi = (1, int(row["prefix"])) if "prefix" in row else (1, len(sk))
    k = max(range(lo, hi), key=lambda i: sk[i]) if hi > lo else 1
    return f"Sink_{k + 1} {sk[k]:.1f}"


def per_layer(rec: dict) -> str:
    """Sink_1 per layer, first to last (and Sink_1* per layer of each slot), from the record's final checks."""
    f = rec["final"]
    if "sink_1_per_layer" not in f:
        return "-"
    out = "Sink_1 " + " / ".join(f"{v:.0f}" for v in f["sink_1_per_layer"])
    for j, slot in enumerate(f.get("sink_extra_per_layer") or []):
        out += f"; Sink_1*{'' if j == 0 else j + 1} " + " / ".join(f"{v:.0f}" for v in slot)
    return out


def emerges(rec: dict) -> str:
    c = rec["curve"]
    keys = ["sink_1"] + sorted(k for k in c if k.startswith("sink_extra_"))
    best = []
    for key in keys:
        s = emergence_step(c["step"], c[key], EMERGE_AT)
        if s is not None:
            best.append((s, key))
    if not best:
        return "never"
    s, key = min(best)
    return f"{s}" + ("" if key == "sink_1" else " (slot)")


def hardware_cell(rec: dict) -> str:
    hw = rec["hardware"]
    if hw["device"] == "cpu":
        cell = f"CPU {hw.get('cpu_cores')} cores, {hw.get('torch_threads', 'all')} thread(s)"
        load = hw.get("load_avg_1m_at_end")
        if load is not None and hw.get("cpu_cores") and load > hw["cpu_cores"]:
            cell += f", shared (load {load:.0f})"
        return cell
    return hw["device"]


def run_command(rec: dict) -> str:
    over = "".join(f" --set {o}" for o in rec["overrides"])
    return f"`python scripts/repro_run.py --regime {rec['regime']} {rec['row']}{over}`"


# ---------------------------------------------------------------------------- tables
SECTION_COLUMNS = ("row", "what", "Sink_1 (%)", "other", "per layer", "val loss", "tokens", "steps", "sink from step",
                   "hardware",
                   "paper", "expected", "agrees", "command")
MAP_COLUMNS = ("row", "lever", "Sink_1 (%)", "max Sink_1 (%)", "sink from step", "tokens then", "val loss", "tokens",
               "train s", "hardware", "paper", "agrees", "command")


def cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def emergence_tokens(rec: dict) -> str:
    s = emerges(rec)
    if s == "never":
        return "-"
    step = int(s.split()[0])
    c = rec["curve"]
    return fmt_tokens(c["tokens"][c["step"].index(step)])


def row_cells(rid: str, row: dict, rec: dict, default: Optional[dict], columns: Sequence[str]) -> List[str]:
    f = rec["final"]
    values = {
        "row": rid, "what": row["what"], "lever": row["what"], "Sink_1 (%)": fmt_pct(f["sink"][0]),
        "max Sink_1 (%)": fmt_pct(max(v for v in rec["curve"]["sink_1"] if v is not None)),
        "other": other_sinks(rec, row), "per layer": per_layer(rec), "val loss": fmt_loss(f["val_loss"]),
        "tokens": fmt_tokens(rec["tokens"]),
        "steps": str(rec["steps"]), "sink from step": emerges(rec), "tokens then": emergence_tokens(rec),
        "train s": f"{rec['train_seconds']:.0f}", "hardware": hardware_cell(rec), "paper": row["paper"],
        "expected": EXPECT[row["expect"]][0].format(**row) if row.get("expect") else "-",
        "agrees": agreement(rec, default, row),
        "command": run_command(rec),
    }
    return [cell(values[c]) for c in columns]


def section_table(section: str, regime: str, spec: dict, records: Dict[Tuple[str, str], dict]) -> str:
    default = records.get((regime, "default"))
    columns = MAP_COLUMNS if section == "emergence_map" else SECTION_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    not_run = []
    for rid, row in spec["rows"].items():
        if section not in row["sections"] or regime not in row.get("regimes", REGIMES):
            continue
        rec = records.get((regime, rid))
        if rec is None:
            not_run.append(rid)
            continue
        lines.append("| " + " | ".join(row_cells(rid, row, rec, baseline_record(row, regime, records), columns))
                     + " |")
    if len(lines) == 2:
        return f"No {regime.upper()} run of this section has been recorded yet."
    out = "\n".join(lines)
    out += (f"\n\nD = Sink_1 of the default row of the same regime (of the row's `baseline` where it names one: a "
            f"seed twin against the default of that seed). Sink_1: % of heads (all layers) whose mean attention "
            f"on token 1 exceeds ε = 0.3 over the probe ({describe_probe(default)}); operations without normalisation "
            f"use the paper's proxy \\|sim\\| / Σ\\|sim\\|. Sink_1*: the same for the extra key slot. "
            f"\"sink from step\": "
            f"the first evaluation after which Sink_1 (or Sink_1*) stays ≥ {EMERGE_AT:g}%. Raw records: "
            f"`docs/results/repro/{regime}/<row>.json`.")
    if not_run:
        out += f" Not run yet in this regime: {', '.join(not_run)}."
    if section != "emergence_map":
        out += seed_table(section, regime, spec, records)
    notes = [f"- `{rid}`: {render_note(row['note'][regime], regime, spec, records)}"
             for rid, row in spec["rows"].items()
             if section in row["sections"] and (regime, rid) in records and regime in (row.get("note") or {})]
    if notes:
        out += "\n\nWhat we checked where a row disagrees or needs reading:\n\n" + "\n".join(notes)
    return out


def seed_runs(rid: str, regime: str, spec: dict, records: Dict[Tuple[str, str], dict]
              ) -> List[Tuple[int, str, dict, Optional[dict], str]]:
    """Row ``rid`` and its recorded seed twins in ``regime``: (seed, row id, record, the record it is judged against,
    agreement), the row's own run first."""
    out = []
    for m in [rid] + twins(rid, spec):
        if (regime, m) in records:
            rec, base = records[(regime, m)], baseline_record(spec["rows"][m], regime, records)
            out.append((int(rec["seed"]), m, rec, base, agreement(rec, base, spec["rows"][m])))
    return out


def contrasts(regime: str, spec: dict, records: Dict[Tuple[str, str], dict], section: Optional[str] = None
              ) -> Dict[str, List[Tuple[int, str, dict, Optional[dict], str]]]:
    """Every recorded row with a paper rule in ``regime`` (of ``section``, or of any), not the default nor a twin:
    row -> :func:`seed_runs`."""
    return {rid: seed_runs(rid, regime, spec, records) for rid, row in spec["rows"].items()
            if twin_of(rid) is None and row.get("expect") and rid != "default" and (regime, rid) in records
            and regime in row.get("regimes", REGIMES) and (section is None or section in row["sections"])}


def seed_table(section: str, regime: str, spec: dict, records: Dict[Tuple[str, str], dict]) -> str:
    """One line per contrast run with several seeds: its sink per seed next to that seed's default, and the rule."""
    groups = [(rid, runs) for rid, runs in contrasts(regime, spec, records, section).items() if len(runs) > 1]
    if not groups:
        return ""
    lines = ["| contrast | expected | seeds | per seed: contrast (default of that seed) | agrees |",
             "|---|---|---|---|---|"]
    for rid, runs in groups:
        row = spec["rows"][rid]
        per = []
        for seed, _m, rec, base, ok in runs:
            slot = [v for v in rec["final"]["sink_extra"] if v is not None]
            val = f"Sink_1* {max(slot):.1f}, Sink_1 {rec['final']['sink'][0]:.1f}" if slot else \
                  (other_sinks(rec, row) if "position" in row else f"{rec['final']['sink'][0]:.1f}")
            dflt = "-" if base is None else f"{base['final']['sink'][0]:.1f}"
            per.append(f"seed {seed}: {val} ({dflt}) {'yes' if ok == 'yes' else 'no'}")
        n_yes = sum(ok == "yes" for *_, ok in runs)
        lines.append("| " + " | ".join(cell(c) for c in (
            rid, EXPECT[row["expect"]][0].format(**row), str(len(runs)), "; ".join(per),
            f"{n_yes} of {len(runs)} seeds")) + " |")
    return ("\n\nAcross seeds (each run judged against the default of its own seed, D = that default's Sink_1; "
            "per seed: Sink_1 (%) of the contrast, the default's in brackets, and whether the rule holds):\n\n"
            + "\n".join(lines))


NOTE_FIELD = re.compile(r"\{(sink|slot|max|maxslot|val|from|xD|layers|sink@\d+):([^{}:]+)\}")


def render_note(text: str, regime: str, spec: dict, records: Dict[Tuple[str, str], dict]) -> str:
    """A registry note with its numbers filled from the records of ``regime`` (a note quotes no measured number by
    hand): ``{sink:R}`` final Sink_1 of row R, ``{sink@k:R}`` Sink_k, ``{slot:R}`` Sink_1*, ``{max:R}`` /
    ``{maxslot:R}`` the curve's maximum, ``{val:R}`` validation loss, ``{from:R}`` the emergence step,
    ``{xD:R}`` Sink_1 over its default's (the row's baseline), ``{layers:R}`` Sink_1 per layer."""
    def fill(m: "re.Match[str]") -> str:
        what, rid = m[1], m[2]
        rec = records.get((regime, rid))
        if rec is None:
            raise ValueError(f"note field {m[0]!r}: row={rid!r} has no {regime} record")
        f, c = rec["final"], rec["curve"]
        if what == "sink":
            return f"{f['sink'][0]:.1f}%"
        if what.startswith("sink@"):
            return f"{f['sink'][int(what[5:]) - 1]:.1f}%"
        if what in ("slot", "maxslot"):
            if not f["sink_extra"]:
                raise ValueError(f"note field {m[0]!r}: row={rid!r} has no extra slot")
            return f"{f['sink_extra'][0]:.1f}%" if what == "slot" else \
                f"{max(v for v in c['sink_extra_0'] if v is not None):.1f}%"
        if what == "max":
            return f"{max(v for v in c['sink_1'] if v is not None):.1f}%"
        if what == "val":
            return fmt_loss(f["val_loss"])
        if what == "from":
            return emerges(rec)
        if what == "layers":
            return per_layer(rec)
        base = baseline_record(spec["rows"].get(rid, {}), regime, records)
        if base is None or not base["final"]["sink"][0]:
            raise ValueError(f"note field {m[0]!r}: row={rid!r} has no default with a sink to compare with")
        return f"{f['sink'][0] / base['final']['sink'][0]:.2f} D"
    return NOTE_FIELD.sub(fill, text)


def describe_probe(rec: Optional[dict]) -> str:
    if rec is None:
        return "the run's probe"
    p = rec["probe"]
    return f"{p.get('n')} sequences of T = {p.get('T')} tokens, {p.get('where')}"


def splice(text: str, section: str, regime: str, body: str, heading: str = "") -> str:
    """The region ``<!-- repro:<section>:<regime>:begin/end -->`` of ``text`` filled with ``body``
    (:func:`lit_gpt.doc_tables.splice_region`, the one mechanism for rendered regions)."""
    return splice_region(text, "repro", f"{section}:{regime}", body, heading)


EXPLORATION_MD = Path("docs") / "repro.md"
HEADLINE_MDS = (Path("docs") / "repro.md", Path("README.md"))


def fmt_seconds(x: float) -> str:
    return f"{int(x) // 60} min {int(x) % 60:02d} s"


def seed_finals(records: Dict[Tuple[str, str], dict], exploration: Optional[dict]) -> Dict[int, float]:
    """Final Sink_1 of the CPU default per seed: the default row, the seedN rows, and the exploration's seedN runs
    (the default config with train.seed = data.seed = N)."""
    out: Dict[int, float] = {}
    for (regime, row), rec in records.items():
        if regime == "cpu" and (row == "default" or (row.startswith("seed") and row[4:].isdigit())):
            out[int(rec["seed"])] = rec["final"]["sink"][0]
    for r in (exploration or {}).get("runs", []):
        if r["name"].startswith("seed") and r["name"][4:].isdigit() and r["ended"] == "finished":
            out.setdefault(int(r["settings"]["seed"]), r["sink_1_last"])
    return out


def headline(records: Dict[Tuple[str, str], dict], demo: Optional[dict],
             exploration: Optional[dict] = None) -> Optional[str]:
    """A few sentences with the CPU regime's main numbers (default, sigmoid without normalisation, k*, the demo)."""
    d = records.get(("cpu", "default"))
    if d is None:
        return None
    f = d["final"]
    first = emerges(d)
    out = [f"Measured (`docs/results/repro/cpu/`): the default reaches **Sink_1 = {f['sink'][0]:.1f}%** after "
           f"{d['steps']:,} steps ({fmt_tokens(d['tokens'])} tokens, validation loss {fmt_loss(f['val_loss'])} "
           f"nats/byte)" + ("" if first == "never" else
                           f"; Sink_1 stays at or above {EMERGE_AT:g}% from step {first} on "
                           f"({emergence_tokens(d)} tokens)") + "."]
    per_layer = f.get("sink_1_per_layer")
    if per_layer:
        out.append("Sink_1 per layer (first to last): " + ", ".join(f"{v:.1f}%" for v in per_layer) + ".")
    finals = seed_finals(records, exploration)
    if len(finals) > 1:
        formed = [s for s, v in finals.items() if v >= EMERGE_AT]
        out.append(f"**But the same config forms a sink (final Sink_1 >= {EMERGE_AT:g}%) in {len(formed)} of the "
                   f"{len(finals)} seeds tried (seeds {', '.join(map(str, sorted(finals)))}; formed: "
                   f"{', '.join(map(str, sorted(formed))) or 'none'}): in this regime the sink is a property of one "
                   "trajectory, not yet of the recipe (docs/repro.md).**")
    s = records.get(("cpu", "sigmoid_no_norm"))
    if s is not None:
        out.append(f"Sigmoid attention without normalisation: Sink_1 = {s['final']['sink'][0]:.1f}% (proxy scores), "
                   f"validation loss {fmt_loss(s['final']['val_loss'])}.")
    k = records.get(("cpu", "k_bias"))
    if k is not None and k["final"]["sink_extra"]:
        slots = {int(k["seed"]): k["final"]["sink_extra"][0]}
        for r in (exploration or {}).get("runs", []):
            if r["name"].startswith("kbias_seed") and r["ended"] == "finished":
                last = [v for v in r["curve"]["sink_extra_0"] if v is not None][-1]
                slots.setdefault(int(r["settings"]["seed"]), last)
        taken = [sd for sd, v in slots.items() if v >= EMERGE_AT]
        out.append(f"With a learned key slot k* (value 0): Sink_1 = {k['final']['sink'][0]:.1f}%, "
                   f"Sink_1* = {k['final']['sink_extra'][0]:.1f}%; the slot takes a sink "
                   f"(Sink_1* >= {EMERGE_AT:g}%) in "
                   f"{len(taken)} of the {len(slots)} seeds tried (final Sink_1* "
                   + ", ".join(f"{slots[sd]:.1f}%" for sd in sorted(slots)) + ").")
    if demo is not None:
        out.append(demo_sentence(demo))
    return " ".join(out)


def demo_regime(demo: Optional[dict]) -> Optional[str]:
    """The regime a demo record ran (records before the field was written ran the cpu regime)."""
    return None if demo is None else demo.get("regime", "cpu")


def demo_sentence(demo: dict) -> str:
    env = demo.get("environment", {})
    return (f"`{demo['command']}` took {fmt_seconds(demo['wall_seconds'])} of wall time (corpus included) on "
            f"{env.get('cpu_count')} CPU cores ({env.get('cpu')})"
            + (f" shared with other jobs (1-minute load {env['load_average_1min']:.0f} at the end)"
               if env.get("load_average_1min", 0) > (env.get("cpu_count") or 1) else "") + ".")


def regime_headline(regime: str, spec: dict, records: Dict[Tuple[str, str], dict]) -> Optional[str]:
    """A few sentences on a regime's records: the default's seeds, then which contrast rows agree with the paper."""
    mine = {row: rec for (g, row), rec in records.items() if g == regime}
    d = mine.get("default")
    if d is None:
        return None
    seeds = {row: rec for row, rec in mine.items() if row == "default" or (twin_of(row) or ("",))[0] == "default"}
    formed = [r for r, rec in seeds.items() if rec["final"]["sink"][0] >= EMERGE_AT]
    per_seed = "; ".join(f"seed {rec['seed']}: Sink_1 {rec['final']['sink'][0]:.1f}% (sink from step {emerges(rec)})"
                         for _, rec in sorted(seeds.items(), key=lambda kv: kv[1]["seed"]))
    hw = sorted({hardware_cell(rec) for rec in mine.values()})
    steps = [rec["steps"] for rec in mine.values()]
    out = [f"Measured (`docs/results/repro/{regime}/`, {len(mine)} records, {', '.join(hw)}): the default forms a sink "
           f"(final Sink_1 >= {EMERGE_AT:g}%) in {len(formed)} of the {len(seeds)} seeds run ({per_seed}), at "
           f"{fmt_tokens(d['tokens'])} tokens ({d['steps']:,} steps, {d['train_seconds']:.0f} s of training); rows ran "
           f"{min(steps):,}-{max(steps):,} steps."]
    judged = {rid: [ok for *_, ok in runs] for rid, runs in contrasts(regime, spec, records).items()}
    if judged:
        def named(rids):
            return ", ".join(f"{r} ({v.count('yes')}/{len(v)})" if len(v) > 1 else r for r, v in rids) or "none"
        every = [(r, v) for r, v in judged.items() if all(x == "yes" for x in v)]
        some = [(r, v) for r, v in judged.items() if "yes" in v and not all(x == "yes" for x in v)]
        none = [(r, v) for r, v in judged.items() if "yes" not in v]
        runs = sum(len(v) for v in judged.values())
        out.append(f"Of the {len(judged)} contrasts with a paper expectation ({runs} runs, "
                   f"{sum(len(v) > 1 for v in judged.values())} of them with several seeds, each run judged against "
                   f"the default of its own seed), {len(every)} agree in every seed run ({named(every)}), "
                   f"{len(some)} in some seeds ({named(some)}) and {len(none)} in none ({named(none)}); the section "
                   "tables in `scripts/*.md` give each run with the paper's number, a table across seeds, and the "
                   "notes under them what was checked.")
    w = mine.get("wide")
    if w is not None:
        out.append(f"The larger model (`wide`: {spec['rows'].get('wide', {}).get('what', 'wide')}) reaches Sink_1 = "
                   f"{w['final']['sink'][0]:.1f}% after {fmt_tokens(w['tokens'])} tokens (sink from step {emerges(w)})"
                   + (f", per layer {per_layer(w)}" if "sink_1_per_layer" in w["final"] else "") + ".")
    checked = [r for r, rec in mine.items() if "sink_1_per_layer" in rec["final"]]
    if len(checked) < len(mine):
        out.append(f"{len(checked) or 'None'} of the {len(mine)} records carry per-layer checks (measured on the "
                   "device on the run's last checkpoint, `train.save_final=true`; the others kept none), so what was "
                   "checked for those without is their curve: Sink_1..Sink_10 and the losses at every evaluation.")
    return " ".join(out)


DEMO_DATA = "datasets/demo_cpu/packed:"     # the docstring corpus: the data of the runs that name none


def exploration_table(doc: dict) -> str:
    cols = ("run", "layers x heads x width", "context", "first token fixed", "lr", "weight decay", "tokens/step",
            "seed", "other", "steps reached", "max Sink_1 (%)", "last Sink_1 (%)", "max Sink_1* (%)", "how it ended")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in doc["runs"]:
        st = r["settings"]
        other = ", ".join(x for x in (st["pos_encoding"] if st["pos_encoding"] != "rope" else "",
                                      f"kv_bias {st['kv_bias']}" if st["kv_bias"] != "none" else "",
                                      "linear biases" if st.get("bias") else "",
                                      f"data {st['data']}" if not st.get("data", DEMO_DATA).startswith(DEMO_DATA)
                                      else "")
                          if x) or "-"
        extra = [v for v in r["curve"].get("sink_extra_0", []) if v is not None]
        cells = [r["name"], f"{st['n_layer']} x {st['n_head']} x {st['n_embd']}", str(st["block_size"]),
                 "yes" if st["first_token_fixed"] else "no", f"{st['lr']:g}", f"{st['weight_decay']:g}",
                 str(st["tokens_per_step"]), str(st.get("seed", "-")), other, str(r["steps"]),
                 fmt_pct(r["sink_1_max"]), fmt_pct(r["sink_1_last"]),
                 fmt_pct(max(extra)) if extra else "-", r["ended"]]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + (f"\n\nHow: {doc['how']}. Machine: {doc['machine']}. "
                               "Raw: `docs/results/repro/exploration.json`.")


def render(spec: dict, records: Dict[Tuple[str, str], dict], root: Path = REPO,
           exploration: Optional[dict] = None, demo: Optional[dict] = None) -> Dict[Path, str]:
    """markdown file (under ``root``) -> its new text, the tables spliced in."""
    out: Dict[Path, str] = {}
    spec = with_twins(spec, records)
    head = headline(records, demo if demo_regime(demo) == "cpu" else None, exploration)
    if head is not None:
        for rel in HEADLINE_MDS:
            path = root / rel
            if path.is_file() and region_markers("repro", "headline:cpu")[0] in path.read_text():
                out[path] = splice(out.get(path, path.read_text()), "headline", "cpu", head)
    for regime in REGIMES:
        gh = regime_headline(regime, spec, records) if regime != "cpu" else None
        if gh is not None and demo_regime(demo) == regime:
            gh += " " + demo_sentence(demo)
        for rel in HEADLINE_MDS:
            path = root / rel
            if gh is not None and path.is_file() and \
                    region_markers("repro", f"headline:{regime}")[0] in out.get(path, path.read_text()):
                out[path] = splice(out.get(path, path.read_text()), "headline", regime, gh)
    if exploration is not None:
        path = root / EXPLORATION_MD
        text = out.get(path, path.read_text() if path.is_file() else "# Reproduction regimes\n")
        out[path] = splice(text, "exploration", "cpu", exploration_table(exploration),
                           "## How the CPU regime was found: every exploratory run")
    for section, sec in spec["sections"].items():
        path = root / sec["md"]
        text = out.get(path, path.read_text() if path.is_file() else f"# {sec['title']}\n")
        for regime in REGIMES:
            if not any(k[0] == regime for k in records):
                continue
            body = section_table(section, regime, spec, records)
            heading = f"## Measured with this code: {regime.upper()} regime (issue #10)"
            img = root / IMG_DIR / f"repro_{regime}_{section}.png"
            if any((regime, r) in records for r, row in spec["rows"].items() if section in row["sections"]):
                body += f"\n\n![{section} ({regime})]({os.path.relpath(img, path.parent)})"
            text = splice(text, section, regime, body, heading)
        out[path] = text
    return out


def plots(spec: dict, records: Dict[Tuple[str, str], dict], root: Path = REPO) -> List[Path]:
    from lit_gpt.training_curves import curve_series, plot_compare

    written = []
    for section in spec["sections"]:
        for regime in REGIMES:
            # a contrast's seed twins stay out of the plots (the table across seeds has them): one line per contrast
            runs = [(rid, curve_series(records[(regime, rid)]["curve"])) for rid, row in spec["rows"].items()
                    if section in row["sections"] and (regime, rid) in records
                    and (twin_of(rid) is None or twin_of(rid)[0] == "default")]
            if runs:
                written.append(plot_compare(runs, root / IMG_DIR / f"repro_{regime}_{section}.png",
                                            title=f"{section}, {regime.upper()} regime"))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare the tables with the records; write nothing")
    ap.add_argument("--rows", default=str(ROWS), help="the row registry (YAML)")
    ap.add_argument("--results", default=str(RESULTS), help="records: <results>/<regime>/<row>.json")
    ap.add_argument("--root", default=str(REPO), help="the markdown paths of the registry are relative to this")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    root = Path(a.root)
    records = load_records(a.results)
    spec = with_twins(load_rows(Path(a.rows)), records)
    expl, demo = Path(a.results) / "exploration.json", Path(a.results) / "demo_cpu.json"
    texts = render(spec, records, root, json.loads(expl.read_text()) if expl.is_file() else None,
                   json.loads(demo.read_text()) if demo.is_file() else None)
    differ = update_files(texts, a.check, root)
    if a.check:
        if differ:
            print(f"tables out of date in {differ} file(s) (run python scripts/repro_tables.py)", file=sys.stderr)
            return 1
        print(f"tables up to date ({len(records)} records)")
        return 0
    if not a.no_plots:
        for p in plots(spec, records, root):
            print(f"wrote {p.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
