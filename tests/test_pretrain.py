"""pretrain.py / lit_gpt.trainer on CPU: kill-and-resume determinism, schedule, checkpoint fallback, bad input,
and the sink-on-probe helper against a hand-written reference."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import REPO, make_packed, tiny_run, write_yaml  # noqa: E402

import pretrain  # noqa: E402
from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.checkpoint import load_checkpoint  # noqa: E402
from lit_gpt.evaluate import sink_on_probe  # noqa: E402
from lit_gpt.packed import write_shard  # noqa: E402
from lit_gpt.probe import probe_view  # noqa: E402
from lit_gpt.run_config import from_dict, load_run_config  # noqa: E402
from lit_gpt.trainer import fit, lr_at, preflight  # noqa: E402

RUNNER = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from lit_gpt.run_config import load_run_config
from lit_gpt.trainer import fit
cfg = load_run_config({cfg!r})
kill_at = {kill_at}
def hook(step, last):
    with open({rec!r}, "a") as f:
        f.write(json.dumps([step, last["train_loss"]]) + "\\n")
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)       # a hard kill: no cleanup, no checkpoint
fit(cfg, on_step_end=hook)
"""


def run_subprocess(tmp: Path, cfg_path: Path, rec: Path, kill_at: int = -1) -> int:
    script = tmp / f"runner_{rec.stem}.py"
    script.write_text(RUNNER.format(repo=str(REPO), cfg=str(cfg_path), kill_at=kill_at, rec=str(rec)))
    return subprocess.run([sys.executable, str(script)], cwd=str(REPO), capture_output=True, text=True,
                          timeout=300).returncode


def losses(rec: Path) -> dict:
    return {s: l for s, l in (json.loads(x) for x in rec.read_text().splitlines())}


def csv_column(path: Path, col: str) -> dict:
    with open(path) as f:
        return {int(r["step"]): float(r[col]) for r in csv.DictReader(f) if r[col]}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("data"), block_size=32)


def recorder(store: dict):
    def hook(step, last):
        store[step] = last["train_loss"]
    return hook


def test_kill_and_resume_continues_the_same_loss_curve(packed, tmp_path):
    ref, resumed = {}, {}
    fit(load_run_config(write_yaml(tmp_path / "full.yaml", tiny_run(packed, tmp_path / "full"))),
        on_step_end=recorder(ref))
    part = write_yaml(tmp_path / "part.yaml", tiny_run(packed, tmp_path / "part"))
    rc = run_subprocess(tmp_path, part, tmp_path / "killed.jsonl", kill_at=5)
    assert rc != 0                                                   # SIGKILLed after step 5
    assert (tmp_path / "part" / "step-0000003" / "checkpoint.json").is_file()
    assert not (tmp_path / "part" / "final").exists()
    fit(load_run_config(part), on_step_end=recorder(resumed))        # a new model resumes from the checkpoint
    killed = losses(tmp_path / "killed.jsonl")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and sorted(killed) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(resumed[s] - ref[s]) <= 1e-6, (s, resumed[s], ref[s])
    for s in (1, 2, 3, 4, 5):
        assert abs(killed[s] - ref[s]) <= 1e-6
    assert ref[6] != ref[5]            # the model actually trains
    # the resumed run's CSV is the uninterrupted one: rows the killed run wrote after its checkpoint are gone
    a, b = csv_column(tmp_path / "full" / "metrics.csv", "train_loss"), csv_column(tmp_path / "part" / "metrics.csv",
                                                                                   "train_loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    sa, sb = csv_column(tmp_path / "full" / "metrics.csv", "sink_1"), csv_column(tmp_path / "part" / "metrics.csv",
                                                                                  "sink_1")
    assert sorted(sa) == sorted(sb) == [0, 3, 6]
    wa = load_checkpoint(tmp_path / "full" / "final")["model"]
    wb = load_checkpoint(tmp_path / "part" / "final")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-0000003") and summary["step"] == 6
    for name in ("curves.png", "run_config.yaml"):
        assert (tmp_path / "full" / name).is_file()


def test_checkpoint_is_self_describing_and_torn_files_fall_back(packed, tmp_path):
    d = tiny_run(packed, tmp_path / "run", stop_at_step=3, eval_interval=0, sink_interval=0)
    cfg = from_dict(d)
    s1 = fit(cfg)
    assert s1["step"] == 3 and s1["stopped_early"]
    payload = load_checkpoint(tmp_path / "run" / "step-0000003")
    assert payload["step"] == 3 and payload["model_config"]["n_layer"] == 2
    assert payload["run_config"]["data"]["train"] == {"train_alpha": 0.6, "train_beta": 0.4}
    assert payload["data_state"]["n"] == 3 * 4 and set(payload) >= {"optimizer", "rng", "scheduler"}
    torn = tmp_path / "run" / "step-0000006"                         # e.g. a copy cut short by a full disk
    shutil.copytree(tmp_path / "run" / "step-0000003", torn)
    weights = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    d["train"]["stop_at_step"] = None
    s2 = fit(from_dict(d))
    assert s2["resumed_from"].endswith("step-0000003") and s2["step"] == 6


