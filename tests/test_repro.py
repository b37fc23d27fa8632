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
               ("gpu", "x"): with_sink1("x", 25.0), ("gpu", "x_seed2"): with_sink1("x_seed2", 25.0)}
    rows = {"default": {"sections": ["s"], "what": "d", "paper": "-"},
            "seed2": {"sections": ["s"], "what": "d2", "paper": "-"},
            "x": {"sections": ["s"], "what": "x", "paper": "P", "expect": "lower"},
            "x_seed2": {"sections": ["s"], "what": "x2", "paper": "P", "expect": "lower", "baseline": "seed2"}}
    table = repro_tables.section_table("s", "gpu", {"sections": {"s": {}}, "rows": rows}, records)
    line = {ln.split(" | ")[0][2:]: ln for ln in table.splitlines() if ln.startswith("| x")}
    assert "| Sink_1 <= 0.75 D | **no** |" in line["x"]                                      # 25 > 0.75 x 20
    assert "| Sink_1 <= 0.75 D | yes |" in line["x_seed2"]                                   # 25 <= 0.75 x 60
    # the regime's headline counts the seeds that formed a sink and the rows that agree, from the same records
    records[("gpu", "seed3")] = dict(with_sink1("seed3", 4.0), seed=3)
    rows["seed3"] = {"sections": ["s"], "what": "d3", "paper": "-"}
    head = repro_tables.regime_headline("gpu", {"sections": {"s": {}}, "rows": rows}, records)
    assert "in 2 of the 3 seeds run" in head and "seed 3: Sink_1 4.0%" in head
    assert "Of the 2 rows with a paper expectation, 1 agree (x_seed2) and 1 disagree (x)" in head
