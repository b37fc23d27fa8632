"""Safe, self-describing checkpoints: safetensors for the tensors, JSON for everything else, no pickle.

A checkpoint is a folder (training writes ``<out_dir>/step-XXXXXXX/`` and ``<out_dir>/final/``)::

    model.safetensors         the weights; its metadata repeats the format and the model config
    checkpoint.json           {"format", "version", "model_config", "run_config", "step", "tokens_seen",
                              "train_seconds", "scheduler", "data_state", "rng", "optimizer", ...}: every value
                              that is not a tensor, with {"__tensor__": key} where a tensor of
                              train_state.safetensors belongs (tuples and non-string dict keys, as in an
                              optimizer state, are tagged {"__tuple__": [...]} / {"__items__": [[k, v], ...]})
    train_state.safetensors   the optimizer moments and the RNG states (training checkpoints only)

Opening a checkpoint someone shared cannot run code (a pickle can: ``torch.load(weights_only=False)`` executes
whatever the file names), the weights load without copying (safetensors maps the file), and any language reads
them. The folder is written next to its place and renamed into it (:func:`lit_gpt.utils.atomic_write_dir`), so
a crash leaves the previous checkpoint or the new one, never a torn one.

:func:`load_model` accepts a checkpoint folder or a run folder (it then takes ``final/`` if present, else the
highest ``step-XXXXXXX/``). Anything else gets one line saying what it is: an old pickle checkpoint (``.pth``,
written before this format) names the converter, ``python -m lit_gpt.checkpoint convert OLD.pth`` (or a run
folder: every ``*.pth`` in it), which reads the old file with ``torch.load(weights_only=True)`` and an
allow-list of the numpy types its RNG state holds, so converting does not run code either.

Checkpoints written before issue #8 changed two variants are recognised: a ``pos_encoding: relative``
checkpoint holding the learned T5 table (``rel_bias.embedding.weight``) loads as ``relative_learned`` (what it
was trained as), with a warning; a post-norm checkpoint holding a final norm ``ln_f`` is refused with a one-line
reason (post-norm models no longer have one, as in the seed, so no config computes what it was trained as).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from lit_gpt.config import Config
from lit_gpt.utils import ArgumentParser, atomic_write_dir

if TYPE_CHECKING:
    from lit_gpt.model import GPT

FORMAT = "lit_gpt.checkpoint"
VERSION = 2                       # 1 was a single torch.save pickle (``final.pth``)
MODEL_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
STATE_FILE = "train_state.safetensors"
FINAL = "final"
STEP_RE = re.compile(r"^step-(\d+)$")
LEGACY_SUFFIX = ".pth"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_RESERVED = ("format", "version", "model_config", "model", "aliases", "_path")


class CheckpointError(ValueError):
    """A path that is not a readable lit_gpt checkpoint; the message is one line saying what it is instead."""


def step_name(step: int) -> str:
    """The folder name of the checkpoint after optimizer step ``step``."""
    return f"step-{step:07d}"


def model_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict without torch.compile / DDP prefixes."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ---------------------------------------------------------------------------- JSON + tensors
def _encode(obj: Any, tensors: Dict[str, torch.Tensor], path: Tuple[str, ...]) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (named by where they were) and referenced."""
    if isinstance(obj, torch.Tensor):
        key = "/".join(path) or "tensor"
        if key in tensors:
            key = f"{key}#{len(tensors)}"
        tensors[key] = obj
        return {_TENSOR: key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, path + (str(i),)) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, path + (str(i),)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        tagged = len(obj) == 1 and next(iter(obj)) in (_TENSOR, _TUPLE, _ITEMS)
        if all(isinstance(k, str) for k in obj) and not tagged:
            return {k: _encode(v, tensors, path + (k,)) for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors, path + ("key",)), _encode(v, tensors, path + (str(k),))]
                         for k, v in obj.items()]}
    raise CheckpointError(f"cannot store {'.'.join(path) or 'value'} ({type(obj).__name__}) in a checkpoint; allowed: "
                          "tensors, numbers, strings, None, and lists / tuples / dicts of them")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, v), = obj.items()
            if tag == _TENSOR:
                return tensors[v]
            if tag == _TUPLE:
                return tuple(_decode(x, tensors) for x in v)
            if tag == _ITEMS:
                return {_decode(a, tensors): _decode(b, tensors) for a, b in v}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, dict):
        return (len(obj) == 1 and _TENSOR in obj) or any(_holds_tensor(v) for v in obj.values())
    return isinstance(obj, list) and any(_holds_tensor(v) for v in obj)