def test_a_converted_old_checkpoint_resumes_the_same(packed, tmp_path):
    """An old pickle checkpoint (as lit_gpt wrote them before safetensors) converted by ``python -m
    lit_gpt.checkpoint convert`` continues the run exactly as the checkpoint folder it was made from."""
    from lit_gpt.checkpoint import main as checkpoint_cli

    d = tiny_run(packed, tmp_path / "a", max_steps=4, stop_at_step=2, save_interval=0, eval_interval=0,
                 sink_interval=0)
    fit(from_dict(d))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    payload = load_checkpoint(tmp_path / "b" / "step-0000002")
    n, p = payload["rng"]["numpy"], payload["rng"]["python"]
    payload["rng"].update(numpy=(n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                                 n["gauss"]), python=(p["version"], tuple(p["state"]), p["gauss_next"]))
    del payload["_path"]
    torch.save(payload, tmp_path / "b" / "step-0000002.pth")
    shutil.rmtree(tmp_path / "b" / "step-0000002")
    assert checkpoint_cli(["convert", str(tmp_path / "b")]) == 0
    curves = {}
    for run in ("a", "b"):
        d["train"].update(out_dir=str(tmp_path / run), stop_at_step=None)
        curves[run] = {}
        assert fit(from_dict(d), on_step_end=recorder(curves[run]))["step"] == 4
    assert sorted(curves["a"]) == [3, 4] and curves["a"] == curves["b"]


def test_headline_val_loss_is_the_named_domain_and_pooled_mode_trains(packed, tmp_path):
    """val_loss is the headline domain's loss (the paper's Pile-CC), checked against a float64 loop over the same
    validation chunks; val_loss_mean is the weighted mean; a pooled-mode run refuses to resume as weighted."""
    from lit_gpt.checkpoint import load_model

    d = tiny_run(packed, tmp_path / "run", max_steps=2, eval_interval=2, sink_interval=0, save_interval=0)
    d["data"].update(headline="valid_beta", mixture_mode="pooled", valid={"valid_alpha": 1.0, "valid_beta": 3.0})
    cfg = from_dict(d)
    summary = fit(cfg)
    assert summary["val_loss_domain"] == "valid_beta"
    with open(tmp_path / "run" / "metrics.csv") as f:
        row = [r for r in csv.DictReader(f) if r["val_loss"]][-1]
    assert int(row["step"]) == 2
    model, _ = load_model(tmp_path / "run" / "final")
    vs = preflight(cfg).data.valid_set
    ref = {}
    with torch.no_grad():
        for name in ("valid_alpha", "valid_beta"):
            nll, count = 0.0, 0
            for i in vs.indices[name]:
                chunk = torch.from_numpy(vs.domains[name].chunk(int(i)).astype(np.int64))
                lp = torch.log_softmax(model(chunk[None, :-1])[0].double(), dim=-1)
                for t in range(len(chunk) - 1):
                    nll -= float(lp[t, chunk[t + 1]])
                    count += 1
            ref[name] = nll / count
    assert float(row["val_loss"]) == pytest.approx(ref["valid_beta"], rel=1e-5)
    assert float(row["val_loss/valid_beta"]) == pytest.approx(ref["valid_beta"], rel=1e-5)
    assert float(row["val_loss_mean"]) == pytest.approx((ref["valid_alpha"] + 3 * ref["valid_beta"]) / 4, rel=1e-5)
    from lit_gpt.trainer import PreflightError, check_resume_compatible

    d["data"]["mixture_mode"] = "weighted"
    with pytest.raises(PreflightError, match="mixture_mode: 'pooled' -> 'weighted'"):
        check_resume_compatible(load_checkpoint(tmp_path / "run" / "final"), from_dict(d), cfg.model_config())


