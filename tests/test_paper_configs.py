"""A YAML for every point of the paper's pretraining tables (issue 8, point 11), each naming its table and row in its
comment and encoding that row's values, and nothing else, over configs/tinyllama_60m.yaml.

Table contents are Gu et al., ICLR 2025 (arXiv 2410.10781): §5 text and Figure 5 (data amount, random tokens),
Table 5 (fixed v*), Table 9 (lr x steps), Table 10 right (fixed token), Table 12 (heads, shared biases), Table 13
(learnable dims of k*), Table 14 (softmax alpha; sigmoid lr / weight decay), Table 4 (biases).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import REPO  # noqa: E402

from lit_gpt.run_config import load_run_config  # noqa: E402

C = REPO / "configs"
SIGMOID = {"model.attn_op": "sigmoid", "model.attn_normalize": False}


def _k_bias(**kw):
    return {"model.kv_bias": "k", "model.kv_bias_shared": False, **kw}


# (yaml, words its comment must contain: table / figure and row, expected fields: dotted key -> value)
POINTS = (
    [(f"data_amount/tinyllama_60m_downsample{r}.yaml", ["Figure 5 right", f"{t} training tokens"],
      {"data.downsample_ratio": r})
     for r, t in ((1.0, "5B"), (0.5, "2.5B"), (0.1, "500M"), (0.04, "200M"), (0.02, "100M"), (0.01, "50M"))]
    + [(f"random/tinyllama_60m_random{a}_{b}.yaml", ['"Randomness in data distribution"', what],
        {"data.random_tokens": {"start": a, "end": b, "vocab_size": 50432}})
       for a, b, what in ((0, 1, "x1 ~ Uniform(V)"), (0, 2, "x1, x2 ~ Uniform(V)"), (1, 2, "x2 ~ Uniform(V)"))]
    + [(f"fix/tinyllama_60m_fix_position{p}.yaml", ["Table 10 right", f'column "fixed position {p + 1}"'],
        {"data.fixed_token": {"position": p, "token_id": 1}}) for p in (0, 1, 2)]
    + [(f"lr_steps/tinyllama_60m_lr{lr}_steps{k}k.yaml", [f"Table 9, row lr {lr}, {k}k steps"],
        {"train.lr": float(lr), "train.min_lr": float(lr), "train.max_steps": k * 1000, "train.save_interval": 5000})
       for lr, k in (("8e-4", 10), ("8e-4", 20), ("4e-4", 20), ("2e-4", 20), ("2e-4", 40), ("1e-4", 20), ("1e-4", 80))]
    + [(f"attnsim/tinyllama_60m_softmax_alpha{a}.yaml", [f"Table 14 left, row alpha = {a}"], {"model.softmax_alpha": a})
       for a in (2.0, 0.2, 0.1, 0.05)]
    + [("attnsim/tinyllama_60m_sim_sigmoid_no_norm.yaml", ["Table 14 right, row lr 4e-4, weight decay 0.1"], SIGMOID)]
    + [(f"attnsim/tinyllama_60m_sim_sigmoid_no_norm_{s}.yaml", [f"Table 14 right, row lr {lr}, weight decay {wd}"],
        {**SIGMOID, "train.lr": float(lr), "train.min_lr": float(lr), "train.weight_decay": wd})
       for s, lr, wd in (("decay0", "4e-4", 0.0), ("decay5e-1", "4e-4", 0.5), ("decay1e0", "4e-4", 1.0),
                         ("lr1e-3", "1e-3", 0.1), ("lr1e-4", "1e-4", 0.1))]
    + [(f"kv_bias/tinyllama_60m_k_bias_fixed_v_{kind}{'' if m == 1 else f'_m{m}'}.yaml",
        [f"Table 5, column v* = {m if m > 1 else ''}{sym}"],
        _k_bias(**{"model.kv_bias_value": kind, "model.kv_bias_value_scale": float(m)}))
       for kind, sym in (("one_hot", "v'"), ("uniform", "v''")) for m in (1, 5, 20)]
    + [(f"kv_bias/tinyllama_60m_k_bias_dims{d}.yaml", [f"Table 13, column d_a = {d}"],
        _k_bias(**{"model.kv_bias_key_dims": d})) for d in (1, 2, 4, 8, 16, 32, 64)]
    + [(f"kv_bias/tinyllama_60m_{n}.yaml", [where], {"model.kv_bias": kind, "model.kv_bias_shared": shared})
       for n, where, kind, shared in (("k_head_bias", 'Table 4 row "K biases"', "k", False),
                                      ("kv_head_bias", 'Table 4 row "KV biases"', "kv", False),
                                      ("v_head_bias", 'Table 4 row "V biases"', "v", False),
                                      ("k_bias", 'Table 12 right, column "K biases, shared', "k", True),
                                      ("kv_bias", 'Table 12 right, column "KV biases, shared', "kv", True))]
    + [("kv_bias/tinyllama_60m_sink_token.yaml", ['Table 4 row "learnable sink token"'], {"model.sink_token": True})]
    + [(f"heads/tinyllama_60m_head{h}.yaml", [f"Table 12 left, row H = {h}"],
        {"model.n_head": h, "model.n_query_groups": h, "model.head_size": 768 // h}) for h in (1, 2, 4)]
    + [("heads/tinyllama_60m_head_sum.yaml", ['Table 12 left, row "addition"'],
        {"model.head_output": "sum", "model.n_head": 8, "model.head_size": 96})]
)

# YAMLs of these groups that are not a point of the paper's tables; their comment must say so.
EXTRA = {"data_amount/tinyllama_60m_downsample0.2.yaml", "data_amount/tinyllama_60m_downsample0.4.yaml",
         "attnsim/tinyllama_60m_softmax_alpha0.5.yaml", "kv_bias/tinyllama_60m_v_bias.yaml",
         "kv_bias/tinyllama_60m_sink_logit.yaml"}
GROUPS = ("data_amount", "random", "fix", "lr_steps", "kv_bias", "heads")


def flat(cfg) -> dict:
    """Every resolved field of a run config as dotted keys (the model through its Config)."""
    out = {f"model.{k}": v for k, v in cfg.model_config().to_dict().items() if k != "name"}
    for sec in ("data", "train", "probe"):
        out.update({f"{sec}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, sec)).items()})
    return out


DEFAULT = flat(load_run_config(C / "tinyllama_60m.yaml"))


@pytest.mark.parametrize("rel,words,fields", POINTS, ids=[p[0] for p in POINTS])
def test_paper_point_config(rel, words, fields):
    path = C / rel
    assert path.is_file(), f"missing config for a paper point: {rel}"
    comment = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    for w in words:
        assert w in comment, (rel, w)
    got = flat(load_run_config(path))
    for k, v in fields.items():
        assert got[k] == v, (rel, k, got[k], v)
    changed = {k for k in got if got[k] != DEFAULT[k]}
    assert changed <= set(fields), (rel, {k: got[k] for k in changed - set(fields)})   # only the row's fields


def test_every_yaml_of_these_groups_is_a_paper_point_or_says_it_is_not():
    listed = {p[0] for p in POINTS}
    for group in GROUPS:
        for path in sorted((C / group).glob("*.yaml")):
            rel = f"{group}/{path.name}"
            if rel in listed:
                continue
            assert rel in EXTRA, f"{rel} is neither a paper point nor listed as an extra"
    for rel in EXTRA:
        text = (C / rel).read_text()
        assert ("Not a row" in text or "Not one of the paper's points" in text or "not a\n# row" in text
                or "gpt-oss" in text), rel
