"""The reproduction study's plumbing (issue #10): scripts/repro_run.py trains rows and writes records that hold
what the run logged; scripts/repro_tables.py renders tables whose numbers and verdicts follow from the records;
the committed tables are what the committed records give."""
from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import REPO, make_packed, tiny_run, write_yaml  # noqa: E402

from lit_gpt.repro import (RecordError, check_record, emergence_step, load_records, read_curve,  # noqa: E402
                           write_record)

sys.path.insert(0, str(REPO / "scripts"))
import repro_tables  # noqa: E402


def test_emergence_step_is_the_start_of_the_last_run_above_threshold():
    steps = [0, 50, 100, 150, 200, 250]
    assert emergence_step(steps, [0, 6, 2, 7, 9, 8], 5.0) == 150       # a flicker at 50 does not count
    assert emergence_step(steps, [0, 1, 2, 3, 4, 4.9], 5.0) is None
    assert emergence_step(steps, [5, 5, 5, 5, 5, 5], 5.0) == 0
    assert emergence_step(steps, [0, 9, 9, None, 9, 9], 5.0) == 50      # missing values do not break a run
    assert emergence_step(steps, [0, 9, 9, 9, 9, 1], 5.0) is None       # gone by the end


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two tiny rows (softmax default and a k* slot) trained and recorded by scripts/repro_run.py."""
    tmp = tmp_path_factory.mktemp("repro")
    data = make_packed(tmp, block_size=32)
    base = tiny_run(data, tmp / "unused", max_steps=6, sink_interval=2, eval_interval=3, save_interval=0)
    del base["train"]["out_dir"]
    conf = tmp / "configs" / "t"
    write_yaml(conf / "default.yaml", base)
    write_yaml(conf / "k_bias.yaml", {"base": "default.yaml", "model": {"kv_bias": "k", "kv_bias_shared": True}})
    write_yaml(conf / "window.yaml", {"base": "default.yaml", "model": {"attn_mask": "window", "window_size": 8}})
    write_yaml(conf / "fixed.yaml", {"base": "default.yaml", "data": {"fixed_token": {"position": 0, "token_id": 1}}})
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "repro_run.py"), "--regime", "t", "--all",
                          "--configs", str(tmp / "configs"), "--runs", str(tmp / "runs"),
                          "--results", str(tmp / "results"), "--set", "train.warmup_steps=1", "--note", "test"],
                         cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp


def test_records_hold_what_the_runs_logged(recorded):
    recs = load_records(recorded / "results")
    assert sorted(recs) == [("t", "default"), ("t", "fixed"), ("t", "k_bias"), ("t", "window")]
    for (_, row), rec in recs.items():
        check_record(rec)
        run = recorded / "runs" / "t" / row
        with open(run / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["sink_1"]]
        assert rec["curve"]["step"] == [int(r["step"]) for r in rows] == [0, 2, 4, 6]
        assert rec["curve"]["sink_1"] == [float(r["sink_1"]) for r in rows]
        assert rec["final"]["sink"][0] == float(rows[-1]["sink_1"])
        assert len(rec["final"]["sink"]) == 4                              # probe.k_max of the tiny run
        assert rec["steps"] == 6 and rec["tokens"] == 6 * 4 * 32             # steps x global batch x block
        assert rec["curve"]["tokens"] == [s * 4 * 32 for s in rec["curve"]["step"]]
        assert rec["overrides"] == ["train.warmup_steps=1"] and rec["hardware"]["note"] == "test"
        assert f"t/{row}.yaml" in rec["command"] and "pretrain.py" in rec["command"]
        summary = json.loads((run / "summary.json").read_text())
        assert rec["final"]["val_loss"] == pytest.approx(summary["final"]["val_loss"])
        # the trainer's summary says what ran and where, so a folder fetched from a GPU box can be recorded
        assert summary["run_config"]["model"]["name"] == "tiny" and summary["run_config"]["train"]["max_steps"] == 6
        assert summary["environment"]["torch"] and summary["environment"]["cpu_count"] >= 1
        assert rec["hardware"]["cpu_cores"] == summary["environment"]["cpu_count"]
        assert len(rec["final"]["sink_1_per_layer"]) == 2                   # final/ checked: one value per layer
        # the final/ check probes as the trainer does (a fixed token in place): same heads per layer, so the
        # mean over layers is the curve's last Sink_1 (before, the fixed-token run's check probed without it)
        per_layer = rec["final"]["sink_1_per_layer"]
        assert sum(per_layer) / len(per_layer) == pytest.approx(rows[-1] and float(rows[-1]["sink_1"]), abs=1e-6)
    assert recs[("t", "default")]["final"]["sink_extra"] == []
    extra = recs[("t", "k_bias")]["final"]["sink_extra"]
    assert len(extra) == 1 and 0.0 <= extra[0] <= 100.0
    assert len(recs[("t", "k_bias")]["final"]["sink_extra_per_layer"][0]) == 2
    assert 0.0 <= recs[("t", "window")]["final"]["sink_window_start"] <= 100.0
    assert "sink_window_start" not in recs[("t", "default")]["final"]


def test_a_record_that_breaks_the_schema_is_refused(recorded, tmp_path):
    rec = json.loads((recorded / "results" / "t" / "default.json").read_text())
    bad = copy.deepcopy(rec)
    bad["curve"]["sink_1"].pop()
    with pytest.raises(RecordError, match="differ in length"):
        check_record(bad)
    bad = dict(rec, schema="other/0")
    with pytest.raises(RecordError, match="schema"):
        check_record(bad)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "renamed.json").write_text(json.dumps(rec))
    with pytest.raises(RecordError, match="file name must match"):
        load_records(tmp_path)
    with pytest.raises(RecordError, match="did not finish"):
        from lit_gpt.repro import build_record
        build_record(tmp_path, row="x", regime="t", config="c", command="c")


def test_exploratory_runs_are_appended_to_the_log_and_never_replaced(recorded, tmp_path):
    log = tmp_path / "exploration.json"
    log.write_text(json.dumps({"schema": "asl-repro-exploration/1", "machine": "m", "how": "h", "runs": []}))
    runs = recorded / "runs" / "t"
    cli = [sys.executable, str(REPO / "scripts" / "repro_run.py"), "--results", str(tmp_path), "--explore"]
    out = subprocess.run(cli + [str(runs / "default"), str(runs / "k_bias")], cwd=str(REPO), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(log.read_text())
    assert [r["name"] for r in doc["runs"]] == ["default", "k_bias"]
    for r in doc["runs"]:
        with open(runs / r["name"] / "metrics.csv") as f:
            rows = [x for x in csv.DictReader(f) if x["sink_1"]]
        s1 = [float(x["sink_1"]) for x in rows]
        assert r["curve"]["step"] == [int(x["step"]) for x in rows] and r["curve"]["sink_1"] == s1
        assert r["sink_1_last"] == s1[-1] and r["sink_1_max"] == max(s1) and r["ended"] == "finished"
        rc = yaml.safe_load((runs / r["name"] / "run_config.yaml").read_text())
        assert r["settings"]["seed"] == rc["train"]["seed"] and r["settings"]["data_seed"] == rc["data"]["seed"]
        assert r["settings"]["data"] == f"{rc['data']['train_dir']}: {', '.join(sorted(rc['data']['train']))}"
    assert doc["runs"][1]["settings"]["kv_bias"] == "k" and "sink_extra_0" in doc["runs"][1]["curve"]
    before = log.read_text()
    again = subprocess.run(cli + [str(runs / "window"), str(runs / "default")], cwd=str(REPO), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "already in the exploration log" in again.stderr
    assert log.read_text() == before                                  # nothing half-added
    table = repro_tables.exploration_table(doc)
    assert "| default | 2 x " in table and f"data {doc['runs'][0]['settings']['data']}" in table


def _with_final(rec, row, sink1, extra=None, sinks=None):
    r = copy.deepcopy(rec)
    r["row"] = row
    r["final"]["sink"] = list(sinks) if sinks else [sink1] + [0.0] * 9
    r["final"]["sink_extra"] = list(extra or [])
    return r


def test_verdicts_follow_the_rules():
    base = json.loads(json.dumps({"final": {"sink": [0.0] * 10, "sink_extra": []}}))
    D = 20.0
    default = _with_final(base, "default", D)
    cases = [
        ({"expect": "sink"}, _with_final(base, "x", 5.0), "yes"),
        ({"expect": "sink"}, _with_final(base, "x", 4.9), "**no**"),
        ({"expect": "no_sink"}, _with_final(base, "x", 2.0), "yes"),            # <= max(1, 0.1 D) = 2
        ({"expect": "no_sink"}, _with_final(base, "x", 2.1), "**no**"),
        ({"expect": "lower"}, _with_final(base, "x", 15.0), "yes"),
        ({"expect": "lower"}, _with_final(base, "x", 15.1), "**no**"),
        ({"expect": "higher"}, _with_final(base, "x", 25.0), "yes"),
        ({"expect": "higher"}, _with_final(base, "x", 24.9), "**no**"),
        ({"expect": "similar"}, _with_final(base, "x", 40.0), "yes"),
        ({"expect": "similar"}, _with_final(base, "x", 9.9), "**no**"),
        ({"expect": "slot"}, _with_final(base, "x", 0.5, extra=[10.0]), "yes"),
        ({"expect": "slot"}, _with_final(base, "x", 3.0, extra=[60.0]), "**no**"),   # the first token keeps it
        ({"expect": "slot"}, _with_final(base, "x", 0.0, extra=[9.0]), "**no**"),
        ({"expect": "in_prefix", "prefix": 5}, _with_final(base, "x", 0, sinks=[0, 0, 12, 0, 0, 0, 0, 0, 0, 0]), "yes"),
        ({"expect": "in_prefix", "prefix": 5}, _with_final(base, "x", 0, sinks=[0, 0, 12, 0, 0, 3, 0, 0, 0, 0]),
         "**no**"),
        # the fixed token at the third position: Sink_3 >= 0.5 D = 10 and Sink_1 <= max(1, 0.1 D) = 2
        ({"expect": "at_position", "position": 3}, _with_final(base, "x", 0, sinks=[2, 0, 10, 0, 0, 0, 0, 0, 0, 0]),
         "yes"),
        ({"expect": "at_position", "position": 3}, _with_final(base, "x", 0, sinks=[0, 0, 9.9, 0, 0, 0, 0, 0, 0, 0]),
         "**no**"),
        ({"expect": "at_position", "position": 3}, _with_final(base, "x", 0, sinks=[2.1, 0, 60, 0, 0, 0, 0, 0, 0, 0]),
         "**no**"),                                                                       # token 1 keeps a sink
        ({"expect": "at_position", "position": 2}, _with_final(base, "x", 0, sinks=[0, 0, 60, 0, 0, 0, 0, 0, 0, 0]),
         "**no**"),                                                                       # the sink is elsewhere
        # position 12 is not measured
        ({"expect": "at_position", "position": 12}, _with_final(base, "x", 0, sinks=[0] * 10), "**no**"),
    ]
    for row, rec, want in cases:
        assert repro_tables.agreement(rec, default, row) == want, (row, rec["final"])
    assert repro_tables.agreement(cases[0][1], None, {"expect": "sink"}).startswith("no default")


def test_a_row_whose_rule_needs_a_field_is_refused_without_it(tmp_path):
    spec = {"sections": {"d": {"md": "d.md", "title": "D"}},
            "rows": {"fixed": {"sections": ["d"], "what": "w", "paper": "p", "expect": "at_position"}}}
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="position=None is invalid"):
        repro_tables.load_rows(path)
    spec["rows"]["fixed"]["position"] = 3
    path.write_text(yaml.safe_dump(spec))
    assert repro_tables.load_rows(path)["rows"]["fixed"]["position"] == 3


def test_the_registry_rows_name_their_fields():
    spec = repro_tables.load_rows()
    fixed = spec["rows"]["fixed_pos2"]
    assert fixed["expect"] == "at_position" and fixed["position"] == 3          # 0-indexed position 2 = Sink_3
    cfg = yaml.safe_load((REPO / "configs" / "repro" / "gpu" / "fixed_pos2.yaml").read_text())
    assert cfg["data"]["fixed_token"]["position"] + 1 == fixed["position"]
    rec = {"final": {"sink": [0.5, 0.0, 33.0, 0.1], "sink_extra": []}}
    assert repro_tables.other_sinks(rec, fixed) == "Sink_3 33.0"


def test_tables_are_rendered_from_records_and_checked(recorded, tmp_path):
    results = tmp_path / "results"
    recs = load_records(recorded / "results")
    for key in [("t", "default"), ("t", "k_bias")]:
        write_record(recs[key], results)
    spec = {"sections": {"arch": {"md": "docs/arch.md", "title": "Arch"}},
            "rows": {"default": {"sections": ["arch"], "what": "d", "paper": "P1", "expect": "sink"},
                     "k_bias": {"sections": ["arch"], "what": "k", "paper": "P2", "expect": "slot"},
                     "nope": {"sections": ["arch"], "what": "n", "paper": "P3", "expect": "similar"}}}
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump(spec))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "arch.md").write_text("# Arch\n\nhand-written text stays.\n")
    # the registry uses regimes cpu/gpu: put the tiny records under cpu
    cpu = tmp_path / "cpu_results"
    for key in [("t", "default"), ("t", "k_bias")]:
        write_record(dict(recs[key], regime="cpu"), cpu)
    args = ["--rows", str(rows), "--results", str(cpu), "--root", str(tmp_path)]
    assert repro_tables.main(args + ["--check"]) == 1                       # the table is not there yet
    assert repro_tables.main(args) == 0
    text = (tmp_path / "docs" / "arch.md").read_text()
    assert "hand-written text stays." in text
    table = text[text.index("<!-- repro:arch:cpu:begin -->"):text.index("<!-- repro:arch:cpu:end -->")]
    d, k = recs[("t", "default")], recs[("t", "k_bias")]
    assert f"| default | d | {d['final']['sink'][0]:.1f} |" in table
    assert f"| k_bias | k | {k['final']['sink'][0]:.1f} | Sink_1* {k['final']['sink_extra'][0]:.1f} |" in table
    assert "Not run yet in this regime: nope." in table
    assert (tmp_path / "docs" / "img" / "repro_cpu_arch.png").stat().st_size > 1000
    assert repro_tables.main(args + ["--check"]) == 0
    assert repro_tables.main(args) == 0 and (tmp_path / "docs" / "arch.md").read_text() == text   # idempotent
    changed = json.loads((cpu / "cpu" / "default.json").read_text())
    changed["final"]["sink"][0] += 1.0
    (cpu / "cpu" / "default.json").write_text(json.dumps(changed))
    assert repro_tables.main(args + ["--check"]) == 1


def test_committed_tables_match_the_committed_records():
    assert repro_tables.main(["--check"]) == 0


def test_side_by_side_plot_from_csv_files(recorded, tmp_path):
    from lit_gpt.training_curves import main as curves_main

    runs = recorded / "runs" / "t"
    out = tmp_path / "both.png"
    assert curves_main([str(runs / "default" / "metrics.csv"), str(runs / "k_bias" / "metrics.csv"),
                        "--labels", "softmax", "k*", "--out", str(out), "--x", "tokens"]) == 0
    assert out.stat().st_size > 1000
    assert read_curve(runs / "k_bias" / "metrics.csv")["sink_extra_0"]


def test_window_start_scores_match_a_hand_loop():
    import torch

    from lit_gpt.sink_metrics import window_start_scores

    g = torch.Generator().manual_seed(0)
    B, H, T, S, w = 2, 3, 12, 1, 5
    attn = torch.rand(B, H, T, S + T, generator=g, dtype=torch.float64)
    got = window_start_scores(attn, w, n_extra=S)
    for b in range(B):
        for h in range(H):
            vals = [float(attn[b, h, i, S + i - w + 1]) for i in range(w, T)]
            assert abs(float(got[b, h]) - sum(vals) / len(vals)) < 1e-6
    with pytest.raises(ValueError, match="window"):
        window_start_scores(attn, T, n_extra=S)


def test_a_row_with_a_baseline_is_judged_against_that_row(recorded):
    rec = load_records(recorded / "results")[("t", "default")]

    def with_sink1(row, v):
        r = _with_final(dict(rec, regime="gpu"), row, v)
        r["curve"] = dict(r["curve"], sink_1=[v] * len(r["curve"]["step"]))
        return r

    records = {("gpu", "default"): dict(with_sink1("default", 20.0), seed=3406),
               ("gpu", "seed2"): dict(with_sink1("seed2", 60.0), seed=2),
               ("gpu", "x"): with_sink1("x", 25.0), ("gpu", "x_seed2"): dict(with_sink1("x_seed2", 25.0), seed=2)}
    rows = {"default": {"sections": ["s"], "what": "d", "paper": "-"},
            "seed2": {"sections": ["s"], "what": "d2", "paper": "-"},
            "x": {"sections": ["s"], "what": "x", "paper": "P", "expect": "lower"},
            "x_seed2": {"sections": ["s"], "what": "x2", "paper": "P", "expect": "lower", "baseline": "seed2"}}
    table = repro_tables.section_table("s", "gpu", {"sections": {"s": {}}, "rows": rows}, records)
    runs, across = table.split("Across seeds")
    line = {ln.split(" | ")[0][2:]: ln for ln in runs.splitlines() if ln.startswith("| x")}
    assert "| x | Sink_1 <= 0.75 D | 2 | seed 3406: 25.0 (20.0) no; seed 2: 25.0 (60.0) yes | 1 of 2 seeds |" in across
    assert "| Sink_1 <= 0.75 D | **no** |" in line["x"]                                      # 25 > 0.75 x 20
    assert "| Sink_1 <= 0.75 D | yes |" in line["x_seed2"]                                   # 25 <= 0.75 x 60
    # the regime's headline counts the seeds that formed a sink and the rows that agree, from the same records
    records[("gpu", "seed3")] = dict(with_sink1("seed3", 4.0), seed=3)
    rows["seed3"] = {"sections": ["s"], "what": "d3", "paper": "-"}
    head = repro_tables.regime_headline("gpu", {"sections": {"s": {}}, "rows": rows}, records)
    assert "in 2 of the 3 seeds run" in head and "seed 3: Sink_1 4.0%" in head
    assert ("Of the 1 contrasts with a paper expectation (2 runs, 1 of them with several seeds" in head
            and "0 agree in every seed run (none), 1 in some seeds (x (1/2)) and 0 in none (none)" in head)


def _gpu_records(recorded, finals):
    """Tiny GPU records: row -> (seed, Sink_1 %, Sink_1* % or None); flat curves at that value."""
    rec = load_records(recorded / "results")[("t", "default")]
    out = {}
    for row, (seed, s1, slot) in finals.items():
        r = _with_final(dict(rec, regime="gpu"), row, s1)
        r["final"] = dict(r["final"], sink_extra=[] if slot is None else [slot])
        r["curve"] = dict(r["curve"], sink_1=[s1] * len(r["curve"]["step"]))
        if slot is not None:
            r["curve"]["sink_extra_0"] = [slot] * len(r["curve"]["step"])
        out[("gpu", row)] = dict(r, seed=seed)
    return out


def test_seed_twins_are_derived_from_their_row_and_judged_against_their_seeds_default(recorded):
    records = _gpu_records(recorded, {"default": (3406, 20.0, None), "seed2": (2, 60.0, None), "seed3": (3, 4.0, None),
                                      "k": (3406, 0.0, 30.0), "k_seed2": (2, 0.0, 10.0), "k_seed3": (3, 0.5, 3.0),
                                      "other": (3406, 1.0, None)})
    rows = {"default": {"sections": ["s", "emergence_map"], "what": "d", "paper": "-"},
            "k": {"sections": ["s"], "what": "a key slot", "paper": "P(k)", "expect": "slot"},
            "other": {"sections": ["s"], "what": "o", "paper": "-"},
            "k_seed3": {"note": {"gpu": "seed 3 slot {slot:k_seed3}, its default {sink:seed3}"}}}
    spec = repro_tables.with_twins({"sections": {"s": {}, "emergence_map": {}}, "rows": rows}, records)
    got = spec["rows"]
    # twins follow their row; the default's twins are the emergence map's seed rows
    assert list(got) == ["default", "seed2", "seed3", "k", "k_seed2", "k_seed3", "other"]
    assert got["k_seed2"] == {"sections": ["s"], "paper": "P(k)", "expect": "slot", "baseline": "seed2",
                              "what": "k with seeds 2 (model 2, data 2), against seed2", "regimes": ["gpu"]}
    assert got["seed3"]["sections"] == ["emergence_map"] and "baseline" not in got["seed3"]
    assert got["k_seed3"]["note"] == rows["k_seed3"]["note"] and got["k_seed3"]["baseline"] == "seed3"
    assert repro_tables.with_twins(spec, records) == spec                                    # idempotent
    # per seed against that seed's default: 3406 slot 30 >= 0.5 x 20 yes; seed 2: 10 < 0.5 x 60 no;
    # seed 3: 3 >= 0.5 x 4 and Sink_1 0.5 <= max(1, 0.4) yes
    table = repro_tables.section_table("s", "gpu", spec, records)
    line = next(ln for ln in table.splitlines() if ln.startswith("| k | ") and "seeds |" in ln)
    assert ("seed 3406: Sink_1* 30.0, Sink_1 0.0 (20.0) yes; seed 2: Sink_1* 10.0, Sink_1 0.0 (60.0) no; "
            "seed 3: Sink_1* 3.0, Sink_1 0.5 (4.0) yes | 2 of 3 seeds |") in line
    assert "- `k_seed3`: seed 3 slot 3.0%, its default 4.0%" in table                    # the note, filled in
    head = repro_tables.regime_headline("gpu", spec, records)
    assert "Of the 1 contrasts with a paper expectation (3 runs" in head and "1 in some seeds (k (2/3))" in head
    # a registry entry for a twin without a `what` is what gets merged, so load_rows accepts it
    assert twin_entry_ok(rows)


def twin_entry_ok(rows):
    import tempfile

    spec = {"sections": {"s": {"md": "s.md", "title": "S"}, "emergence_map": {"md": "m.md", "title": "M"}},
            "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.yaml"
        path.write_text(yaml.safe_dump(spec))
        return repro_tables.load_rows(path)["rows"]["k_seed3"] == rows["k_seed3"]


def test_note_fields_are_filled_from_the_records_and_name_what_is_missing(recorded):
    records = _gpu_records(recorded, {"default": (3406, 20.0, None), "x": (3406, 5.0, 40.0)})
    records[("gpu", "x")]["final"]["sink"] = [5.0, 0.0, 33.3] + [0.0] * 7
    records[("gpu", "x")]["final"]["sink_1_per_layer"] = [10.0, 0.0]
    records[("gpu", "x")]["final"]["sink_extra_per_layer"] = [[50.0, 30.0]]
    spec = {"rows": {"default": {}, "x": {}}}
    text = "{sink:x} {sink@3:x} {slot:x} {max:x} {maxslot:x} {xD:x} {layers:x} {from:x}"
    got = repro_tables.render_note(text, "gpu", spec, records)
    assert got == "5.0% 33.3% 40.0% 5.0% 40.0% 0.25 D Sink_1 10 / 0; Sink_1* 50 / 30 " + \
        repro_tables.emerges(records[("gpu", "x")])
    with pytest.raises(ValueError, match=r"\{sink:nope\}.*row='nope' has no gpu record"):
        repro_tables.render_note("{sink:nope}", "gpu", spec, records)
    with pytest.raises(ValueError, match="no extra slot"):
        repro_tables.render_note("{slot:default}", "gpu", spec, records)


def test_registry_notes_quote_measured_numbers_only_through_fields():
    """A note's percentages and D-multiples come from the records ({sink:R}, ...); a bare one must be a paper
    number of the registry (the paper column), so no measured number is typed by hand."""
    import re

    spec = repro_tables.load_rows()
    papers = " ".join(r.get("paper", "") for r in spec["rows"].values())
    records = load_records(REPO / "docs" / "results" / "repro")
    full = repro_tables.with_twins(spec, records)
    for rid, row in full["rows"].items():
        for regime, note in (row.get("note") or {}).items():
            bare = repro_tables.NOTE_FIELD.sub("", note)
            for num in re.findall(r"(\d+(?:\.\d+)?)(?=\s*%|\s*D\b)", bare):
                assert num in papers, (rid, regime, num, note)
            if (regime, rid) in records:
                repro_tables.render_note(note, regime, full, records)                       # every field resolves


# ---------------------------------------------------------------------------- final_checks on a run's checkpoint
CHECK_N, CHECK_T, CHECK_EPS, CHECK_W = 6, 16, 0.1, 8      # eps 0.1: rates between 0 and 100 here
FIXED = {"position": 1, "token_id": 7}


def _check_model(seed, window=True):
    """A tiny GPT with a key slot k* (and a sliding window) whose strong keys give input-dependent sinks."""
    import torch

    from lit_gpt import GPT, Config

    torch.manual_seed(seed)
    extra = {"attn_mask": "window", "window_size": CHECK_W} if window else {}
    cfg = Config.from_name("tiny", n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=320, kv_bias="k",
                           **extra)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight.mul_(4.0)
    return model


def _hand_checks(model, texts, fixed=FIXED):
    """final_checks' numbers with float64 loops, on probe inputs built here: the first T bytes of each text
    (bytes tokenizer), the run's fixed token put in place."""
    import torch

    L, H, T, eps = model.config.n_layer, model.config.n_head, CHECK_T, CHECK_EPS
    hits, alpha, extra_hits, pairs = [0] * L, [0.0] * L, [0] * L, [0] * L
    win_hits, win_pairs = 0, 0
    with torch.no_grad():
        for text in texts[:CHECK_N]:
            x = list(text.encode("utf-8"))[:T]
            if fixed:
                x[fixed["position"]] = fixed["token_id"]
            _, an = model(torch.tensor([x]), return_analysis={"attn"})
            for l, a in enumerate(an.attn):
                a = a[0].double()
                S = a.shape[-1] - T                                  # the k* slot comes first on the key axis
                for h in range(H):
                    first = sum(float(a[h, i, S]) for i in range(T)) / T
                    slot = sum(float(a[h, i, 0]) for i in range(T)) / T
                    hits[l] += first > eps
                    extra_hits[l] += slot > eps
                    alpha[l] += first
                    pairs[l] += 1
                    if model.config.attn_mask == "window":
                        w = model.config.window_size
                        starts = [float(a[h, i, S + i - w + 1]) for i in range(w, T)]
                        win_hits += sum(starts) / len(starts) > eps
                        win_pairs += 1
    out = {"sink_1_per_layer": [100.0 * hits[l] / pairs[l] for l in range(L)],
           "alpha_1_per_layer": [alpha[l] / pairs[l] for l in range(L)],
           "alpha_1_uniform": sum(1.0 / (i + 1) for i in range(T)) / T,
           "sink_extra_per_layer": [[100.0 * extra_hits[l] / pairs[l] for l in range(L)]]}
    if win_pairs:
        out["sink_window_start"] = 100.0 * win_hits / win_pairs
    return out