def test_headline_resolution():
    from lit_gpt.run_config import RunConfigError, resolve_headline

    pile = load_run_config(REPO / "configs" / "tinyllama_60m.yaml")
    assert pile.data.headline == "valid_the_pile_pile_cc" and len(pile.data.valid) == 17
    assert load_run_config(REPO / "configs" / "tinyllama_60m_shared_corpus.yaml").data.headline == "valid_wikipedia"
    assert load_run_config(REPO / "configs" / "demo_cpu.yaml").data.headline == "valid_demo"   # the only domain
    base = {"model": {"name": "tiny"}, "data": {"train": {"x": 1.0}, "valid": {"valid_a": 1.0, "valid_b": 1.0}}}
    assert from_dict(base).data.headline == "mean"
    with_cc = dict(base, data=dict(base["data"], valid={"valid_a": 1.0, "valid_the_pile_pile_cc": 1.0}))
    assert from_dict(with_cc).data.headline == "valid_the_pile_pile_cc"
    assert resolve_headline(from_dict(with_cc).data) == "valid_the_pile_pile_cc"
    with pytest.raises(RunConfigError, match=r"data.headline='valid_c' is invalid \(did you mean valid_a, valid_b\?\); "
                                             r"allowed: mean, valid_a, valid_b"):
        from_dict(dict(base, data=dict(base["data"], headline="valid_c")))


def test_lr_schedule_matches_the_formula():
    base = {"model": {"name": "tiny"}, "data": {"train": {"x": 1.0}}}
    cfg = from_dict(dict(base, train={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110}))
    assert lr_at(0, cfg) == pytest.approx(1e-4)                    # (step + 1) / warmup * lr
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    const = from_dict(dict(base, train={"lr": 4e-4, "min_lr": 4e-4, "warmup_steps": 100, "max_steps": 20000}))
    assert [lr_at(s, const) for s in (99, 100, 5000, 19999)] == pytest.approx([4e-4] * 4)
    lin = from_dict(dict(base, train={"lr": 1e-3, "min_lr": 0.0, "warmup_steps": 0, "max_steps": 100,
                                      "lr_schedule": "linear"}))
    assert lr_at(25, lin) == pytest.approx(7.5e-4)


# ---------------------------------------------------------------------------- bad input
def run_main(tmp_path, d, capsys, *extra):
    path = write_yaml(tmp_path / "cfg.yaml", d)
    rc = pretrain.main(["--config", str(path), *extra])
    return rc, capsys.readouterr().err


def test_bad_input_is_one_clear_error_before_any_work(packed, tmp_path, capsys):
    out = tmp_path / "run"
    d = tiny_run(packed, out)
    d["data"]["train_dir"] = str(tmp_path / "missing")
    rc, err = run_main(tmp_path, d, capsys)
    assert rc == 2 and "data folder not found" in err and not out.exists()

    d = tiny_run(packed, out)
    d["data"]["train"] = {"train_gamma": 1.0}
    rc, err = run_main(tmp_path, d, capsys)
    assert rc == 2 and "no shards for prefix 'train_gamma'" in err and "train_alpha" in err

    d = tiny_run(packed, out)
    d["model"]["vocab_size"] = 128
    rc, err = run_main(tmp_path, d, capsys)
    assert rc == 2 and "vocab_size=257" in err and "larger than the model" in err

    rc, err = run_main(tmp_path, tiny_run(packed, out), capsys, "train.micro_batchsize=2")
    assert rc == 2 and "unknown key 'micro_batchsize'" in err and "micro_batch_size" in err

    if not torch.cuda.is_available():
        rc, err = run_main(tmp_path, tiny_run(packed, out, strategy="fsdp"), capsys)
        assert rc == 2 and "fsdp is invalid on CPU" in err

    (tmp_path / "afile").write_text("x")
    rc, err = run_main(tmp_path, tiny_run(packed, tmp_path / "afile" / "run"), capsys)
    assert rc == 2 and "not writable" in err


