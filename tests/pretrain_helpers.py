"""Small synthetic corpora and tiny run configs shared by the pretraining tests (CPU, seconds)."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # preprocess/ and pretrain.py live at the repo root, outside the package
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
NEOX = SHARED / "tokenizers" / "gpt-neox-20b"

WORDS = ("the cat sat on a mat while dogs ran far away from home and sun rose over quiet hills "
         "naïve café résumé 東京 ünïcödé").split()


def make_docs(n: int, seed: int, min_words: int = 5, max_words: int = 80) -> List[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path: Path, docs: List[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return path


def make_packed(tmp: Path, block_size: int = 32, tokenizer: str = "bytes", n_docs: int = 120) -> Path:
    """Two train domains (alpha, beta) and their held-out valid splits, packed with ``tokenizer``."""
    from preprocess.prepare import prepare

    src = tmp / "src"
    write_jsonl(src / "alpha-train-00.jsonl", make_docs(n_docs, 1))
    write_jsonl(src / "beta-train-00.jsonl", make_docs(n_docs, 2))
    out = tmp / "packed"
    prepare([str(src)], tokenizer, str(out), block_size=block_size, valid_fraction=0.2, chunks_per_shard=16,
            workers=1, progress=False)
    return out


def tiny_run(data_dir: Path, out_dir: Path, **train) -> Dict:
    """A run config dict for a 2-layer model on ``make_packed`` data (bytes tokenizer)."""
    t = dict(out_dir=str(out_dir), global_batch_size=4, micro_batch_size=2, max_steps=6, warmup_steps=2,
             log_interval=1, eval_interval=3, sink_interval=3, save_interval=3, lr=3e-3, min_lr=3e-4)
    t.update(train)
    return {
        "model": {"name": "tiny", "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64},
        "data": {"train_dir": str(data_dir), "tokenizer": "bytes", "train": {"train_alpha": 0.6, "train_beta": 0.4},
                 "valid": {"valid_alpha": 1.0, "valid_beta": 1.0}, "val_samples": 6},
        "train": t,
        "probe": {"source": "shards", "n": 8, "T": 16, "k_max": 4, "batch_size": 4},
        "logging": {"tensorboard": False, "wandb": False, "progress": False},
    }


def write_yaml(path: Path, d: Dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path
