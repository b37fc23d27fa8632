"""Export one of our checkpoints to a Hugging Face LlamaForCausalLM folder (RoPE + SwiGLU + pre-RMSNorm + softmax,
causal mask, no extra key/value slots; GQA and tied embeddings are fine), so that eval_sink_open_source.py,
eval_activations_open_source.py and any transformers tool can load it.

    python export_hf.py checkpoints/tinyllama_60M/final exported/tinyllama_60M \\
        --tokenizer ../shared/tokenizers/gpt-neox-20b
    python eval_sink_open_source.py --models exported/tinyllama_60M --device cpu
"""
from __future__ import annotations

import sys

from lit_gpt.utils import DTYPES, ArgumentParser


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", help="checkpoint folder or run folder")
    ap.add_argument("out", help="output folder (must be empty or absent unless --overwrite)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (or folder) to ship with the model (default: the checkpoint's run_config)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    from lit_gpt.hf import export_llama

    try:
        out = export_llama(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                           overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