def test_foreign_tokenizer_shard_is_refused(packed, tmp_path, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    for p in packed.glob("*.bin"):
        (data / p.name).write_bytes(p.read_bytes())
    write_shard(data / "valid_other-f0000-00000.bin", np.zeros((4, 33), dtype=np.int64),
                {"vocab_size": 257, "domain": "valid_other",
                 "tokenizer": {"name": "another", "fingerprint": "0123456789abcdef"}})
    d = tiny_run(data, tmp_path / "run")
    d["data"]["valid"] = {"valid_alpha": 1.0, "valid_other": 1.0}
    rc, err = run_main(tmp_path, d, capsys)
    assert rc == 2 and "'valid_other' was tokenised with 'another'" in err


def test_existing_run_is_not_overwritten(packed, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "step-0000003").mkdir()
    (out / "step-0000003" / "model.safetensors").write_bytes(b"precious")
    rc, err = run_main(tmp_path, tiny_run(packed, out, resume=False), capsys)
    assert rc == 2 and "already holds checkpoints" in err
    assert (out / "step-0000003" / "model.safetensors").read_bytes() == b"precious"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["step-0000003", "step-0000003/model.safetensors"]


def test_old_pickle_checkpoints_in_out_dir_are_refused_with_the_converter(packed, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "step-0000003.pth").write_bytes(b"old")
    rc, err = run_main(tmp_path, tiny_run(packed, out), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "old pickle format (step-0000003.pth)" in err and f"python -m lit_gpt.checkpoint convert {out}" in err
    assert sorted(p.name for p in out.iterdir()) == ["step-0000003.pth"]


def test_preflight_builds_the_probe_and_loss_skip(packed, tmp_path):
    d = tiny_run(packed, tmp_path / "run")
    d["model"].update(attn_mask="prefix", prefix_size=5)
    d["data"]["fixed_token"] = {"position": 2, "token_id": 1}
    plan = preflight(from_dict(d))
    assert plan.skip == 4                              # the seed's --ignore_loss $((PREFIX-1))
    assert plan.probe.shape == (8, 17) and not (plan.probe[:, 2] == 1).all()     # natural rows ...
    inputs, targets = probe_view(plan.probe, plan.data.transforms)                 # ... fed with the token in place
    assert (inputs[:, 2] == 1).all() and (targets == plan.probe[:, 1:]).all()


# ---------------------------------------------------------------------------- sink on probe
def reference_sink(model, tokens, T, eps, k_max):
    """Hand loops in float64 over the model's attention maps (one sample at a time)."""
    hits = np.zeros(k_max)
    pairs = 0
    nll, count = 0.0, 0
    for row in tokens:
        logits, an = model(row[None, :T], return_analysis={"attn"})
        for a in an.attn:
            a = a[0].double().numpy()                       # (H, T, n_extra + T)
            S = an.n_extra
            for h in range(a.shape[0]):
                for k in range(k_max):
                    score = sum(a[h, i, S + k] for i in range(k, T)) / (T - k)
                    hits[k] += score > eps
                pairs += 1
        lp = torch.log_softmax(logits[0].double(), dim=-1)
        for i in range(T):
            nll -= float(lp[i, row[i + 1]])
            count += 1
    return hits / pairs * 100, nll / count


def test_sink_on_probe_matches_hand_loops():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny", n_layer=2, n_head=4, n_embd=32, block_size=32)).eval()
    with torch.no_grad():                               # make position 0 a strong key so that sinks appear
        for b in model.blocks:
            b.attn.qkv.weight.mul_(4.0)
    tokens = torch.randint(0, 512, (7, 17))
    result, loss = sink_on_probe(model, tokens, eps=0.3, k_max=5, batch_size=3)
    with torch.no_grad():
        ref_rates, ref_loss = reference_sink(model, tokens, T=16, eps=0.3, k_max=5)
    assert [result.sink[k + 1] for k in range(5)] == pytest.approx(list(ref_rates), abs=1e-9)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert result.n_samples == 7 and result.sink[1] > 0
    only_inputs, no_loss = sink_on_probe(model, tokens[:, :16], eps=0.3, k_max=5, has_targets=False)
    assert no_loss is None and only_inputs.sink == result.sink
    slot_model = GPT(Config.from_name("tiny", n_layer=2, kv_bias="k", block_size=32)).eval()
    res, _ = sink_on_probe(slot_model, tokens, k_max=3)
    assert res.sink_extra is not None and len(res.sink_extra) == 1


DDP_RUNNER = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
if os.environ.get("LOCAL_RANK", "0") == "1":      # rank 1's clock runs at half speed: the ranks disagree on time
    _pc, _t0 = time.perf_counter, time.perf_counter()
    time.perf_counter = lambda: _t0 + (_pc() - _t0) * 0.5
from lit_gpt.run_config import load_run_config
from lit_gpt.trainer import fit
summary = fit(load_run_config({cfg!r}))
with open({out!r} + f".rank{{os.environ.get('LOCAL_RANK', '0')}}", "w") as f:
    json.dump({{"step": summary["step"], "stopped": summary["stopped_early"]}}, f)
"""


def test_ddp_ranks_stop_together_on_a_time_budget(packed, tmp_path):
    """Two CPU processes (gloo) whose clocks disagree: rank 0 decides when max_time_s is reached, so both stop at
    the same step instead of one waiting forever in the next all-reduce."""
    d = tiny_run(packed, tmp_path / "run", devices=2, max_steps=100000, max_time_s=4, save_interval=0,
                 eval_interval=0, sink_interval=0, save_final=False)
    cfg_path = write_yaml(tmp_path / "ddp.yaml", d)
    script = tmp_path / "ddp_runner.py"
    script.write_text(DDP_RUNNER.format(repo=str(REPO), cfg=str(cfg_path), out=str(tmp_path / "done")))
    proc = subprocess.run([sys.executable, str(script)], cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0 = json.loads((tmp_path / "done.rank0").read_text())
    r1 = json.loads((tmp_path / "done.rank1").read_text())
    assert r0["stopped"] == r1["stopped"] == "train.max_time_s=4"
    assert r0["step"] == r1["step"] > 0
