"""What the open-source analysis drivers share: the model list, the common options, one model at a time with
memory freed and failures recorded (a sweep of 30 models goes on past one that fails), resuming, and the
results table (markdown + JSON + CSV)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lit_gpt.utils import atomic_write_text


def add_common_args(ap: argparse.ArgumentParser, default_out: str, default_inputs: Sequence[str]) -> None:
    from lit_gpt.probe import DEFAULT_PROBE, INPUT_KINDS
    from lit_gpt.utils import DTYPES

    ap.add_argument("--models", nargs="+", default=None,
                    help="Hub ids, local model folders or .gguf files (default: the seed's pool of 30 models)")
    ap.add_argument("--models-file", default=None, help="YAML (a list, or {models: [...]}) or text file, one per line")
    ap.add_argument("--gguf-file", default=None, help="GGUF file name inside a given folder or Hub repo")
    ap.add_argument("--inputs", nargs="+", default=list(default_inputs), choices=INPUT_KINDS)
    ap.add_argument("--probe", default=str(DEFAULT_PROBE), help="natural-text JSONL probe file")
    ap.add_argument("--n", type=int, default=100, help="samples per input")
    ap.add_argument("--T", type=int, default=64,
                    help="tokens per sample (natural text: BOS included when the tokenizer adds one; random / "
                         "repeated: T tokens, no BOS)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random / repeated inputs")
    ap.add_argument("--repeat-token", type=int, default=None,
                    help="token id for the repeated input (default: a random token per sample)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a large model over GPUs")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--record", default=None,
                    help="also write the compact raw record of every model under --out to this JSON (e.g. "
                         "docs/results/<name>.json; lit_gpt.results), the file the docs' tables render from")
    ap.add_argument("--overwrite", action="store_true", help="recompute models whose results already exist")
    ap.add_argument("--bos-control", action="store_true",
                    help="a control, not the paper's input: random / repeated inputs start with the ids the "
                         "tokenizer puts before text (BOS for Gemma/Llama; nothing for GPT-2/SmolLM2), then T-1 "
                         "tokens; shows whether a model's sink sits on BOS rather than on position 1")


def model_list(args) -> List[str]:
    from lit_gpt.hf import DEFAULT_POOL

    if args.models and args.models_file:
        raise SystemExit("give --models or --models-file, not both")
    if args.models_file:
        path = Path(args.models_file)
        if not path.is_file():
            raise SystemExit(f"--models-file={str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(text)
            data = data.get("models") if isinstance(data, dict) else data
            if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
                raise SystemExit(f"--models-file={str(path)!r}: expected a list of model ids (or {{models: [...]}})")
            return data
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return list(args.models or DEFAULT_POOL)


def model_label(spec: str) -> str:
    """A file-system-safe short name: the Hub repo name, the folder name or the GGUF file stem."""
    p = Path(spec)
    name = p.stem if p.suffix.lower() == ".gguf" else p.name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def run_sweep(specs: Sequence[str], out: Path, done: Callable[[Path], bool],
              run_one: Callable[[str, Path], None], overwrite: bool = False) -> int:
    """Call ``run_one(spec, folder)`` for each model not ``done`` yet; errors go to folder/error.txt and the sweep
    continues. Returns the number of failed models."""
    from lit_gpt.hf import free_model

    failed = 0
    labels = [model_label(s) for s in specs]
    dupes = {x for x in labels if labels.count(x) > 1}
    if dupes:
        raise SystemExit(f"models with the same short name {sorted(dupes)}: results would overwrite each other")
    for spec, label in zip(specs, labels):
        folder = out / label
        if not overwrite and done(folder):
            print(f"[{label}] results exist, skipped (--overwrite recomputes)", flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").unlink(missing_ok=True)
        t0 = time.time()
        try:
            run_one(spec, folder)
            print(f"[{label}] done in {time.time() - t0:.0f} s", flush=True)
        except Exception as e:          # one model's failure must not stop a 30-model sweep
            failed += 1
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            print(f"[{label}] FAILED: {type(e).__name__}: {e}", flush=True)
        finally:
            free_model()
    return failed


def write_table(rows: List[Dict], columns: Sequence[str], out: Path, stem: str = "summary",
                meta: Optional[dict] = None, floatfmt: str = "{:.2f}") -> None:
    """rows -> out/stem.md, out/stem.json, out/stem.csv (atomic)."""
    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    if meta:
        md += ["", "; ".join(f"{k}: {v}" for k, v in meta.items())]
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    atomic_write_text(out / f"{stem}.json", json.dumps({"meta": meta or {}, "columns": list(columns), "rows": rows},
                                                        indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / f"{stem}.csv", buf.getvalue())


def common_meta(args) -> dict:
    return {"n": args.n, "T": args.T, "dtype": args.dtype, "seed": args.seed, "probe": str(args.probe),
            "repeat_token": args.repeat_token if args.repeat_token is not None else "random per sample",
            "bos_control": bool(getattr(args, "bos_control", False))}


def run_hf_sweep(args, result_stem: str, per_model: Callable) -> int:
    """Every model of the list (options of :func:`add_common_args`), one at a time: load it, then call
    ``per_model(spec, model, tokenizer, folder, inputs)`` where ``inputs`` yields ``(kind, (n, T) tokens)`` for each
    requested input. A model counts as done when every ``folder/<result_stem>_<input>.json`` exists.
    Returns the number of failed models."""
    from lit_gpt.hf import load_hf, special_prefix
    from lit_gpt.probe import hf_probe_tokens, load_probe_texts

    texts = load_probe_texts(args.probe) if "natural" in args.inputs else None

    def done(folder: Path) -> bool:
        return all((folder / f"{result_stem}_{i}.json").is_file() for i in args.inputs)

    def run_one(spec: str, folder: Path) -> None:
        model, tok = load_hf(spec, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file,
                             device_map=args.device_map, trust_remote_code=args.trust_remote_code)
        def tokens(kind: str):
            prefix = special_prefix(tok) if args.bos_control and kind != "natural" else ()
            return hf_probe_tokens(model, tok, kind, args.n, args.T, texts=texts,  # noqa: F821 (del model below)
                                   seed=args.seed, repeat_token=args.repeat_token, prefix=prefix)

        inputs = ((kind, tokens(kind)) for kind in args.inputs)
        try:
            per_model(spec, model, tok, folder, inputs)
        finally:
            del model

    return run_sweep(model_list(args), Path(args.out), done, run_one, args.overwrite)
