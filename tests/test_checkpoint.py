"""Checkpoint folders (lit_gpt.checkpoint): safetensors + JSON round trips, no pickle, atomic writes, one-line
errors for old pickle and foreign files, and the converter of old checkpoints."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.checkpoint import (CheckpointError, checkpoint_tokenizer, convert_legacy, find_checkpoint, is_checkpoint,
                                legacy_checkpoints, list_checkpoints, load_checkpoint, load_model, main, rng_state,
                                save_checkpoint, set_rng_state, step_checkpoints, write_checkpoint)
from lit_gpt.utils import atomic_write_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(tied=True):
    cfg = Config.from_name("tiny", n_layer=2, n_embd=32, n_head=2, intermediate_size=64, block_size=16,
                           tie_embeddings=tied, kv_bias="k")
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randint(0, cfg.vocab_size, (2, 16))).sum().backward()
    opt.step()
    return cfg, model, opt


def draws():
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), np.random.randn(1).tolist(), random.random()


def magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


# ---------------------------------------------------------------------------- round trip
def test_training_checkpoint_round_trips_exactly_without_pickle(tmp_path):
    cfg, model, opt = trained()
    np.random.randn()                                   # numpy holds a cached gaussian: part of its state
    rng = rng_state()
    expect = draws()
    osd = opt.state_dict()
    path = save_checkpoint(tmp_path / "run" / "step-0000007", model, cfg, optimizer=osd, rng=rng, step=7,
                           data_state={"n": 28, "counts": {"a": 20, "b": 8}},
                           run_config={"data": {"tokenizer": "bytes"}},
                           scheduler={"kind": "cosine", "next_lr": 1e-3}, nothing=None, pair=(1, "x"))
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "model.safetensors",
                                                      "train_state.safetensors"]
    for f in path.iterdir():
        assert magic(f) not in (b"PK\x03\x04",) and magic(f)[:1] != b"\x80"          # no zip / pickle
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["format"] == "lit_gpt.checkpoint" and meta["version"] == 2 and meta["step"] == 7
    assert meta["model_config"] == cfg.to_dict() and meta["aliases"] == {"lm_head.weight": "wte.weight"}

    from safetensors import safe_open                   # the weights open with plain safetensors
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["model_config"]) == cfg.to_dict()
        assert set(f.keys()) == set(model.state_dict()) - {"lm_head.weight"}     # tied: stored once

    payload = load_checkpoint(tmp_path / "run")          # a run folder: its newest checkpoint
    assert payload["_path"] == str(path) and payload["step"] == 7 and payload["nothing"] is None
    assert payload["pair"] == (1, "x") and payload["data_state"] == {"n": 28, "counts": {"a": 20, "b": 8}}
    sd = model.state_dict()
    assert set(payload["model"]) == set(sd) and all(torch.equal(payload["model"][k], sd[k]) for k in sd)
    got = payload["optimizer"]
    assert got["param_groups"] == osd["param_groups"] and isinstance(got["param_groups"][0]["betas"], tuple)
    assert sorted(got["state"]) == sorted(osd["state"]) and all(isinstance(k, int) for k in got["state"])
    assert all(torch.equal(got["state"][i][k], osd["state"][i][k]) for i in osd["state"] for k in osd["state"][i])
    opt2 = torch.optim.AdamW(GPT(cfg).parameters(), lr=1e-3, betas=(0.9, 0.95))
    opt2.load_state_dict(got)                           # torch accepts it as its own
    torch.manual_seed(123), np.random.seed(5), random.seed(9)
    set_rng_state(payload["rng"])
    assert draws() == expect                            # torch, numpy (with its cached gaussian), python

    light = load_checkpoint(path, train_state=False)    # what load_model reads: no optimizer, no RNG
    assert "optimizer" not in light and "rng" not in light and light["step"] == 7
    loaded, info = load_model(path)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)
    assert "optimizer" not in info and "model" not in info and info["run_config"] == {"data": {"tokenizer": "bytes"}}


def test_write_refuses_what_it_cannot_store(tmp_path):
    cfg, model, _ = trained()
    with pytest.raises(CheckpointError, match=r"ends in \.pth: checkpoints are folders now \(e.g. final/"):
        save_checkpoint(tmp_path / "final.pth", model, cfg)
    with pytest.raises(CheckpointError, match=r"cannot store run_config.out_dir \(PosixPath\)"):
        save_checkpoint(tmp_path / "final", model, cfg, run_config={"out_dir": tmp_path})
    with pytest.raises(CheckpointError, match=r"\['model_config'\] are reserved"):
        write_checkpoint(tmp_path / "final", model.state_dict(), cfg, model_config={})
    assert list(tmp_path.iterdir()) == []               # nothing was left behind


# ---------------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    cfg, model, _ = trained()
    path = save_checkpoint(tmp_path / "final", model, cfg, step=1)

    def crash(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(path, crash)
    assert load_checkpoint(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    save_checkpoint(path, model, cfg, step=2)           # overwriting replaces the folder as a whole
    assert load_checkpoint(path)["step"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # a crash between "old folder aside" and "new folder in": the next write of that name puts the old one back
    os.replace(path, tmp_path / ".final.old-999")
    (tmp_path / ".final.abc.tmp").mkdir()               # and a half-written one, removed
    assert list_checkpoints(tmp_path) == []             # hidden folders are never checkpoints
    with pytest.raises(OSError):
        atomic_write_dir(path, crash)
    assert load_checkpoint(path)["step"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_listing_and_finding(tmp_path):
    cfg, model, _ = trained(tied=False)
    for step in (3, 12, 5):
        save_checkpoint(tmp_path / f"step-{step:07d}", model, cfg, step=step)
    (tmp_path / "step-x").mkdir()
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0000012", "step-0000005", "step-0000003"]
    assert find_checkpoint(tmp_path).name == "step-0000012"
    save_checkpoint(tmp_path / "final", model, cfg, step=20)
    assert [p.name for p in list_checkpoints(tmp_path)][:2] == ["final", "step-0000012"]
    assert find_checkpoint(tmp_path / "final" / "model.safetensors") == tmp_path / "final"
    assert load_model(tmp_path)[1]["step"] == 20


# ---------------------------------------------------------------------------- old and foreign files
OLD_RUNNER = """
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def write_old_checkpoint(path: Path, model, cfg, opt) -> dict:
    """A checkpoint as lit_gpt wrote it before safetensors: one torch.save pickle (numpy / python RNG tuples)."""
    payload = {"model_config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(), "step": 4,
               "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               "run_config": {"data": {"tokenizer": "bytes"}}, "data_state": {"n": 16}}
    torch.save(payload, path)
    return payload


def test_old_pickle_and_foreign_files_get_one_line_errors(tmp_path):
    cfg, model, opt = trained()
    old = tmp_path / "run" / "final.pth"
    old.parent.mkdir()
    write_old_checkpoint(old, model, cfg, opt)
    for target in (old, old.parent):
        with pytest.raises(CheckpointError) as e:
            load_model(target)
        msg = str(e.value)
        assert "\n" not in msg and "pickle checkpoint (final.pth" in msg
        assert f"python -m lit_gpt.checkpoint convert {target}" in msg
    assert is_checkpoint(old) and is_checkpoint(old.parent)        # so the streaming loaders send it here

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(hf / "model.safetensors"))
    assert not is_checkpoint(hf)
    with pytest.raises(CheckpointError, match=r"is not a lit_gpt checkpoint \(no checkpoint.json\); a Hugging Face"):
        load_model(hf)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt is not a lit_gpt checkpoint; expected a folder holding"):
        load_model(tmp_path / "notes.txt")
    path = save_checkpoint(tmp_path / "ok", model, cfg)
    meta = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps(dict(meta, version=3)))
    with pytest.raises(CheckpointError, match="format version 3; this lit_gpt reads versions up to 2"):
        load_model(path)
    (path / "checkpoint.json").write_text(json.dumps(dict(meta, format="someone_else")))
    with pytest.raises(CheckpointError, match="not a lit_gpt checkpoint record"):
        load_model(path)
    (tmp_path / "step-0000009").mkdir()
    with pytest.raises(CheckpointError, match="step-0000009 is an incomplete checkpoint: no checkpoint.json"):
        load_model(tmp_path / "step-0000009")


