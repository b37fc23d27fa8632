"""The scripts' shared pieces: method specs, passkey prompts and parsing, book streams, rolling means, plots."""
import json
import lzma

import pytest
import torch

from lit_gpt.streaming import StreamingSpec
from lit_gpt.streaming_io import (
    PASSKEY_FILLER, book_stream, make_method, parse_passkey, passkey_prompt, plot_log_ppl, rolling_mean,
)
from lit_gpt.tokenizer import Tokenizer


def test_methods_map_to_the_specs_the_papers_describe():
    assert make_method("window", cache_size=256).spec == StreamingSpec(0, 256)
    assert make_method("sink", cache_size=256, start_size=4).spec == StreamingSpec(4, 252, "reindex")
    assert make_method("sink_original", cache_size=256).spec == StreamingSpec(4, 252, "original")
    lm = make_method("lminfinite", cache_size=512, start_size=10, topk=5).spec
    assert (lm.start_size, lm.recent_size, lm.ceiling, lm.topk, lm.topk_from_layer) == (10, 502, 502, 5, 4)
    assert lm.insert_at == 251                         # LM-Infinite's top_k_insert_at: L_pretrain / 2
    lm = make_method("lminfinite", cache_size=4096, start_size=10, lminf_local=4096, lminf_ceiling=4096, topk=5,
                     topk_insert_at=1000).spec
    assert (lm.ceiling, lm.insert_at) == (4096, 1000)
    assert make_method("lminfinite", cache_size=4106, start_size=10, lminf_local=4096, topk=5).spec.insert_at == 2048
    rc = make_method("recompute", cache_size=128, stride=8)
    assert (rc.spec, rc.window, rc.stride) == (None, 128, 8)
    with pytest.raises(ValueError, match="--start-size=8 is invalid; allowed: fewer than --cache-size=8"):
        make_method("sink", cache_size=8, start_size=8)
    with pytest.raises(ValueError, match="method='h2o' is invalid; allowed: dense, window"):
        make_method("h2o", cache_size=8)


def test_topk_options_of_the_drivers_reach_the_spec(capsys):
    import argparse

    import eval_long_ppl
    import eval_passkey
    from lit_gpt.streaming_io import add_topk_args, topk_kwargs

    for main in (eval_long_ppl.main, eval_passkey.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "--topk-insert-at" in capsys.readouterr().out
    ap = argparse.ArgumentParser()
    add_topk_args(ap)
    spec = make_method("lminfinite", cache_size=256, **topk_kwargs(ap.parse_args(["--topk", "5"]))).spec
    assert (spec.topk, spec.topk_from_layer, spec.insert_at) == (5, 4, 126)
    args = ap.parse_args(["--topk", "3", "--topk-from-layer", "2", "--topk-insert-at", "100"])
    spec = make_method("lminfinite", cache_size=256, **topk_kwargs(args)).spec
    assert (spec.topk, spec.topk_from_layer, spec.insert_at) == (3, 2, 100)
    assert "top-3 at 100" in make_method("lminfinite", cache_size=256, **topk_kwargs(args)).label


def test_passkey_prompt_hides_the_key_at_the_depth():
    tok = Tokenizer("bytes")
    fill = len(tok.encode(PASSKEY_FILLER))
    for n in (600, 2000):
        for depth in (0.0, 0.5, 1.0):
            ids, at = passkey_prompt(tok, n, depth, 31415)
            text = tok.decode(ids)
            assert n - fill < len(ids) <= n and text.count("31415") == 2
            assert tok.decode(ids[at:]).startswith(" The pass key is 31415.")
            before = tok.decode(ids[:at]).count("The grass is green")
            total = text.count("The grass is green")
            assert before == round(depth * total)
            assert text.endswith("What is the pass key? The pass key is")
    assert parse_passkey(" 31415. Remember") == 31415 and parse_passkey(" 3141") is None
    with pytest.raises(ValueError, match="depth=1.5 is invalid"):
        passkey_prompt(tok, 600, 1.5, 1)


def test_book_stream_concatenates_long_books_only(tmp_path):
    path = tmp_path / "books.jsonl.xz"
    docs = [{"text": "short"}, {"text": "A" * 50}, {"text": "B" * 50}]
    with lzma.open(path, "wt") as f:
        f.write("\n".join(json.dumps(d) for d in docs))
    tok = Tokenizer("bytes")
    ids, used = book_stream(tok, 80, [path], min_chars=20)
    assert tok.decode(ids) == "A" * 50 + "\n\n" + "B" * 28 and used == ["books.jsonl.xz#1", "books.jsonl.xz#2"]
    with pytest.raises(ValueError, match="only 102 tokens"):
        book_stream(tok, 500, [path], min_chars=20)


def test_rolling_mean_and_plot(tmp_path):
    x = torch.tensor([1.0, 3.0, 5.0, 7.0])
    torch.testing.assert_close(rolling_mean(x, 2), torch.tensor([1.0, 2.0, 4.0, 6.0]))
    plot_log_ppl(tmp_path / "p.png", {"dense": x, "window": x + 1}, width=2, reference="dense",
                 markers=[(2, "cache")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
