"""Download a Hugging Face dataset repository (default: the seed's ``sail/regmix-data-sample``) with huggingface_hub.

    python -m preprocess.download --repo sail/regmix-data-sample --out datasets/raw/regmix-data-sample

Needs internet (and ``huggingface-cli login`` for gated sets). The folder then feeds ``preprocess/prepare.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence
from lit_gpt.utils import ArgumentParser


def download(repo: str, out: str, allow_patterns: Optional[Sequence[str]] = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise SystemExit("error: downloading needs huggingface_hub (pip install huggingface_hub)") from e
    path = snapshot_download(repo_id=repo, repo_type="dataset", local_dir=out,
                             allow_patterns=list(allow_patterns) if allow_patterns else None)
    return Path(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--repo", default="sail/regmix-data-sample", help="dataset repo id on the Hugging Face Hub")
    ap.add_argument("--out", default=None, help="local folder (default datasets/raw/<repo name>)")
    ap.add_argument("--include", nargs="*", default=None, help="glob patterns to fetch (default: everything)")
    a = ap.parse_args(argv)
    out = a.out or str(Path("datasets/raw") / a.repo.split("/")[-1])
    try:
        print(download(a.repo, out, a.include))
    except Exception as e:            # network / auth errors from the hub client, reported in one line
        print(f"error: could not download {a.repo}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