def _storable(tensors: Dict[str, torch.Tensor], dedupe: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """CPU, contiguous tensors that do not share memory (safetensors' rule). With ``dedupe``, a tensor that is
    exactly another one (tied embeddings) is stored once and returned in the alias map {name: stored name}."""
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    storages = set()
    for k, t in tensors.items():
        t = t.detach()
        if t.numel():
            sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                   t.dtype)
            if dedupe and sig in seen:
                aliases[k] = seen[sig]
                continue
            seen[sig] = k
        t = t.cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and (ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()               # a view into memory another tensor (or nothing) also uses
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[k] = t
    return out, aliases


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """The torch / numpy / python (and CUDA) RNG states as tensors and JSON values."""
    npst = np.random.get_state(legacy=False)
    version, mt, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"bit_generator": npst["bit_generator"], "key": npst["state"]["key"].tolist(),
                    "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                    "gauss": float(npst["gauss"])},
          "python": {"version": version, "state": list(mt), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


def _rng_from_legacy(st: dict) -> dict:
    """The RNG record of a version-1 checkpoint (numpy's and python's state tuples) in today's form."""
    name, key, pos, has_gauss, gauss = st["numpy"]
    version, mt, gauss_next = st["python"]
    out = {"torch": st["torch"],
           "numpy": {"bit_generator": str(name), "key": np.asarray(key).tolist(), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)},
           "python": {"version": version, "state": list(mt), "gauss_next": gauss_next}}
    if "cuda" in st:
        out["cuda"] = list(st["cuda"])
    return out


# ---------------------------------------------------------------------------- write
def write_checkpoint(path: Union[str, Path], state_dict: Dict[str, torch.Tensor], config: Union[Config, dict],
                     **extra: Any) -> Path:
    """Atomically write the checkpoint folder ``path``: the weights, ``model_config`` and ``extra`` (run config,
    optimizer state, RNG, counters: anything :func:`_encode` takes). Returns ``path``."""
    path = Path(path)
    if path.suffix == LEGACY_SUFFIX:
        raise CheckpointError(f"checkpoint path {str(path)!r} ends in {LEGACY_SUFFIX}: checkpoints are folders now "
                              f"(e.g. {path.with_suffix('').name}/ holding {MODEL_FILE} + {META_FILE})")
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise CheckpointError(f"write_checkpoint: {clash} are reserved names in {META_FILE}")
    model_config = config.to_dict() if isinstance(config, Config) else dict(config)

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        weights, aliases = _storable(state_dict, dedupe=True)
        tensors: Dict[str, torch.Tensor] = {}
        meta = {"format": FORMAT, "version": VERSION, **_encode({"model_config": model_config}, tensors, ()),
                "aliases": aliases, **_encode(extra, tensors, ())}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": FORMAT, "version": str(VERSION),
                                                             "model_config": json.dumps(meta["model_config"]),
                                                             "aliases": json.dumps(aliases)})
        if tensors:
            save_file(_storable(tensors, dedupe=False)[0], str(tmp / STATE_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    atomic_write_dir(path, fill)
    return path


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, config: Config, **extra: Any) -> Path:
    return write_checkpoint(path, model_state_dict(model), config, **extra)


def delete_checkpoint(path: Union[str, Path]) -> None:
    """Remove a checkpoint folder: renamed to a hidden name first, so no half-deleted folder looks like one."""
    path = Path(path)
    if not path.exists():
        return
    gone = path.with_name(f".{path.name}.deleted-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------------------- find
def step_checkpoints(folder: Union[str, Path]) -> List[Path]:
    """``step-XXXXXXX/`` checkpoint folders of a run folder, newest (highest step) first."""
    found = ((int(m.group(1)), p) for p in Path(folder).glob("step-*") if p.is_dir() and (m := STEP_RE.match(p.name)))
    return [p for _, p in sorted(found, reverse=True)]


def list_checkpoints(folder: Union[str, Path]) -> List[Path]:
    """``final/`` (if any), then the step checkpoints newest first."""
    final = Path(folder) / FINAL
    return ([final] if final.is_dir() else []) + step_checkpoints(folder)


def legacy_checkpoints(folder: Union[str, Path], unconverted: bool = False) -> List[Path]:
    """The old pickle checkpoints (``*.pth``) of a folder; with ``unconverted``, only those without a converted
    folder of the same name beside them."""
    found = sorted(Path(folder).glob(f"*{LEGACY_SUFFIX}"))
    return [p for p in found if not (unconverted and (p.with_suffix("") / META_FILE).is_file())]


def is_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is meant as one of our checkpoints (a checkpoint or run folder, a file inside one, or an
    old ``.pth``), so that loaders send it to :func:`load_model` (and its errors), not to Hugging Face."""
    path = Path(path)
    if path.is_file():
        return path.suffix == LEGACY_SUFFIX or (path.parent / META_FILE).is_file()
    return path.is_dir() and ((path / META_FILE).is_file() or bool(list_checkpoints(path))
                              or bool(legacy_checkpoints(path)))


def _legacy_error(what: Path, files: List[Path]) -> CheckpointError:
    names = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
    return CheckpointError(f"{what} holds a pickle checkpoint ({names}: torch.save, lit_gpt's format before "
                           f"safetensors), which lit_gpt no longer opens because unpickling can run code; convert "
                           f"one you trust with: python -m lit_gpt.checkpoint convert {what}")


def _not_a_checkpoint(file: Path) -> CheckpointError:
    with open(file, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":          # torch.save's zip, or a bare pickle
        return _legacy_error(file, [file])
    return CheckpointError(f"{file} is not a lit_gpt checkpoint; expected a folder holding {META_FILE} + {MODEL_FILE} "
                           "(or a run folder holding final/ or step-XXXXXXX/)")


def find_checkpoint(path: Union[str, Path]) -> Path:
    """The checkpoint folder ``path`` names: itself, the folder of a file inside it, or the newest checkpoint of
    a run folder. Raises FileNotFoundError, or CheckpointError (one line) for anything that is not ours."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if (path.parent / META_FILE).is_file() and path.name in (META_FILE, MODEL_FILE, STATE_FILE):
            return path.parent
        raise _not_a_checkpoint(path)
    if (path / META_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[0]
    if path.name == FINAL or STEP_RE.match(path.name):
        raise CheckpointError(f"{path} is an incomplete checkpoint: no {META_FILE} (a copy cut short?)")
    legacy = legacy_checkpoints(path)
    if legacy:
        raise _legacy_error(path, legacy)
    inner = [p for p in path.iterdir() if (p / META_FILE).is_file()]
    if len(inner) == 1:
        return inner[0]
    if (path / MODEL_FILE).is_file() or (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a lit_gpt checkpoint (no {META_FILE}); a Hugging Face model folder? "
                              "load it with lit_gpt.hf.load_hf")
    raise FileNotFoundError(f"no checkpoint in {path}: expected {META_FILE} + {MODEL_FILE}, or a run folder holding "
                            "final/ or step-XXXXXXX/")


def _upgrade_legacy(payload: Dict[str, Any]) -> None:
    """Rename what an older version called the variant a checkpoint was trained as (see the module docstring)."""
    mc = payload["model_config"]
    learned_table = "rel_bias.embedding.weight" in payload["model"]
    if isinstance(mc, dict) and mc.get("pos_encoding") == "relative" and learned_table:
        mc["pos_encoding"] = "relative_learned"
        warnings.warn(f"{payload['_path']}: pos_encoding='relative' with a learned bucket table is what is now "
                      "called 'relative_learned' ('relative' is the paper's fixed bucket bias); loading it as "
                      "relative_learned",
                      stacklevel=2)


def check_state_keys(config: Config, missing, unexpected, where: str) -> Optional[str]:
    """One line describing why a state dict does not fit a model of ``config`` (None when it fits)."""
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if not missing and not unexpected:
        return None
    msg = f"{where}: weights do not match the config: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
    if config.norm_position == "post" and any(k.startswith("ln_f.") for k in unexpected):
        msg += ("; it has a final norm ln_f, which post-norm models no longer apply (the seed's model_postln.py has "
                "none): it was trained as another function and no config of this version computes it")
    return msg


# ---------------------------------------------------------------------------- load
def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / META_FILE} cannot be read ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META_FILE} is not a lit_gpt checkpoint record (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CheckpointError(f"{folder} is checkpoint format version {meta.get('version')!r}; this lit_gpt reads "
                              f"versions up to {VERSION} (update lit_gpt)")
    return meta


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
                    train_state: bool = True) -> Dict[str, Any]:
    """The checkpoint as a dict: ``model`` (state dict), ``model_config``, what training stored (``run_config``,
    ``optimizer``, ``rng``, ``step``, ...) and ``_path`` (the folder). ``train_state=False`` leaves out the
    entries that hold tensors of ``train_state.safetensors`` (optimizer, RNG) and does not read that file."""
    from safetensors.torch import load_file

    folder = find_checkpoint(path)
    meta = _read_meta(folder)
    device = str(map_location)
    tensors = {}
    if not train_state:
        meta = {k: v for k, v in meta.items() if not _holds_tensor(v)}
    elif (folder / STATE_FILE).is_file():
        tensors = load_file(str(folder / STATE_FILE), device=device)
    payload = _decode(meta, tensors)
    aliases = payload.pop("aliases", {})
    for k in ("format", "version"):
        payload.pop(k)
    weights = load_file(str(folder / MODEL_FILE), device=device)
    for name, stored in aliases.items():
        weights[name] = weights[stored]
    payload["model"] = weights
    payload["_path"] = str(folder)
    _upgrade_legacy(payload)
    return payload


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, **config_overrides: Any) -> Tuple["GPT", Dict[str, Any]]:
    """Build the model described by a checkpoint and load its weights. Returns (model in eval mode, payload
    without the weights). ``config_overrides`` change inference-only fields (e.g. attn_impl="eager")."""
    from lit_gpt.model import GPT

    payload = load_checkpoint(path, train_state=False)
    config = Config.from_dict(dict(payload["model_config"], **config_overrides), where=payload["_path"])
    model = GPT(config)
    missing, unexpected = model.load_state_dict(payload.pop("model"), strict=False)
    problem = check_state_keys(config, missing, unexpected, payload["_path"])
    if problem:
        raise ValueError(problem)
    model.to(device=device, dtype=dtype).eval()
    for k in ("optimizer", "scheduler"):
        payload.pop(k, None)
    return model, payload


