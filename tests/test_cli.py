"""The command-line conventions every driver shares: the "did you mean" hint of unknown names, the argument parser
that gives it, the streaming scripts' one set of method options, and the progress bar's quiet rules."""
import io
import sys

import pytest

from lit_gpt.streaming_io import CACHE_SIZE, CHUNK, START_SIZE, MethodArgs, add_method_args, make_method
from lit_gpt.utils import ArgumentParser, did_you_mean, invalid_choice, parse_dtype, progress_bar


def test_did_you_mean_names_the_close_choices_in_one_parenthesis():
    assert did_you_mean("snk", ["dense", "window", "sink"]) == " (did you mean sink?)"
    # several close names, best first (n_head 12/13, n_embd 8/13 alike), ties in the given order, at most three
    assert did_you_mean("n_heads", ["n_layer", "n_embd", "n_head"]) == " (did you mean n_head, n_embd?)"
    assert did_you_mean("valid_c", ["mean", "valid_a", "valid_b"]) == " (did you mean valid_a, valid_b?)"
    assert did_you_mean("ab", ["abc", "abd", "abe", "abf"]) == " (did you mean abc, abd, abe?)"
    assert did_you_mean("h2o", ["dense", "window", "sink"]) == ""               # nothing close: no hint
    assert did_you_mean(3, [1, 2, 3.5]) == ""                                    # non-strings compare as text


def test_invalid_choice_is_one_line_with_field_value_hint_and_allowed_values_in_order():
    assert invalid_choice("method", "snk", ("dense", "window", "sink")) == \
        "method='snk' is invalid (did you mean sink?); allowed: dense, window, sink"
    assert invalid_choice("method", "h2o", ("dense", "sink")) == "method='h2o' is invalid; allowed: dense, sink"
    assert invalid_choice("logging.wandb", "yes", ("auto", True, False)) == \
        "logging.wandb='yes' is invalid; allowed: auto, True, False"
    # a rule instead of a set: the same line, the rule as given, no hint
    assert invalid_choice("fixed_token position", -1, "an integer >= 0") == \
        "fixed_token position=-1 is invalid; allowed: an integer >= 0"
    assert invalid_choice("x", "an integr", "an integer") == "x='an integr' is invalid; allowed: an integer"
    with pytest.raises(ValueError, match=r"^dtype='bfloat61' is invalid \(did you mean bfloat16"):
        parse_dtype("bfloat61")
    with pytest.raises(ValueError, match=r"^method='sinks' is invalid \(did you mean sink"):
        make_method("sinks", cache_size=8)


def test_argument_parser_choices_error_carries_the_hint(capsys):
    ap = ArgumentParser(prog="prog")
    ap.add_argument("--x", choices=["step", "tokens"])
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--x", "tokns"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "prog: error: argument --x: invalid choice 'tokns' (did you mean tokens?); allowed: step, tokens"


def test_streaming_scripts_refuse_an_unknown_method_in_one_line(capsys, tmp_path):
    import eval_long_ppl
    import eval_passkey
    import stream_generate

    for main, flag, value, allowed in (
            (eval_long_ppl.main, "--methods", "dense,snk", "dense, window, sink, sink_original, lminfinite, recompute"),
            (eval_passkey.main, "--methods", "recompute", "dense, window, sink, lminfinite"),
            (stream_generate.main, "--method", "windw", "sink, window, lminfinite, dense, sink_original")):
        out = [] if main is stream_generate.main else ["--out", str(tmp_path)]
        with pytest.raises(SystemExit) as e:
            main(["--model", "unused", *out, flag, value])
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        bad = value.split(",")[-1]
        assert last.endswith(f"error: argument {flag}: {invalid_choice('method', bad, allowed.split(', '))}")


def test_method_options_have_one_set_of_defaults():
    import argparse

    ap = argparse.ArgumentParser()
    add_method_args(ap)
    got = MethodArgs.from_args(ap.parse_args([]))
    assert (got.names, got.cache_size, got.start_size, got.chunk) == (
        ["dense", "window", "sink", "recompute"], CACHE_SIZE, START_SIZE, CHUNK)
    assert (CACHE_SIZE, START_SIZE, CHUNK) == (256, 4, 256)
    assert got.make("sink").spec == make_method("sink", cache_size=256, start_size=4).spec
    # a generation session takes one --method; options of methods a script does not offer are not added
    ap = argparse.ArgumentParser()
    add_method_args(ap, allowed=("sink", "dense"), methods="sink", single=True)
    args = ap.parse_args(["--method", "dense", "--chunk", "1"])
    assert MethodArgs.from_args(args).names == ["dense"] and args.chunk == 1
    assert not hasattr(args, "stride") and not hasattr(args, "topk")
    # cache_size=None: the script sizes the cache to the training window (eval_passkey)
    ap = argparse.ArgumentParser()
    add_method_args(ap, allowed=("dense", "sink"), methods="dense,sink", cache_size=None)
    opts = MethodArgs.from_args(ap.parse_args([]))
    with pytest.raises(ValueError, match="--cache-size is unset"):
        opts.make("sink")
    assert opts.with_cache_size(512).make("sink").label == "4 sinks + 508"
    assert MethodArgs.from_args(ap.parse_args(["--cache-size", "64"])).with_cache_size(512).cache_size == 64
    # per-method overrides (an ablation's start size, a sweep's cache size)
    assert got.make("sink", start_size=1, cache_size=16).label == "1 sinks + 15"


def test_progress_bar_is_quiet_off_a_terminal_and_with_quiet(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(10, "x") as bar:
        bar.update(10)
    assert bar.disable and sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Tty())
    with progress_bar(10, "x", quiet=True) as bar:
        bar.update(10)
    assert bar.disable and sys.stderr.getvalue() == ""
    with progress_bar(10, "work", unit="tok") as bar:
        assert not bar.disable
        bar.update(10)
    assert "work:" in sys.stderr.getvalue() and "/10 [" in sys.stderr.getvalue()        # a bar on the terminal
