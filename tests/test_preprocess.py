"""preprocess/prepare.py and the packed shard format: round trips, naming, splits, parallelism, bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import NEOX, make_docs, write_jsonl  # noqa: E402  (puts the repo root on sys.path)

from lit_gpt.packed import MAGIC, PackedShard, ShardError, ShardWriter, read_header, write_shard  # noqa: E402
from preprocess.prepare import PrepareError, holdout, prepare, split_and_domain  # noqa: E402


def stream_of(out: Path, prefix: str) -> np.ndarray:
    """Every token of a prefix, in file order then shard order (one input file)."""
    shards = sorted(out.glob(f"{prefix}-*.bin"))
    return np.concatenate([np.asarray(PackedShard(p).data).reshape(-1) for p in shards])


def test_bytes_round_trip_exact_ids(tmp_path):
    docs = make_docs(40, seed=3)
    write_jsonl(tmp_path / "src" / "books.jsonl", docs)
    prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), block_size=15, chunks_per_shard=7,
            workers=1, progress=False)
    expected = []
    for d in docs:                     # reference: UTF-8 bytes of each document, then EOS (256), no BOS
        expected += list(d.encode("utf-8")) + [256]
    got = stream_of(tmp_path / "out", "train_books")
    n = (len(expected) // 16) * 16     # whole chunks of block_size + 1 = 16 tokens; the tail is dropped
    assert got.tolist() == expected[:n]
    meta = read_header(sorted((tmp_path / "out").glob("train_books-*.bin"))[0])
    assert meta["seq_len"] == 16 and meta["dtype"] == "uint16" and meta["vocab_size"] == 257
    assert meta["tokenizer"]["fingerprint"] == "bytes-v1" and meta["eos_id"] == 256 and meta["bos"] is False
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["prefixes"]["train_books"]["dropped_tokens"] == len(expected) - n


@pytest.mark.skipif(not NEOX.is_dir(), reason="../shared/tokenizers/gpt-neox-20b not available")
def test_neox_round_trip_decodes_to_text_with_eos(tmp_path):
    from lit_gpt.tokenizer import Tokenizer

    docs = make_docs(30, seed=4)
    write_jsonl(tmp_path / "src" / "wiki.jsonl", docs)
    prepare([str(tmp_path / "src")], str(NEOX), str(tmp_path / "out"), block_size=31, chunks_per_shard=5,
            workers=1, progress=False)
    tok = Tokenizer(NEOX)
    decoded = tok.decode(stream_of(tmp_path / "out", "train_wiki").tolist())
    expected = "".join(d + "<|endoftext|>" for d in docs)
    assert expected.startswith(decoded)
    assert len(decoded) > 0.9 * len(expected)
    assert decoded.count("<|endoftext|>") >= 25


def test_compressed_inputs_and_domain_prefixes(tmp_path):
    import gzip
    import lzma

    docs = make_docs(20, seed=5)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "src" / "valid").mkdir(parents=True)
    (tmp_path / "src" / "gutenberg-train-01.jsonl.xz").write_bytes(lzma.compress(lines))
    (tmp_path / "src" / "valid" / "arxiv-0.jsonl.gz").write_bytes(gzip.compress(lines))
    prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), block_size=31, short_name="the_pile",
            workers=1, progress=False)
    prefixes = {read_header(p)["domain"] for p in (tmp_path / "out").glob("*.bin")}
    assert prefixes == {"train_the_pile_gutenberg", "valid_the_pile_arxiv"}
    # identical content -> identical token streams whatever the compression
    a = stream_of(tmp_path / "out", "train_the_pile_gutenberg")
    b = stream_of(tmp_path / "out", "valid_the_pile_arxiv")
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("path,expected", [
    ("gutenberg-train-00.jsonl.xz", ("train", "gutenberg")),
    ("gutenberg-val.jsonl.xz", ("valid", "gutenberg")),
    ("valid/wikipedia_en-3.jsonl", ("valid", "wikipedia_en")),
    ("train/gutenberg_pg_19-0.jsonl.zst", ("train", "gutenberg_pg_19")),
    ("pile_cc.jsonl", ("train", "pile_cc")),
])
def test_split_and_domain_names(path, expected):
    assert split_and_domain(Path("/data") / path, Path("/data")) == expected


def test_valid_fraction_holds_out_documents(tmp_path):
    docs = make_docs(200, seed=6)
    write_jsonl(tmp_path / "src" / "news.jsonl", docs)
    entry = prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), block_size=15, valid_fraction=0.25,
                    workers=1, progress=False)
    p = entry["prefixes"]
    assert p["train_news"]["documents"] + p["valid_news"]["documents"] == 200
    held = [i for i in range(200) if holdout("news.jsonl", i, 0.25)]
    assert p["valid_news"]["documents"] == len(held)
    assert 30 <= len(held) <= 70
    expected = []                      # the held-out stream is exactly the held-out documents in order
    for i in held:
        expected += list(docs[i].encode()) + [256]
    got = stream_of(tmp_path / "out", "valid_news").tolist()
    assert got == expected[:len(got)] and len(got) > 0


def test_parallel_equals_serial(tmp_path):
    for name, seed in (("a-0", 7), ("b-0", 8)):
        write_jsonl(tmp_path / "src" / f"{name}.jsonl", make_docs(60, seed))
    prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "serial"), block_size=15, workers=1, progress=False)
    prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "par"), block_size=15, workers=2, progress=False)
    serial = sorted(p.name for p in (tmp_path / "serial").glob("*.bin"))
    assert serial == sorted(p.name for p in (tmp_path / "par").glob("*.bin")) and serial
    for name in serial:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "par" / name).read_bytes()


# ---------------------------------------------------------------------------- bad input
def test_missing_and_empty_inputs_fail_before_writing(tmp_path):
    with pytest.raises(PrepareError, match="not found"):
        prepare([str(tmp_path / "nope")], "bytes", str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no .jsonl"):
        prepare([str(tmp_path / "empty")], "bytes", str(tmp_path / "out"), progress=False)
    (tmp_path / "e2").mkdir()
    (tmp_path / "e2" / "x.jsonl").write_text("")
    with pytest.raises(PrepareError, match="is empty"):
        prepare([str(tmp_path / "e2")], "bytes", str(tmp_path / "out"), progress=False)
    assert not list((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


def test_bad_arguments_give_the_shared_one_line_error(tmp_path):
    # the whole lines (lit_gpt.utils.invalid_choice's wording), before anything is written
    write_jsonl(tmp_path / "src" / "a.jsonl", make_docs(5, 12))
    for kwargs, line in (
        (dict(block_size=0), "--block_size=0 is invalid; allowed: a positive integer"),
        (dict(split="trian"), "--split='trian' is invalid (did you mean train?); allowed: auto, train, valid"),
        (dict(valid_fraction=1.0), "--valid_fraction=1.0 is invalid; allowed: 0 <= value < 1"),
        (dict(short_name="a-b"), "--short_name='a-b' is invalid; allowed: letters, digits, '_' and '.'"),
    ):
        with pytest.raises(PrepareError) as e:
            prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), progress=False, **kwargs)
        assert str(e.value) == line
    assert not list(tmp_path.glob("out/*.bin"))
    for kwargs, line in ((dict(seq_len=1, chunks_per_shard=8), "seq_len=1 is invalid; allowed: >= 2 (block_size >= 1)"),
                         (dict(seq_len=8, chunks_per_shard=0), "chunks_per_shard=0 is invalid; allowed: >= 1")):
        with pytest.raises(ShardError) as e:
            ShardWriter(tmp_path / "w", "train_x", "t", meta={}, **kwargs)
        assert str(e.value) == line


def test_existing_shards_are_not_overwritten(tmp_path):
    write_jsonl(tmp_path / "src" / "a.jsonl", make_docs(30, 9))
    prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), block_size=15, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")}
    write_jsonl(tmp_path / "src" / "a.jsonl", make_docs(30, 10))
    with pytest.raises(PrepareError, match="already holds shards"):
        prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), block_size=15, workers=1, progress=False)
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")}
    prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "out"), block_size=15, workers=1, progress=False,
            overwrite=True)
    assert before != {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")}


def test_unwritable_output_and_bad_tokenizer(tmp_path):
    write_jsonl(tmp_path / "src" / "a.jsonl", make_docs(5, 11))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError, match="not writable"):
        prepare([str(tmp_path / "src")], "bytes", str(tmp_path / "file" / "out"), progress=False)
    with pytest.raises(PrepareError, match="--tokenizer"):
        prepare([str(tmp_path / "src")], str(tmp_path / "no-tokenizer"), str(tmp_path / "out"), progress=False)


def test_corrupt_and_foreign_shards_are_refused(tmp_path):
    good = write_shard(tmp_path / "d-x-00000.bin", np.arange(30).reshape(3, 10),
                       {"vocab_size": 100, "tokenizer": {"name": "t", "fingerprint": "f"}})
    assert read_header(good)["n_chunks"] == 3
    (tmp_path / "trunc-x-00000.bin").write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ShardError, match="truncated"):
        read_header(tmp_path / "trunc-x-00000.bin")
    (tmp_path / "other-x-00000.bin").write_bytes(b"LITPKDS" + bytes(40))   # the seed's format
    with pytest.raises(ShardError, match="not a packed shard"):
        read_header(tmp_path / "other-x-00000.bin")
    assert good.read_bytes()[:8] == MAGIC


def test_demo_corpus_gutenberg_slice_is_the_shards_first_books(tmp_path):
    """preprocess/demo_corpus.py --source gutenberg (the second CPU regime's data): train = the first books of
    gutenberg-train-00 until max_chars, valid = the first books of gutenberg-val until max_chars / 20, bytes."""
    import lzma

    from conftest import shared_path
    from preprocess.demo_corpus import build

    def first_books(name, max_chars):             # reference: read the shared file by hand
        books, total = [], 0
        with lzma.open(shared_path("corpus", name), "rt", encoding="utf-8") as f:
            for line in f:
                if total >= max_chars:
                    break
                books.append(json.loads(line)["text"])
                total += len(books[-1])
        return books

    train, valid = first_books("gutenberg-train-00.jsonl.xz", 300_000), first_books("gutenberg-val.jsonl.xz", 15_000)
    build(str(tmp_path / "g"), source="gutenberg", block_size=31, max_chars=300_000)
    for prefix, books in (("train_demo", train), ("valid_demo", valid)):
        expected = [t for d in books for t in list(d.encode("utf-8")) + [256]]
        n = (len(expected) // 32) * 32
        assert stream_of(tmp_path / "g" / "packed", prefix).tolist() == expected[:n]
    with pytest.raises(PrepareError, match="source='web' is invalid"):
        build(str(tmp_path / "x"), source="web")