def _assert_checks(got, want):
    assert sorted(k for k in got if k != "checkpoint") == sorted(want)
    for key in ("sink_1_per_layer", "alpha_1_per_layer"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert got["alpha_1_uniform"] == pytest.approx(want["alpha_1_uniform"], abs=1e-12)
    assert got["sink_extra_per_layer"][0] == pytest.approx(want["sink_extra_per_layer"][0], abs=1e-5)
    if "sink_window_start" in want:
        assert got["sink_window_start"] == pytest.approx(want["sink_window_start"], abs=1e-5)


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory):
    """Run folders of a fixed-token k* sliding-window run config: checkpoints saved by hand from two models."""
    from lit_gpt.checkpoint import save_checkpoint, step_name
    from lit_gpt.run_config import from_dict

    tmp = tmp_path_factory.mktemp("final_checks")
    packed = make_packed(tmp, block_size=32)
    texts = [" ".join(["the cat", "dogs ran", "sun rose", "a mat"][i % 4:] * 4) + f" {i}" for i in range(CHECK_N)]
    probe = tmp / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    models = {"old": _check_model(0), "new": _check_model(1)}

    def run_folder(name, checkpoints):
        d = tiny_run(packed, tmp / name)
        d["model"] = models["new"].config.to_dict()
        d["data"]["fixed_token"] = dict(FIXED)
        d["probe"] = {"source": str(probe), "n": CHECK_N, "T": CHECK_T, "k_max": 4, "eps": CHECK_EPS,
                      "batch_size": 4}
        run = from_dict(d)
        for folder, which in checkpoints:
            m = models[which]
            save_checkpoint(tmp / name / folder, m, m.config, run_config=run.to_dict(), step=6)
        return tmp / name

    finished = run_folder("finished", [(step_name(3), "old"), ("final", "new")])
    timed_out = run_folder("timed_out", [(step_name(2), "old"), (step_name(4), "new")])
    return texts, models, finished, timed_out


