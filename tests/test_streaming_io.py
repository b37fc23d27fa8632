"""The scripts' shared pieces: method specs, passkey prompts and parsing, book streams, rolling means, plots."""
import argparse
import json
import lzma

import pytest
import torch

from lit_gpt.streaming import StreamingSpec
from lit_gpt.streaming_io import (
    PASSKEY_FILLER, book_stream, draw_passkeys, make_method, method_names, parse_passkey, passkey_fillers,
    passkey_prompt, passkey_text, plot_log_ppl, rolling_mean,
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
    import stream_generate
    from lit_gpt.streaming_io import MethodArgs, add_method_args

    for main in (eval_long_ppl.main, eval_passkey.main, stream_generate.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "--topk-insert-at" in capsys.readouterr().out
    ap = argparse.ArgumentParser()
    add_method_args(ap)
    spec = MethodArgs.from_args(ap.parse_args(["--topk", "5"])).make("lminfinite").spec
    assert (spec.topk, spec.topk_from_layer, spec.insert_at) == (5, 4, 126)
    args = ap.parse_args(["--topk", "3", "--topk-from-layer", "2", "--topk-insert-at", "100"])
    spec = MethodArgs.from_args(args).make("lminfinite").spec
    assert (spec.topk, spec.topk_from_layer, spec.insert_at) == (3, 2, 100)
    assert "top-3 at 100" in MethodArgs.from_args(args).make("lminfinite").label


def lminfinite_text(n_fill, insert_at, key):
    """LM-Infinite's prompt, written out from create_passkey_data.py + get_data.py: sentences joined by one
    space, then " What is the pass key? The pass key is " (trailing space)."""
    prefix = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about the important information there.")
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    answer = f"The pass key is {key}. Remember it. {key} is the pass key."
    return " ".join([prefix] + [filler] * insert_at + [answer] + [filler] * (n_fill - insert_at)) + \
        " What is the pass key? The pass key is "


def test_passkey_prompt_is_lminfinite_text_within_the_length():
    tok = Tokenizer("bytes")
    assert PASSKEY_FILLER == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    for n in (600, 2000):
        k = passkey_fillers(tok, n)
        longest = len(tok.encode(lminfinite_text(k, 0, 9999999)))
        assert longest <= n < len(tok.encode(lminfinite_text(k + 1, 0, 9999999)))   # the most fillers that fit
        for slot in (0, k // 2, k):
            ids, at = passkey_prompt(tok, k, slot, 31415)
            assert tok.decode(ids) == lminfinite_text(k, slot, 31415) and len(ids) <= n
            assert tok.decode(ids[at:]).startswith(" The pass key is 31415.")
            assert tok.decode(ids[:at]).count("The grass is green") == slot
    assert passkey_fillers(tok, 600, bos=False) == passkey_fillers(tok, 600)
    with pytest.raises(ValueError, match="insert_at=9 is invalid"):
        passkey_prompt(tok, 8, 9, 1)
    with pytest.raises(ValueError, match="too short"):
        passkey_fillers(tok, 100)


def test_passkey_draws_are_lminfinite_draws():
    """create_passkey_data.py: rng = np.random.RandomState(seed=max_token_length); per sample
    key = rng.randint(1, 10000000), then insert_location = rng.randint(0, num_distractors)."""
    np = pytest.importorskip("numpy")
    for length, n_fill in ((2048, 60), (512, 13)):
        rng = np.random.RandomState(seed=length)
        expected = []
        for _ in range(50):
            key = rng.randint(1, 10000000)
            expected.append((int(key), int(rng.randint(0, n_fill))))
        assert draw_passkeys(length, 50, n_fill) == expected
    keys = [k for k, _ in draw_passkeys(4096, 2000, 10)]
    assert min(keys) >= 1 and max(keys) < 10_000_000 and sum(k >= 10**6 for k in keys) > 1700   # mostly 7 digits
    grid = draw_passkeys(512, 2, 20, depths=[0.0, 0.5, 1.0])
    assert [s for _, s in grid] == [0, 0, 10, 10, 20, 20]
    with pytest.raises(ValueError, match="depth=1.5 is invalid"):
        draw_passkeys(512, 1, 20, depths=[1.5])


def test_parse_passkey_takes_the_first_whole_integer():
    """LM-Infinite's passkey_retrieval_accuracy: int(re.findall(r'\\d+', text)[0]), so a longer number is wrong."""
    assert parse_passkey("31415. Remember") == 31415
    assert parse_passkey("123456") == 123456 and parse_passkey("123456") != 12345
    assert parse_passkey("key 12 345") == 12 and parse_passkey(" 7.") == 7
    assert parse_passkey("no digits") is None and parse_passkey("") is None
    assert parse_passkey("0012345") == 12345                              # int() of the digits, as LM-Infinite


def test_eval_passkey_end_to_end_on_stories260k(tmp_path):
    """The driver on the tiny real model: LM-Infinite's draws, every answer scored by its first integer."""
    from lit_gpt.probe import shared_dir

    model = shared_dir() / "models" / "stories260K"
    if not (model / "stories260K.bin").is_file():
        pytest.skip("../shared/models/stories260K is absent")
    import eval_passkey

    record = tmp_path / "passkey.json"
    eval_passkey.main(["--model", str(model), "--lengths", "160,220", "--samples", "2", "--methods", "dense,sink",
                       "--cache-size", "128", "--out", str(tmp_path / "out"), "--record", str(record)])
    rec = json.loads(record.read_text())
    assert rec["environment"]["command"] and len(rec["records"]) == 2 * 2 * 2
    for r in rec["records"]:
        assert r["correct"] == (parse_passkey(r["answer"]) == r["key"]) and r["prompt_tokens"] <= r["length"]
    for length in (160, 220):
        n_fill = rec["records"][[r["length"] for r in rec["records"]].index(length)]["n_fill"]
        got = [(r["key"], r["slot"]) for r in rec["records"] if r["length"] == length and r["method"] == "dense"]
        assert got == draw_passkeys(length, 2, n_fill)
    for a in rec["accuracy"]:
        rs = [r for r in rec["records"] if r["method"] == a["label"] and r["length"] == a["length"]]
        assert a["samples"] == 2 and a["accuracy"] == sum(r["correct"] for r in rs) / 2


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


def test_eval_long_ppl_bins_and_chunked_vs_token_comparison(tmp_path):
    """The record's per-bin sums average to the reported NLL, and --compare-with finds chunked prefill equal to
    token-by-token streaming on the real tiny model (the check docs/streaming.md reports for SmolLM2)."""
    from lit_gpt.probe import shared_dir

    model = shared_dir() / "models" / "stories260K"
    if not (model / "stories260K.bin").is_file():
        pytest.skip("../shared/models/stories260K is absent")
    import eval_long_ppl

    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She liked to play in the park with her "
                    "dog. One day, the dog saw a big red ball and ran after it. " * 4)
    common = ["--model", str(model), "--text", "file", "--text-file", str(text), "--tokens", "200",
              "--cache-size", "64", "--methods", "window,sink", "--bin-width", "64"]
    eval_long_ppl.main(common + ["--chunk", "50", "--out", str(tmp_path / "chunked")])
    eval_long_ppl.main(common + ["--chunk", "1", "--out", str(tmp_path / "tokens"), "--compare-with",
                                 str(tmp_path / "chunked"), "--record", str(tmp_path / "rec.json")])
    rec = json.loads((tmp_path / "rec.json").read_text())
    for row in rec["results"]:
        b = row["bins"]
        assert b["count"] == [64, 64, 64, 7] and sum(b["sum"]) / sum(b["count"]) == pytest.approx(row["nll"], rel=1e-6)
        assert (b["sum"][1] + b["sum"][2] + b["sum"][3]) / 135 == pytest.approx(row["nll_after_window"], rel=1e-6)
    assert [c["label"] for c in rec["comparison"]] == [r["label"] for r in rec["results"]]
    assert all(c["targets"] == 199 and c["max_abs_diff"] < 1e-4 for c in rec["comparison"])


def test_bad_passkey_and_method_arguments_give_the_shared_one_line_error():
    # the whole lines (lit_gpt.utils.invalid_choice's wording)
    for call, line in (
        (lambda: passkey_text(8, 9, 1), "insert_at=9 is invalid; allowed: 0..n_fill=8"),
        (lambda: draw_passkeys(512, 0, 20), "samples=0 is invalid; allowed: >= 1"),
        (lambda: draw_passkeys(512, 1, 20, depths=[-0.5]), "depth=-0.5 is invalid; allowed: a fraction in [0, 1]"),
        (lambda: make_method("sink", cache_size=4, start_size=6),
         "--start-size=6 is invalid; allowed: fewer than --cache-size=4"),
        (lambda: make_method("snk", cache_size=8),
         "method='snk' is invalid (did you mean sink?); allowed: dense, window, sink, sink_original, lminfinite, "
         "recompute"),
        (lambda: method_names(("sink", "dense"), single=True)("sink,dense"),
         "method='sink,dense' is invalid; allowed: one of sink, dense"),
    ):
        with pytest.raises((ValueError, argparse.ArgumentTypeError)) as e:
            call()
        assert str(e.value) == line