def test_a_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ns: dict = {}
    exec(OLD_RUNNER.format(marker=marker), ns)
    bad = tmp_path / "final.pth"
    torch.save({"model": {}, "model_config": {}, "x": ns["Payload"]()}, bad)
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        load_model(bad)
    with pytest.raises(CheckpointError, match=r"holds more than tensors, numbers and numpy arrays \(.*system.*\); "
                                              r"convert it with --trust-pickle only"):
        convert_legacy(bad)
    assert not marker.exists() and not (tmp_path / "final").exists()


def test_converter_turns_old_checkpoints_into_folders_that_resume_the_same(tmp_path, capsys):
    cfg, model, opt = trained()
    run = tmp_path / "run"
    run.mkdir()
    np.random.randn()
    old = write_old_checkpoint(run / "step-0000004.pth", model, cfg, opt)
    expect = draws()
    write_old_checkpoint(run / "final.pth", model, cfg, opt)
    assert legacy_checkpoints(run, unconverted=True) == [run / "final.pth", run / "step-0000004.pth"]
    assert main(["convert", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {run / 'final'}", f"wrote {run / 'step-0000004'}"]
    assert legacy_checkpoints(run, unconverted=True) == []          # the old files stay, the trainer accepts the run
    assert (run / "final.pth").is_file()
    new = load_checkpoint(run / "step-0000004")
    assert new["step"] == 4 and new["run_config"] == old["run_config"] and new["data_state"] == {"n": 16}
    assert all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
    assert new["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]
    set_rng_state(new["rng"])
    assert draws() == expect
    assert checkpoint_tokenizer(new) == "bytes"
    assert main(["convert", str(run / "final.pth")]) == 2                           # nothing is overwritten
    assert "final exists; nothing was overwritten" in capsys.readouterr().err


def test_checkpoint_tokenizer():
    assert checkpoint_tokenizer({"run_config": {"data": {"tokenizer": "bytes"}, "tokenizer": "other"}}) == "bytes"
    assert checkpoint_tokenizer({"run_config": {"tokenizer": "tok.json"}}) == "tok.json"
    assert checkpoint_tokenizer({}) is None


def test_loaders_follow_the_format(tmp_path, capsys):
    """The streaming loader and the evaluation CLIs read checkpoint folders and refuse old files in one line."""
    from lit_gpt.streaming_io import load_lm

    cfg, model, opt = trained()
    save_checkpoint(tmp_path / "run" / "final", model, cfg, run_config={"data": {"tokenizer": "bytes"}})
    lm = load_lm(str(tmp_path / "run"))
    assert lm.train_window == cfg.block_size and lm.tokenizer.encode("ab") == [97, 98]
    write_old_checkpoint(tmp_path / "old.pth", model, cfg, opt)
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        load_lm(str(tmp_path / "old.pth"), tokenizer="bytes")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import eval_sink
    import export_hf

    for cli in (lambda p: eval_sink.main([p]), lambda p: eval_sink.main([p, "--run-probe", "--device", "cpu"]),
                lambda p: export_hf.main([p, str(tmp_path / "hf")])):
        assert cli(str(tmp_path / "old.pth")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "pickle checkpoint" in err and len(err.splitlines()) == 1
