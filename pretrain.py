"""Pretrain a lit_gpt model from a run YAML (see lit_gpt/run_config.py and docs/pretraining.md).

    python pretrain.py --config configs/tinyllama_60m.yaml
    python pretrain.py --config configs/window/tinyllama_60m_window256.yaml train.devices=8 train.micro_batch_size=8
    python pretrain.py --config configs/demo_cpu.yaml --print_config
    python pretrain.py --config configs/tinyllama_60m.yaml --profile 60 train.out_dir=/tmp/prof   # where time goes

Overrides are ``section.key=value`` (or ``--section.key value``), values parsed as YAML. Several GPUs:
``train.devices=N`` (DDP by default, ``train.strategy=fsdp`` to shard); several nodes: launch this script on
each node with torchrun (or SLURM) and set ``train.num_nodes``. Bad input is reported in one line before any
work, with exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_gpt.config import ConfigError  # noqa: E402
from lit_gpt.data import DataError  # noqa: E402
from lit_gpt.packed import ShardError  # noqa: E402
from lit_gpt.run_config import RunConfigError, load_run_config  # noqa: E402
from lit_gpt.trainer import PreflightError, fit, preflight  # noqa: E402
from lit_gpt.utils import ArgumentParser  # noqa: E402

INPUT_ERRORS = (RunConfigError, PreflightError, ConfigError, DataError, ShardError)


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="run YAML (configs/...)")
    ap.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--profile", nargs="?", type=int, const=40, default=None, metavar="STEPS",
                    help="benchmark mode: train STEPS steps (default 40; no checkpoints), time the second half by "
                         "phase (data, forward+backward, optimizer, logging, evaluation) and the bare optimizer step "
                         "on a fixed batch; prints the table and writes <out_dir>/profile.json")
    args, overrides = ap.parse_known_args(argv)
    if args.profile is not None:
        overrides = overrides + ["train.profile=true", f"train.max_steps={args.profile}"]
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)     # progress lines reach `| tee` logs as they happen
    try:
        cfg = load_run_config(args.config, overrides)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        plan = preflight(cfg)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = fit(cfg, plan)
    except INPUT_ERRORS as e:        # found after launch (e.g. batch sizes vs. world size)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) != 0:
        return 0
    final = summary["final"]
    print(f"done: step {summary['step']}, train_loss {final.get('train_loss', float('nan')):.4f}, "
          f"val_loss {final.get('val_loss', float('nan')):.4f} ({summary.get('val_loss_domain')}), "
          f"Sink_1 {final.get('sink_1', float('nan')):.2f}%; "
          f"{summary['out_dir']}/summary.json, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
