"""Train rows of the reproduction study (issue #10) and write one raw record per run.

    python scripts/repro_run.py --regime cpu default sigmoid_no_norm k_bias        # two at a time, 1 thread each
    python scripts/repro_run.py --regime cpu --all                                 # every row with a cpu config
    python scripts/repro_run.py --regime gpu default --runs /tmp/w --results $OUT/results --set train.max_time_s=150
    python scripts/repro_run.py --explore checkpoints/x/run1 checkpoints/x/run2 --why "killed: flat"  # exploration log

A row ``R`` of regime ``G`` is the run YAML ``configs/repro/G/R.yaml`` (rows and their paper references:
``scripts/repro_rows.yaml``). Each run trains with ``pretrain.py`` into ``<runs>/G/R`` (a fresh folder) and its
record (``lit_gpt.repro``: config, command, hardware, curve, final numbers) goes to ``<results>/G/R.json``.
``scripts/repro_tables.py`` turns the records into the tables of ``scripts/*.md`` and the plots of
``docs/img/``. On a CPU, ``--parallel 2 --threads 1`` (the default) runs two single-threaded trainings side by
side, which is faster than one two-threaded run for these tiny models.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_gpt.repro import RecordError, add_exploration, build_record, final_checks, write_record  # noqa: E402
from lit_gpt.utils import ArgumentParser  # noqa: E402

CONFIGS = REPO / "configs" / "repro"


def row_config(regime: str, row: str, configs: Path = CONFIGS) -> Path:
    return configs / regime / f"{row}.yaml"


def available_rows(regime: str, configs: Path = CONFIGS) -> List[str]:
    return sorted(p.stem for p in (configs / regime).glob("*.yaml"))


def shown_path(p: Path) -> str:
    """A config path as the command shows it: relative to the repository when it is inside it."""
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def ensure_data(config: Path, sets: Sequence[str]) -> None:
    """Build a missing ``datasets/demo_cpu*/packed`` folder (bytes, at the config's block size:
    preprocess/demo_corpus.py): the first Gutenberg books of ../shared for ``demo_cpu_gutenberg``, else the
    standard-library docstring corpus; any other missing data folder is left to pretrain.py's preflight, which
    names it."""
    from lit_gpt.run_config import load_run_config

    cfg = load_run_config(config, list(sets))
    train_dir = Path(cfg.data.train_dir)
    if not train_dir.is_absolute():
        train_dir = REPO / train_dir
    if train_dir.is_dir() or not train_dir.parent.name.startswith("demo_cpu") or cfg.data.tokenizer != "bytes":
        return
    from preprocess.demo_corpus import build

    block = cfg.model_config().block_size
    source = "gutenberg" if train_dir.parent.name == "demo_cpu_gutenberg" else "stdlib"
    print(f"building {train_dir} ({source} corpus, bytes, block {block})", flush=True)
    build(str(train_dir.parent), source=source, block_size=block, tokenizer="bytes")


def pretrain_command(python: str, config: Path, out_dir: Path, threads: Optional[int],
                     sets: Sequence[str]) -> List[str]:
    cmd = [python, "pretrain.py", "--config", shown_path(config),
           f"train.out_dir={shown_path(out_dir)}", "train.resume=false", "logging.progress=false"]
    if threads:
        cmd.append(f"train.cpu_threads={threads}")
    return cmd + list(sets)


def finish_record(rec: dict, run_dir: Path, results: str) -> Path:
    """Add the measurements a record needs beyond the training log, then write it."""
    rec["final"].update(final_checks(run_dir))
    return write_record(rec, results)


def rerecord(rows: Sequence[str], regime: str, configs: Path, runs_root: Path, results: str, note: str) -> int:
    import json

    for row in rows:
        run = runs_root / row
        old_path = Path(results) / regime / f"{row}.json"
        old = json.loads(old_path.read_text()) if old_path.is_file() else {}
        rec = build_record(run, row=row, regime=regime, config=shown_path(row_config(regime, row, configs)),
                           overrides=old.get("overrides", []), command=old.get("command", "(unknown)"),
                           wall_seconds=old.get("wall_seconds"), note=note or old.get("hardware", {}).get("note", ""))
        print(f"[{row}] re-recorded -> {finish_record(rec, run, results)}")
    return 0


def import_runs(folder: Path, regime: str, configs: Path, results: str, command: Optional[str], note: str) -> int:
    """Records for run folders fetched from another machine (their summary.json says what and where): ``folder``
    holds ``<row>/summary.json`` and ``<row>/metrics.csv``, or is a ``.tar.gz`` of such folders (the device script's
    ``runs.tar.gz``), unpacked into a temporary folder."""
    if folder.is_file():
        import tarfile
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, tarfile.open(folder) as tar:
            tar.extractall(tmp, filter="data")
            return import_runs(Path(tmp), regime, configs, results, command, note)
    found = sorted(p.parent for p in folder.glob("*/summary.json"))
    if not found:
        print(f"error: no <row>/summary.json under {folder}", file=sys.stderr)
        return 2
    for run in found:
        row = run.name
        if not row_config(regime, row, configs).is_file():
            print(f"error: {run}: no config {row_config(regime, row, configs)} for row {row!r}", file=sys.stderr)
            return 2
        rec = build_record(run, row=row, regime=regime, config=shown_path(row_config(regime, row, configs)),
                           command=command or f"(imported from {folder})", note=note)
        print(f"[{row}] {rec['steps']} steps, Sink_1={rec['final']['sink'][0]:.1f}% -> "
              f"{finish_record(rec, run, results)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("rows", nargs="*", help="row ids (configs/repro/<regime>/<row>.yaml)")
    ap.add_argument("--regime", default="cpu")
    ap.add_argument("--configs", default=str(CONFIGS), help="row configs: <configs>/<regime>/<row>.yaml")
    ap.add_argument("--all", action="store_true", help="every row of the regime")
    ap.add_argument("--parallel", type=int, default=2, help="runs at the same time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run on a CPU (0: torch's default)")
    ap.add_argument("--runs", default="checkpoints/repro", help="run folders go to <runs>/<regime>/<row>")
    ap.add_argument("--results", default="docs/results/repro", help="records go to <results>/<regime>/<row>.json")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="an override for every run, e.g. --set train.max_time_s=60 (repeatable)")
    ap.add_argument("--note", default="", help="a note stored with the hardware (e.g. 'shared machine')")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--import", dest="import_dir", default=None,
                    help="record runs made elsewhere (e.g. the GPU box): DIR/<row>/{summary.json,metrics.csv} or a "
                         ".tar.gz of them")
    ap.add_argument("--command", default=None, help="with --import: the command that made those runs")
    ap.add_argument("--rerecord", action="store_true",
                    help="no training: rebuild the records of the given rows from their run folders under --runs "
                         "(keeping the command and wall time of the previous record)")
    ap.add_argument("--explore", nargs="+", default=None, metavar="RUN_DIR",
                    help="no training: add these exploratory run folders (finished or not) to "
                         "<results>/exploration.json (the exploration table of docs/repro.md)")
    ap.add_argument("--why", default="", help="with --explore: why the runs stopped, for those that did not finish")
    a = ap.parse_args(argv)
    if a.explore:
        try:
            names = add_exploration(Path(a.results) / "exploration.json", a.explore, a.why)
        except (RecordError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"added to {Path(a.results) / 'exploration.json'}: {', '.join(names)}")
        return 0
    if a.import_dir:
        return import_runs(Path(a.import_dir), a.regime, Path(a.configs), a.results, a.command, a.note)

    configs = Path(a.configs)
    known = available_rows(a.regime, configs)
    if not known:
        ap.error(f"--regime {a.regime!r}: no configs under {configs / a.regime}")
    rows = known if a.all else list(a.rows)
    bad = [r for r in rows if r not in known]
    if bad or not rows:
        ap.error(f"rows {bad or '(none)'} are invalid; allowed: {', '.join(known)} (or --all)")
    if a.parallel < 1:
        ap.error("--parallel must be >= 1")

    runs_root = Path(a.runs).resolve() / a.regime
    if a.rerecord:
        return rerecord(rows, a.regime, configs, runs_root, a.results, a.note)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    pending = list(rows)
    running: Dict[str, tuple] = {}
    failed: List[str] = []
    while pending or running:
        while pending and len(running) < a.parallel:
            row = pending.pop(0)
            out_dir = runs_root / row
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True)
            ensure_data(row_config(a.regime, row, configs), a.sets)
            cmd = pretrain_command(a.python, row_config(a.regime, row, configs), out_dir, a.threads, a.sets)
            log = open(runs_root / f"{row}.log", "w")
            print(f"[{row}] start: {shlex.join(cmd)}", flush=True)
            running[row] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
                            time.time(), cmd, log, out_dir)
        time.sleep(1.0)
        for row in list(running):
            proc, t0, cmd, log, out_dir = running[row]
            if proc.poll() is None:
                continue
            log.close()
            del running[row]
            wall = time.time() - t0
            if proc.returncode != 0:
                failed.append(row)
                print(f"[{row}] FAILED (exit {proc.returncode}); see {runs_root / (row + '.log')}", flush=True)
                continue
            shown = [Path(cmd[0]).name] + cmd[1:]
            try:
                rec = build_record(out_dir, row=row, regime=a.regime,
                                   config=shown_path(row_config(a.regime, row, configs)), overrides=a.sets,
                                   command=shlex.join(shown), wall_seconds=round(wall, 1), note=a.note)
            except RecordError as e:
                failed.append(row)
                print(f"[{row}] no record: {e}", flush=True)
                continue
            path = finish_record(rec, out_dir, a.results)
            f = rec["final"]
            extra = "".join(f" Sink_1*={v:.1f}%" for v in f["sink_extra"] if v is not None)
            print(f"[{row}] done in {wall:.0f} s: {rec['steps']} steps, {rec['tokens']:,} tokens, "
                  f"val_loss {f['val_loss']:.3f}, Sink_1={f['sink'][0]:.1f}%{extra} -> {path}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
