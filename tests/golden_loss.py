"""Golden loss curve (torchtitan's habit): the first losses of a tiny fixed-seed CPU run, committed in
tests/golden/loss_tiny.json, so that a change that moves the training numbers is seen, and moved on purpose.

    python tests/golden_loss.py                 # run and compare with the committed file (what the test does)
    python tests/golden_loss.py --regenerate    # rewrite tests/golden/loss_tiny.json (a change meant to move it)
    python tests/golden_loss.py --sensitivity   # how far kernel paths and small changes move it (the README table)

The run: ``lit_gpt.trainer.fit`` (the path pretrain.py takes) on the two-domain byte-level corpus of
tests/pretrain_helpers.make_packed, a 2-layer LLaMA-style model (RoPE, SwiGLU, RMSNorm), AdamW with warmup and
cosine decay, gradient accumulation 2, clipping, float32 on CPU with one thread; STEPS optimizer steps, then the
validation loss. A few seconds.

Tolerance: ABS_TOL = 1e-5 on every loss (the losses are 5-7 nats). Float32 on CPU with one thread is
deterministic on a given machine and torch build: the same command gives the same bits. Another CPU (AVX2 or no
SIMD instead of AVX-512, another MKL code path) or another accumulation split sums in another order. That changes
each operation by about 1e-7 relative, and the 12 steps grow it to at most 9.5e-7 (measured with --sensitivity,
table in tests/golden/README.md). ABS_TOL is 10x that, and it is still below what small real changes do:
norm_eps 1e-5 -> 1e-6 moves a loss by 9.7e-5, adam_eps 1e-8 -> 1e-7 by 5.5e-5, lr +0.1% by 8.8e-4.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import REPO, make_packed  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "loss_tiny.json"
REGENERATE = "python tests/golden_loss.py --regenerate"
STEPS = 12
ABS_TOL = 1e-5
DATA = "tests/pretrain_helpers.make_packed(block_size=32): bytes tokenizer, domains alpha/beta, 20% held out"
# the run config, with {data} / {out} standing for the corpus folder and the output folder
CONFIG = {
    "model": {"name": "tiny", "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64},
    "data": {"train_dir": "{data}", "tokenizer": "bytes", "train": {"train_alpha": 0.6, "train_beta": 0.4},
             "valid": {"valid_alpha": 1.0, "valid_beta": 1.0}, "val_samples": 6, "seed": 42},
    "train": {"out_dir": "{out}", "seed": 3406, "accelerator": "cpu", "devices": 1, "precision": "32-true",
              "cpu_threads": 1, "global_batch_size": 4, "micro_batch_size": 2, "max_steps": STEPS,
              "warmup_steps": 3, "lr": 3e-3, "min_lr": 3e-4, "lr_schedule": "cosine", "weight_decay": 0.1,
              "grad_clip": 1.0, "log_interval": 1, "eval_interval": 0, "sink_interval": 0, "save_interval": 0,
              "save_final": False, "resume": False},
    "probe": {"source": "shards", "n": 8, "T": 16, "k_max": 4, "batch_size": 4},
    "logging": {"tensorboard": False, "wandb": False, "progress": False},
}


def _filled(config: dict, data: Path, out: Path) -> dict:
    d = copy.deepcopy(config)
    d["data"]["train_dir"] = str(data)
    d["train"]["out_dir"] = str(out)
    return d


def run_golden(tmp: Path, config: Optional[dict] = None) -> Dict[str, object]:
    """Train the golden run in ``tmp``; returns {"train_loss": [step 1..STEPS], "val_loss": after the last}."""
    from lit_gpt.run_config import from_dict
    from lit_gpt.trainer import fit

    data = make_packed(tmp / "data", block_size=32)
    losses: Dict[int, float] = {}
    threads = torch.get_num_threads()
    try:
        summary = fit(from_dict(_filled(config or CONFIG, data, tmp / "out")),
                      on_step_end=lambda step, last: losses.__setitem__(step, last["train_loss"]))
    finally:
        torch.set_num_threads(threads)
    return {"train_loss": [losses[s] for s in sorted(losses)], "val_loss": summary["final"]["val_loss"]}


def compare(stored: dict, got: dict, tol: float = ABS_TOL) -> List[str]:
    """One line per loss that moved by more than ``tol`` (empty: the curve is the golden one)."""
    problems = []
    if len(got["train_loss"]) != len(stored["train_loss"]):
        problems.append(f"{len(got['train_loss'])} steps ran, the golden file has {len(stored['train_loss'])}")
    for step, (a, b) in enumerate(zip(stored["train_loss"], got["train_loss"]), start=1):
        if not abs(a - b) <= tol:
            problems.append(f"train_loss step {step}: golden {a:.7f}, now {b:.7f} (|diff| {abs(a - b):.2e})")
    a, b = stored["val_loss"], got["val_loss"]
    if not abs(a - b) <= tol:
        problems.append(f"val_loss after step {len(stored['train_loss'])}: golden {a:.7f}, now {b:.7f} "
                        f"(|diff| {abs(a - b):.2e})")
    return problems


def failure_message(stored: dict, problems: List[str]) -> str:
    env = f"torch {torch.__version__} here, {stored['environment']['torch']} in the golden file"
    return (f"the golden loss curve moved beyond {ABS_TOL:g} ({env}):\n  " + "\n  ".join(problems) +
            f"\nIf the change is meant to move the training numbers (model, optimizer, data, loss), regenerate "
            f"the file on purpose with `{REGENERATE}` and commit {GOLDEN.relative_to(REPO)} saying why; otherwise "
            f"the change altered training by accident.")


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or None, "threads": 1,
            "git_commit_before": commit}


# (label, section, changes): small changes of the maths, each run against the golden file by --sensitivity
CHANGES = [("train.micro_batch_size=1 (accumulation 4: same maths, other order)", "train", {"micro_batch_size": 1}),
           ("train.micro_batch_size=4 (no accumulation: same maths, other order)", "train", {"micro_batch_size": 4}),
           ("train.cpu_threads=2", "train", {"cpu_threads": 2}),
           ("model.norm_eps=1e-6 (from 1e-5)", "model", {"norm_eps": 1e-6}),
           ("train.adam_eps=1e-7 (from 1e-8)", "train", {"adam_eps": 1e-7}),
           ("train.lr=3.003e-3 (+0.1%)", "train", {"lr": 3.003e-3})]
# kernel paths other machines take: the same run in a subprocess with these environment variables
KERNEL_PATHS = [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}, {"MKL_CBWR": "COMPATIBLE"},
                {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}]


def max_diffs(stored: dict, got: dict) -> tuple:
    return (max(abs(a - b) for a, b in zip(stored["train_loss"], got["train_loss"])),
            abs(stored["val_loss"] - got["val_loss"]))


def sensitivity(stored: dict) -> None:
    import os

    print(f"| run (vs {GOLDEN.name}) | max train_loss diff | val_loss diff |\n|---|---|---|")
    for env in KERNEL_PATHS:
        out = subprocess.run([sys.executable, __file__], env=dict(os.environ, **env), capture_output=True,
                             text=True, timeout=600).stdout.split()
        label = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"| {label} | {float(out[-2]):.2e} | {float(out[-1]):.2e} |", flush=True)
    for label, section, changes in CHANGES:
        config = copy.deepcopy(CONFIG)
        config[section].update(changes)
        with tempfile.TemporaryDirectory() as tmp:
            d = max_diffs(stored, run_golden(Path(tmp), config))
        print(f"| {label} | {d[0]:.2e} | {d[1]:.2e} |", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regenerate", action="store_true", help=f"rewrite {GOLDEN.name} from this run")
    ap.add_argument("--sensitivity", action="store_true", help="print how far kernel paths and small changes move "
                                                              "the curve")
    args = ap.parse_args(argv)
    if args.sensitivity:
        sensitivity(json.loads(GOLDEN.read_text()))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        got = run_golden(Path(tmp))
    if args.regenerate:
        from lit_gpt.utils import atomic_write_text

        record = {"what": "first train losses of a tiny fixed-seed CPU run, and its validation loss after them",
                  "command": REGENERATE, "check": "python -m pytest -q tests/test_golden_loss.py",
                  "abs_tolerance": ABS_TOL, "environment": environment(), "data": DATA, "config": CONFIG, **got}
        atomic_write_text(GOLDEN, json.dumps(record, indent=1) + "\n")
        print(f"wrote {GOLDEN}: train_loss {['%.4f' % x for x in got['train_loss']]}, val_loss {got['val_loss']:.4f}")
        return 0
    stored = json.loads(GOLDEN.read_text())
    problems = compare(stored, got)
    d = max_diffs(stored, got)
    print(f"max train_loss / val_loss diff: {d[0]:.2e} {d[1]:.2e}")
    if problems:
        print(failure_message(stored, problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
