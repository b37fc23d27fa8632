"""Raw result records: the small JSON files under ``docs/results/`` and ``benchmarks/results/`` that every number
in the README, ``docs/`` and ``scripts/*.md`` is rendered from (see :mod:`lit_gpt.doc_tables`).

A record is ``{"environment": {...}, ...data}``: the command that made it, the git commit, library versions and
the hardware (CPU model and cores, threads, load average at the end, GPU when there is one) next to the numbers.
Drivers write one with ``--record PATH``; keep records small (summaries, per-layer or per-bin lists — never
checkpoints or per-token arrays).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from lit_gpt.utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the working tree (+dirty when tracked files differ). GIT_COMMIT, when set, comes first: a
    tree copied to a GPU box may sit inside another repository's work tree, or have no .git at all."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                         stderr=subprocess.DEVNULL).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                             text=True, stderr=subprocess.DEVNULL).strip())
        return commit + ("+dirty" if dirty else "")
    except Exception:   # no .git
        return "unknown"


def library_versions() -> Dict[str, str]:
    """Installed versions of the libraries a measurement may depend on."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "triton", "lightning", "transformers", "litgpt", "jsonargparse", "liger-kernel", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def environment(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command, commit, versions and hardware of this process."""
    env: Dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name] + list(sys.argv if argv is None else argv)),
        "git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    libs = library_versions()
    if "transformers" in libs:
        env["transformers"] = libs["transformers"]
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    env["libraries"] = libs
    return env


def _rounded(obj: Any, digits: int) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def write_record(path: Union[str, Path], data: Dict[str, Any], *, digits: int = 7,
                 argv: Optional[Sequence[str]] = None) -> Path:
    """Write ``{"environment": ..., **data}`` atomically as indented JSON; floats keep ``digits`` significant
    digits (enough for any table, and the file stays small and diff-able)."""
    if "environment" in data:
        raise ValueError("record data must not have an 'environment' key (it is added here)")
    path = Path(path)
    record = {"environment": environment(argv), **_rounded(data, digits)}
    atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote record {path}", file=sys.stderr)
    return path
