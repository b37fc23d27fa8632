"""Small shared helpers: atomic writes, device/dtype parsing, the "did you mean" hint of every unknown-name error,
an argument parser that gives it, and the progress bar of the command-line drivers."""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)      # mkstemp makes 0600 files; give the usual umask permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write text so that a crash leaves either the old file or the new one, never a torn one."""
    _atomic_replace(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(path: Union[str, Path], fill: Callable[[Path], None]) -> None:
    """Write a folder so that a crash leaves either the old folder or the new one, never a torn one: ``fill(tmp)``
    writes the files into a hidden folder beside ``path``, which is synced and renamed to ``path``. An existing
    ``path`` is first renamed aside (and put back if the rename fails), then removed. What a crashed write of the
    same name left is cleaned up first: half-written folders are removed, a folder renamed aside goes back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in path.parent.glob(f".{path.name}.old-*"):
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
        else:
            os.replace(aside, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent)))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)      # mkdtemp makes 0700 folders; give the usual umask permissions
        fill(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp)
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(invalid_choice("dtype", name, DTYPES))
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_writable_dir(path: Union[str, Path]) -> None:
    """Create ``path`` if needed and prove a file can be written there; raises OSError (with its reason) if not."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


# ---------------------------------------------------------------------------- unknown names
def did_you_mean(word: Any, choices: Iterable[Any], n: int = 3) -> str:
    """`` (did you mean a, b?)`` naming up to ``n`` of ``choices`` closest to ``word`` (difflib's similarity ratio
    >= 0.6, as ``difflib.get_close_matches``; best first, ties in the given order), ``""`` when none is close: the
    hint every unknown-name error of the repo carries."""
    word, scored = str(word), []
    for i, c in enumerate(dict.fromkeys(str(c) for c in choices)):
        ratio = difflib.SequenceMatcher(None, c, word).ratio()
        if ratio >= 0.6:
            scored.append((-ratio, i, c))
    close = [c for _, _, c in sorted(scored)[:n]]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def invalid_choice(name: str, value: Any, allowed: Union[str, Iterable[Any]]) -> str:
    """The one-line error for a bad value: ``name=value is invalid (did you mean ...); allowed: a, b, c`` for a
    value outside a fixed set (the allowed values in their given order), ``name=value is invalid; allowed: RULE``
    when ``allowed`` is one string saying which values are (``"an integer >= 0"``; no did-you-mean hint)."""
    if isinstance(allowed, str):
        return f"{name}={value!r} is invalid; allowed: {allowed}"
    allowed = [str(a) for a in allowed]
    return f"{name}={value!r} is invalid{did_you_mean(value, allowed)}; allowed: {', '.join(allowed)}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the repo's error for a value outside ``choices``: ``argument --x: invalid choice 'snk' (did
    you mean sink?); allowed: ...`` instead of argparse's bare list. Raw-description help by default (the
    drivers' docstrings are their examples)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action, value) -> None:
        if action.choices is not None and value not in action.choices:
            allowed = [str(c) for c in action.choices]
            raise argparse.ArgumentError(action, f"invalid choice {value!r}{did_you_mean(value, allowed)}; "
                                                 f"allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------- progress
def progress_bar(total: Optional[int] = None, desc: str = "", *, quiet: bool = False, unit: str = "it", **kwargs):
    """The drivers' progress bar (tqdm on stderr): off with ``quiet`` and whenever stderr is not a terminal (logs
    and CI get the drivers' summary lines only). Closes itself when used as a context manager."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if quiet else None, **kwargs)
