"""Config validation (one clear line per bad field), YAML and checkpoint round trips."""
import pytest
import torch
import yaml

from lit_gpt import GPT, Config, ConfigError, NAMED_CONFIGS
from lit_gpt.checkpoint import load_model, save_checkpoint

BASE = dict(block_size=16, vocab_size=64, padding_multiple=1, n_layer=1, n_head=2, n_embd=8, intermediate_size=8)

# (overrides, field named in the error, a fragment of the allowed values)
INVALID = [
    (dict(pos_encoding="rotary"), "pos_encoding", "rope, nope, sinusoidal, learned, alibi, relative"),
    (dict(mlp="swiglu2"), "mlp", "relu, gelu, swish, reglu, geglu, swiglu"),
    (dict(norm_class="batchnorm"), "norm_class", "rmsnorm, layernorm"),
    (dict(norm_position="sandwich"), "norm_position", "pre, post"),
    (dict(head_output="mean"), "head_output", "concat, sum"),
    (dict(attn_mask="bidirectional"), "attn_mask", "causal, window, prefix"),
    (dict(attn_op="relu"), "attn_op", "softmax, sigmoid"),
    (dict(kv_bias="q"), "kv_bias", "none, k, v, kv"),
    (dict(kv_bias="k", kv_bias_value="ones"), "kv_bias_value", "zero, one_hot, uniform"),
    (dict(attn_impl="flash"), "attn_impl", "auto, sdpa, flex, eager"),
    (dict(n_head=3), "head_size", "divisible"),
    (dict(n_layer=0), "n_layer", "positive integer"),
    (dict(n_embd=8.5), "n_embd", "positive integer"),
    (dict(block_size=-1), "block_size", "positive integer"),
    (dict(n_query_groups=3, n_head=2), "n_query_groups", "divisor of n_head"),
    (dict(norm_eps=0), "norm_eps", "positive number"),
    (dict(rotary_percentage=0.0), "rotary_percentage", "0 < value <= 1"),
    (dict(rotary_percentage=0.25), "rotary_percentage", "even"),
    (dict(attn_mask="window"), "window_size", "positive integer"),
    (dict(attn_mask="window", window_size=0), "window_size", "positive integer"),
    (dict(window_size=4), "window_size", "null unless attn_mask='window'"),
    (dict(attn_mask="prefix"), "prefix_size", "when attn_mask='prefix'"),
    (dict(attn_mask="prefix", prefix_size=99), "prefix_size", "[1, block_size=16]"),
    (dict(prefix_size=3), "prefix_size", "null unless attn_mask='prefix'"),
    (dict(attn_normalize=False), "attn_normalize", "true with attn_op='softmax'"),
    (dict(attn_op="sigmoid", softmax_alpha=2.0), "softmax_alpha", "1.0 unless attn_op='softmax'"),
    (dict(softmax_alpha=0), "softmax_alpha", "positive number"),
    (dict(attn_op="sigmoid", attn_impl="sdpa"), "attn_impl", "auto or eager"),
    (dict(kv_bias_value="one_hot"), "kv_bias_value", "'zero' unless kv_bias='k'"),
    (dict(kv_bias="v", kv_bias_key_dims=2), "kv_bias_key_dims", "null unless kv_bias is 'k' or 'kv'"),
    (dict(kv_bias="k", kv_bias_key_dims=9), "kv_bias_key_dims", "[0, head_size=4]"),
    (dict(kv_bias_shared=True), "kv_bias_shared", "false when kv_bias='none'"),
    (dict(sink_logit=True, attn_op="sigmoid"), "sink_logit", "false unless attn_op='softmax'"),
    (dict(sink_token=True, attn_mask="prefix", prefix_size=2), "sink_token", "attn_mask='prefix'"),
    (dict(pos_encoding="alibi", attn_op="identity"), "pos_encoding", "score-based operation"),
    (dict(bias="yes"), "bias", "true or false"),
]


@pytest.mark.parametrize("overrides,field,allowed", INVALID, ids=[i[1] + str(n) for n, i in enumerate(INVALID)])
def test_invalid_values_give_one_clear_line(overrides, field, allowed):
    with pytest.raises(ConfigError) as exc:
        Config(**dict(BASE, **overrides))
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"Config.{field}=" in msg, msg
    assert allowed in msg, msg


def test_invalid_value_lines_are_the_repo_wording():
    # the whole line, as lit_gpt.utils.invalid_choice words it: a rule, or the allowed values with a hint
    lines = {
        "Config.norm_eps=0 is invalid; allowed: a positive number": dict(norm_eps=0),
        "Config.n_layer=0 is invalid; allowed: a positive integer": dict(n_layer=0),
        "Config.window_size=3 is invalid; allowed: null unless attn_mask='window' (attn_mask='causal')":
            dict(window_size=3),
        "Config.mlp='swiglo' is invalid (did you mean swiglu?); allowed: relu, gelu, swish, reglu, "
        "geglu, swiglu": dict(mlp="swiglo"),
    }
    for line, overrides in lines.items():
        with pytest.raises(ConfigError) as exc:
            Config(**dict(BASE, **overrides))
        assert str(exc.value) == line


def test_unknown_field_and_unknown_name():
    with pytest.raises(ConfigError, match=r"unknown field 'n_heads' \(did you mean n_head"):
        Config.from_name("tiny", n_heads=3)
    with pytest.raises(ConfigError, match=r"tinyllama_60m.*did you mean tinyllama_60M"):
        Config.from_name("tinyllama_60m")


def test_every_named_config_builds():
    for name in NAMED_CONFIGS:
        cfg = Config.from_name(name)
        assert cfg.name == name
        assert cfg.vocab_size % cfg.padding_multiple == 0


def test_vocab_is_padded_and_derived_fields_follow_replace():
    cfg = Config(**dict(BASE, vocab_size=50277, padding_multiple=64))
    assert cfg.vocab_size == 50304          # next multiple of 64
    c2 = Config.from_name("tiny").replace(n_head=2)
    assert c2.head_size == 16 and c2.n_query_groups == 2
    c3 = Config.from_name("tiny").replace(head_output="sum")
    assert c3.head_size == c3.n_embd


def test_yaml_round_trip(tmp_path):
    cfg = Config.from_name("tiny", pos_encoding="alibi", kv_bias="kv", attn_mask="window", window_size=5,
                           extra={"note": "x"})
    path = tmp_path / "model_config.yaml"
    cfg.save(path)
    assert yaml.safe_load(path.read_text())["pos_encoding"] == "alibi"
    assert Config.from_file(path) == cfg
    cfg.save(tmp_path / "c.json")
    assert Config.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "bad.yaml").write_text("n_layer: 2\nwindow: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'window'"):
        Config.from_file(tmp_path / "bad.yaml")


def test_checkpoint_round_trip(tmp_path):
    cfg = Config.from_name("tiny", sink_token=True, kv_bias="k", tie_embeddings=True)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    save_checkpoint(tmp_path / "run" / "step-0000010", model, cfg, step=10, run_config={"lr": 1e-3})
    loaded, payload = load_model(tmp_path / "run")
    assert payload["step"] == 10 and payload["run_config"] == {"lr": 1e-3}
    assert loaded.config == cfg
    torch.testing.assert_close(loaded(idx), model.eval()(idx))
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path)