def checkpoint_tokenizer(payload: Dict[str, Any]) -> Optional[str]:
    """The tokenizer a checkpoint names: its training run's ``data.tokenizer``, else a ``tokenizer`` entry of a
    hand-written run record (None when it names none)."""
    rc = payload.get("run_config") or {}
    return (rc.get("data") or {}).get("tokenizer") or rc.get("tokenizer")


# ---------------------------------------------------------------------------- old checkpoints
def _numpy_allow_list() -> list:
    """What a version-1 checkpoint's numpy RNG state pickles, under the names numpy 1.x and 2.x write."""
    try:
        from numpy._core import multiarray
    except ImportError:                 # numpy < 2
        from numpy.core import multiarray

    dtypes = [type(np.dtype(t)) for t in ("bool", "uint8", "int32", "uint32", "int64", "uint64", "float32", "float64")]
    return [np.ndarray, np.dtype, *dtypes, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]


def _unpickle_legacy(file: Path, trust_pickle: bool) -> dict:
    if trust_pickle:
        payload = torch.load(file, map_location="cpu", weights_only=False)
    else:
        try:
            with torch.serialization.safe_globals(_numpy_allow_list()):
                payload = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            extra = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
            raise CheckpointError(f"{file} holds more than tensors, numbers and numpy arrays "
                                  f"({', '.join(extra) or type(e).__name__}); convert it with --trust-pickle only "
                                  "if you trust where it came from (that runs the code it names)") from e
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{file} is not a lit_gpt checkpoint: expected a dict with 'model' and 'model_config'")
    return payload