def test_final_checks_match_hand_loops_and_are_kept_without_the_checkpoint(check_runs):
    from lit_gpt.checkpoint import delete_checkpoint, list_checkpoints
    from lit_gpt.repro import FINAL_CHECKS_FILE, final_checks

    texts, models, run_dir, _ = check_runs
    got = final_checks(run_dir)
    assert got["checkpoint"] == "final"                                   # final/ before any step-*
    want = _hand_checks(models["new"], texts)
    assert all(0 < v < 100 for v in want["sink_1_per_layer"] + want["sink_extra_per_layer"][0])   # not trivial
    _assert_checks(got, want)
    # the numbers tell the checkpoints and the probes apart: not the older step's model, not the natural text
    assert got["alpha_1_per_layer"] != pytest.approx(_hand_checks(models["old"], texts)["alpha_1_per_layer"],
                                                     abs=1e-3)
    assert got["alpha_1_per_layer"] != pytest.approx(_hand_checks(models["new"], texts, fixed=None)
                                                     ["alpha_1_per_layer"], abs=1e-3)
    saved = run_dir / FINAL_CHECKS_FILE
    assert json.loads(saved.read_text()) == got
    # the run folder as the GPU box returns it: no checkpoints, the file read back unchanged
    text = saved.read_text()
    for ckpt in list_checkpoints(run_dir):
        delete_checkpoint(ckpt)
    assert list_checkpoints(run_dir) == []
    assert final_checks(run_dir) == got and saved.read_text() == text
    # neither a checkpoint nor the file: nothing to report
    saved.unlink()
    assert final_checks(run_dir) == {}
    assert not saved.exists()


def test_final_checks_of_a_run_stopped_by_time_use_its_newest_step(check_runs):
    from lit_gpt.repro import FINAL_CHECKS_FILE, final_checks

    texts, models, _, run_dir = check_runs
    got = final_checks(run_dir)
    assert got["checkpoint"] == "step-0000004"                            # the newest step, not step-0000002
    _assert_checks(got, _hand_checks(models["new"], texts))
    assert json.loads((run_dir / FINAL_CHECKS_FILE).read_text()) == got
