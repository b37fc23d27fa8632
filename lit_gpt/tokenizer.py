"""Tokenizers behind one interface: ``tokenizer.json`` (Hugging Face tokenizers), SentencePiece
``tokenizer.model``, and a built-in UTF-8 byte tokenizer that needs no files (the offline CPU demo).

``Tokenizer(path)`` accepts a folder holding either file, the file itself, the string ``"bytes"``, or a
Hugging Face Hub repo id (downloaded with huggingface_hub when the machine has internet).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, List, Optional, Union

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "<|end_of_text|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """Encode/decode with a known ``vocab_size``, ``eos_id`` and ``bos_id`` (None when absent).

    ``fingerprint`` identifies the exact vocabulary (sha256 of the file, or "bytes-v1") and is written into
    packed shards so that a shard made by another tokenizer is refused.
    """

    def __init__(self, source: Union[str, Path]) -> None:
        self.source = str(source)
        self.kind: str
        if str(source) == "bytes":
            self.kind = "bytes"
            self.vocab_size = 257           # 256 bytes + EOS
            self.eos_id, self.bos_id = 256, None
            self.fingerprint = "bytes-v1"
            self.name = "bytes"
            return
        path = Path(source).expanduser()
        if not path.exists():
            path = self._from_hub(str(source))
        if path.is_dir():
            for candidate in ("tokenizer.json", "tokenizer.model"):
                if (path / candidate).is_file():
                    path = path / candidate
                    break
            else:
                raise FileNotFoundError(f"tokenizer folder {path} holds neither tokenizer.json nor tokenizer.model")
        self.name = path.parent.name or path.name
        self.fingerprint = _sha256(path)
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self.kind = "hf"
            self._tok = HFTokenizer.from_file(str(path))
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self.eos_id = self._find(EOS_CANDIDATES)
            self.bos_id = self._find(BOS_CANDIDATES)
        elif path.suffix == ".model":
            import sentencepiece as spm

            self.kind = "sentencepiece"
            self._tok = spm.SentencePieceProcessor(model_file=str(path))
            self.vocab_size = self._tok.vocab_size()
            self.eos_id = self._tok.eos_id() if self._tok.eos_id() >= 0 else None
            self.bos_id = self._tok.bos_id() if self._tok.bos_id() >= 0 else None
        else:
            raise ValueError(f"tokenizer file {path} is not supported; allowed: tokenizer.json, tokenizer.model")

    @staticmethod
    def _from_hub(repo_id: str) -> Path:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:  # pragma: no cover
            raise FileNotFoundError(f"tokenizer {repo_id!r} is neither a local path nor downloadable") from e
        for name in ("tokenizer.json", "tokenizer.model"):
            try:
                return Path(hf_hub_download(repo_id, name))
            except Exception:
                continue
        raise FileNotFoundError(f"tokenizer {repo_id!r}: not a local path and no tokenizer.json / tokenizer.model "
                                "could be downloaded from the Hub")

    def _find(self, names) -> Optional[int]:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        if self.kind == "bytes":
            ids = list(text.encode("utf-8"))
        elif self.kind == "hf":
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._tok.encode(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token; set bos=False")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no EOS token; set eos=False")
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Iterable[str], bos: bool = False, eos: bool = False) -> List[List[int]]:
        texts = list(texts)
        if self.kind == "hf":
            out = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
            pre = [self.bos_id] if bos else []
            post = [self.eos_id] if eos else []
            if (bos and self.bos_id is None) or (eos and self.eos_id is None):
                return [self.encode(t, bos, eos) for t in texts]   # raises the clear error
            return [pre + ids + post for ids in out]
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if self.kind == "hf":
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, kind={self.kind}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
