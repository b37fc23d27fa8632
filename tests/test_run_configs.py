"""Every experiment YAML in configs/ loads and means what its name says; composition and overrides."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import REPO, write_yaml  # noqa: E402

from lit_gpt.run_config import RunConfigError, load_run_config, loss_skip  # noqa: E402

CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "mixtures" not in p.parts)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_loads(path):
    cfg = load_run_config(path)
    mc = cfg.model_config()
    assert cfg.data.train and sum(cfg.data.train.values()) > 0
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    assert cfg.probe.T <= mc.block_size


def test_there_is_a_config_for_every_seed_experiment():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    expected = (["tinyllama_60m.yaml", "tinyllama_1b.yaml", "tinyllama_1b_sigmoid.yaml",
                 "postln/tinyllama_60m_postln.yaml"]
                + [f"lr/tinyllama_60m_lr{x}.yaml" for x in ("1e-3", "1e-4", "1e-5")]
                + [f"batch/tinyllama_60m_batch{x}.yaml" for x in (128, 256, 1024)]
                + [f"decay/tinyllama_60m_decay{x}.yaml"
                   for x in ("0", "1e-2", "1e-3", "1e0", "1e1", "2e0", "5e0", "5e-1")]
                + [f"prefix/tinyllama_60m_prefix{x}.yaml" for x in (2, 3, 4, 5, 10)]
                + [f"window/tinyllama_60m_window{x}.yaml" for x in (32, 64, 128, 256, 512, 1024)]
                + [f"pos/tinyllama_60m_{x}.yaml" for x in ("nope", "absolute", "learnable", "relative", "alibi")]
                + [f"ffn/tinyllama_60m_{x}.yaml" for x in ("relu", "gelu", "swish", "reglu", "geglu")]
                + [f"heads/tinyllama_60m_head{x}.yaml" for x in (1, 2, 4)]
                + [f"kv_bias/tinyllama_60m_{x}.yaml" for x in ("k_bias", "k_head_bias", "kv_bias", "kv_head_bias",
                                                               "v_bias", "v_head_bias", "sink_token", "sink_logit")]
                + [f"attnsim/tinyllama_60m_sim_{s}_{n}.yaml" for s in ("sigmoid", "elu") for n in ("norm", "no_norm")]
                + [f"attnkernel/tinyllama_60m_{k}_{n}.yaml"
                   for k in ("elu", "linear", "mlp") for n in ("norm", "no_norm")]
                + [f"fix/tinyllama_60m_fix_position{p}.yaml" for p in (0, 1, 2)])
    missing = [e for e in expected if e not in names]
    assert not missing, missing


@pytest.mark.parametrize("rel,check", [
    ("tinyllama_60m.yaml", lambda c, m: (m.n_layer, m.n_embd, c.train.lr, c.train.min_lr, c.train.global_batch_size,
                                         c.train.max_steps, c.train.warmup_steps, c.train.weight_decay,
                                         len(c.data.train), round(sum(c.data.train.values()), 4))
     == (10, 768, 4e-4, 4e-4, 512, 20000, 100, 0.1, 17, 0.7868)),    # the seed's weights (they sum to 0.79)
    ("window/tinyllama_60m_window256.yaml", lambda c, m: (m.attn_mask, m.window_size) == ("window", 256)),
    ("prefix/tinyllama_60m_prefix5.yaml",
     lambda c, m: (m.attn_mask, m.prefix_size, loss_skip(c, m)) == ("prefix", 5, 4)),
    ("kv_bias/tinyllama_60m_k_bias.yaml", lambda c, m: (m.kv_bias, m.kv_bias_shared) == ("k", True)),
    ("kv_bias/tinyllama_60m_v_head_bias.yaml", lambda c, m: (m.kv_bias, m.kv_bias_shared) == ("v", False)),
    ("attnkernel/tinyllama_60m_linear_no_norm.yaml", lambda c, m: (m.attn_op, m.attn_normalize) == ("identity", False)),
    ("attnsim/tinyllama_60m_sim_sigmoid_no_norm.yaml",
     lambda c, m: (m.attn_op, m.attn_normalize) == ("sigmoid", False)),
    ("pos/tinyllama_60m_learnable.yaml", lambda c, m: m.pos_encoding == "learned"),
    ("pos/tinyllama_60m_relative.yaml", lambda c, m: (m.pos_encoding, m.relative_buckets, m.relative_max_distance)
     == ("relative", 32, 128)),                                      # the paper's fixed bucket index
    ("pos/tinyllama_60m_relative_learned.yaml", lambda c, m: m.pos_encoding == "relative_learned"),
    ("heads/tinyllama_60m_head2.yaml", lambda c, m: (m.n_head, m.head_size) == (2, 384)),
    ("postln/tinyllama_60m_postln.yaml", lambda c, m: m.norm_position == "post"),
    ("decay/tinyllama_60m_decay5e-1.yaml", lambda c, m: c.train.weight_decay == 0.5),
    ("batch/tinyllama_60m_batch128.yaml", lambda c, m: c.train.global_batch_size == 128),
    ("lr/tinyllama_60m_lr1e-5.yaml", lambda c, m: c.train.lr == c.train.min_lr == 1e-5),
    ("fix/tinyllama_60m_fix_position1.yaml", lambda c, m: c.data.fixed_token == {"position": 1, "token_id": 1}),
    ("random/tinyllama_60m_random0_1.yaml",
     lambda c, m: c.data.random_tokens == {"start": 0, "end": 1, "vocab_size": 50432}),
    ("data_amount/tinyllama_60m_downsample0.1.yaml", lambda c, m: c.data.downsample_ratio == 0.1),
    ("tinyllama_1b_sigmoid.yaml", lambda c, m: (m.n_layer, m.attn_op, c.train.micro_batch_size, c.train.max_steps)
     == (22, "sigmoid", 2, 40000)),
])
def test_configs_mean_what_their_names_say(rel, check):
    cfg = load_run_config(REPO / "configs" / rel)
    assert check(cfg, cfg.model_config())


# The seed's configs/lr/tinyllama_60m_lr*.yaml (sail-sg/Attention-Sink): learning_rate, min_lr, max_step,
# warmup_steps, save_step_interval, global_batch_size, micro_batch_size (weight decay: the script's 0.1).
SEED_LR = {"1e-3": (1e-3, 1e-3, 20000, 100, 5000, 512, 16),
           "1e-4": (1e-4, 1e-4, 40000, 100, 5000, 512, 16),
           "1e-5": (1e-5, 1e-5, 80000, 100, 5000, 512, 16)}


@pytest.mark.parametrize("lr", sorted(SEED_LR))
def test_lr_configs_carry_the_seeds_fields(lr):
    from lit_gpt.trainer import lr_at

    cfg = load_run_config(REPO / "configs" / "lr" / f"tinyllama_60m_lr{lr}.yaml")
    t = cfg.train
    assert (t.lr, t.min_lr, t.max_steps, t.warmup_steps, t.save_interval, t.global_batch_size,
            t.micro_batch_size) == SEED_LR[lr]
    assert t.weight_decay == 0.1
    # the seed's get_lr with min_lr == learning_rate: linear warmup, then constant to the last step
    assert lr_at(t.warmup_steps, cfg) == lr_at(t.max_steps - 1, cfg) == t.lr


# Configs that do not read the seed's data the seed's way: the offline corpus keeps its 0.5 / 0.5 weights and the
# CPU demo and the reduced reproduction regimes (configs/repro/: one domain each) use the default. Everything else
# derives from tinyllama_60m.yaml and pools like the seed.
WEIGHTED_MIXTURE = {"tinyllama_60m_shared_corpus.yaml", "demo_cpu.yaml"}


def weighted(rel: str) -> bool:
    return rel in WEIGHTED_MIXTURE or rel.startswith("repro/")


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_paper_configs_read_the_data_as_the_seed(path):
    rel = str(path.relative_to(REPO / "configs"))
    cfg = load_run_config(path)
    assert cfg.data.mixture_mode == ("weighted" if weighted(rel) else "pooled")
    if weighted(rel) and rel != "tinyllama_60m_shared_corpus.yaml":
        assert len(cfg.data.train) == 1, f"{rel}: several domains, so the mixture mode matters: say which"


def test_composition_and_overrides(tmp_path):
    write_yaml(tmp_path / "base.yaml", {"model": {"name": "tiny", "n_layer": 3},
                                             "data": {"train": {"a": 1.0, "b": 2.0}, "seed": 5},
                                             "train": {"lr": 1e-3, "min_lr": 1e-4}})
    (tmp_path / "sub").mkdir()
    write_yaml(tmp_path / "sub" / "mix.yaml", {"train": {"m": 1.0}, "valid": {"v": 1.0}})
    child = write_yaml(tmp_path / "sub" / "child.yaml", {"base": "../base.yaml", "model": {"n_head": 2},
                                                         "data": {"train": {"c": 1.0}}})
    cfg = load_run_config(child, ["train.lr=2e-3", "--train.max_steps", "7", "data.seed=9"])
    assert cfg.model["n_layer"] == 3 and cfg.model["n_head"] == 2          # merged key by key
    assert cfg.data.train == {"c": 1.0}                                      # a mixture is replaced whole
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.max_steps, cfg.data.seed) == (2e-3, 1e-4, 7, 9)
    assert cfg.run_name == "child"
    mixed = write_yaml(tmp_path / "sub" / "m.yaml",
                       {"base": "../base.yaml", "data": {"train": {}, "mixture": "mix.yaml"}})
    cfg = load_run_config(mixed)
    assert cfg.data.train == {"m": 1.0} and cfg.data.valid == {"v": 1.0}     # mixture path relative to its YAML


@pytest.mark.parametrize("content,overrides,match", [
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}, "trian": {}}, [], "unknown key 'trian'"),
    ({"model": {"name": "tiny", "n_heads": 2}, "data": {"train": {"a": 1}}}, [], "unknown field 'n_heads'"),
    ({"model": {"name": "tinyllama_6M"}, "data": {"train": {"a": 1}}}, [], "not a known config"),
    ({"model": {"name": "tiny"}, "data": {"train": {}}}, [], "data.train is empty"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": -1}}}, [], "data.train.a=-1"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["train.strategy=deepspeed"],
     "allowed: auto, ddp, fsdp"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["train.min_lr=1"], "min_lr"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["data.random_tokens={start: 3, end: 2}"],
     "start < end"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["probe.T=4096"], "probe.T=4096"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["--train.lr"], "no value"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["data.mixture_mode=natural"],
     "data.mixture_mode='natural' is invalid; allowed: weighted, pooled"),
    ({"model": {"name": "tiny"}, "data": {"train": {"a": 1}}}, ["train.lr"], "section.key=value"),
])
def test_bad_configs_fail_with_the_key_named(tmp_path, content, overrides, match):
    path = write_yaml(tmp_path / "c.yaml", content)
    with pytest.raises(RunConfigError, match=match):
        load_run_config(path, overrides)


@pytest.mark.parametrize("overrides,line", [
    (["train.lr=0.001", "train.min_lr=0.01"], "train.min_lr=0.01 is invalid; allowed: <= train.lr=0.001"),
    (["train.log_interval=0"], "train.log_interval=0 is invalid; allowed: an integer >= 1"),
    (["train.compile=1"], "train.compile=1 is invalid; allowed: true or false"),      # YAML reads yes as true
    (["train.beta2=1"], "train.beta2=1 is invalid; allowed: 0 <= value < 1"),
    (["probe.eps=1.5"], "probe.eps=1.5 is invalid; allowed: 0 <= eps < 1"),
    (["probe.T=16", "probe.k_max=17"], "probe.k_max=17 is invalid; allowed: <= probe.T = 16"),
    (["data.fixed_token={position: 3, id: 1}"],
     "data.fixed_token={'position': 3, 'id': 1} is invalid; allowed: {position[, token_id]}"),
    (["train.sdpa_backend=cudn"],
     "train.sdpa_backend='cudn' is invalid (did you mean cudnn?); allowed: auto, cudnn, flash, efficient, default"),
    (["train.lr"], "override='train.lr' is invalid; allowed: section.key=value or --section.key value"),
    (["trian.lr=1"],
     "override='trian.lr' is invalid; allowed: <section>.<key> with section in model, data, train, probe, logging"),
])
def test_bad_values_give_the_shared_one_line_error(tmp_path, overrides, line):
    # the whole line, as lit_gpt.utils.invalid_choice words it: field=value, then a rule or the allowed values
    path = write_yaml(tmp_path / "c.yaml", {"model": {"name": "tiny"}, "data": {"train": {"a": 1}}})
    with pytest.raises(RunConfigError) as e:
        load_run_config(path, overrides)
    assert str(e.value) == line