def convert_legacy(src: Union[str, Path], out: Union[str, Path, None] = None, trust_pickle: bool = False) -> List[Path]:
    """Convert version-1 pickle checkpoints to checkpoint folders: ``src`` one ``.pth`` (to ``out``, default the
    same name without ``.pth``) or a run folder (each ``*.pth`` beside itself). The old files are kept; existing
    folders are not overwritten. Returns the folders written."""
    src = Path(src)
    if src.is_dir():
        pairs = [(f, f.with_suffix("")) for f in legacy_checkpoints(src)]
        if not pairs:
            raise CheckpointError(f"{src} holds no *{LEGACY_SUFFIX} checkpoint to convert")
    elif src.is_file():
        pairs = [(src, Path(out) if out else src.with_suffix(""))]
    else:
        raise FileNotFoundError(f"checkpoint not found: {src}")
    written = []
    for file, target in pairs:
        if target.exists():
            raise CheckpointError(f"{target} exists; nothing was overwritten (remove it or pass another --out)")
        payload = _unpickle_legacy(file, trust_pickle)
        model, model_config = payload.pop("model"), payload.pop("model_config")
        if "rng" in payload:
            payload["rng"] = _rng_from_legacy(payload["rng"])
        payload = {k: v for k, v in payload.items() if k not in _RESERVED}
        written.append(write_checkpoint(target, model, model_config, **payload))
    return written


def main(argv: Optional[List[str]] = None) -> int:
    ap = ArgumentParser(description="lit_gpt checkpoints: convert old pickle (.pth) checkpoints to "
                                             "safetensors checkpoint folders")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("convert", help="OLD.pth -> OLD/ (or every *.pth of a run folder); the old files are kept")
    cv.add_argument("src", help="a .pth checkpoint or a run folder holding them")
    cv.add_argument("--out", default=None, help="target folder (one file only; default: the name without .pth)")
    cv.add_argument("--trust-pickle", action="store_true",
                    help="unpickle without the allow-list (runs any code the file names: trusted files only)")
    args = ap.parse_args(argv)
    try:
        for p in convert_legacy(args.src, args.out, trust_pickle=args.trust_pickle):
            print(f"wrote {p}")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
