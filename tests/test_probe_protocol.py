"""The sink probe of data-transform runs (issue 8, point 5): training (sink_on_probe), `eval_sink.py --run-probe`
and plain eval_sink.py feed a checkpoint's model what the seed's pretrain/eval_sink_pretrain.py feeds it, through one
code path (lit_gpt.probe.probe_view), checked against a float64 re-statement of the seed's evaluation.

The seed's evaluation (sail-sg/Attention-Sink, pretrain/eval_sink_pretrain.py), for each probe text::

    data = tokenizer.encode(text, eos=False)            # no BOS
    inputs = data[:, :64];  if mode == "fix": inputs[:, fixed_position] = 1
    labels = data[:, 1:65]                              # the natural next tokens, also for fixed-token runs
    importance = (attn / (T - k)).sum(queries);  Sink_k = mean over (sample, layer, head) of importance > 0.3

and random-token runs are evaluated with ``--mode base``: the natural text, no random tokens.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import WORDS, make_packed, tiny_run  # noqa: E402

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.checkpoint import save_checkpoint  # noqa: E402
from lit_gpt.evaluate import sink_on_probe  # noqa: E402
from lit_gpt.probe import probe_view  # noqa: E402
from lit_gpt.run_config import from_dict  # noqa: E402
from lit_gpt.trainer import preflight  # noqa: E402

N, T, K, EPS = 8, 16, 4, 0.3


def seed_probe(texts, fixed=None):
    """The seed's inputs and labels (bytes tokenizer here, so encode = UTF-8 bytes), as plain lists."""
    inputs, labels = [], []
    for text in texts[:N]:
        data = list(text.encode("utf-8"))
        x = data[:T]
        if fixed is not None:
            x[fixed["position"]] = fixed["token_id"]
        inputs.append(x)
        labels.append(data[1:T + 1])
    return inputs, labels


def seed_metrics(model, inputs, labels):
    """mean α per (layer, head, k), Sink_1..K in % and the mean loss, with float64 loops."""
    alpha = np.zeros((model.config.n_layer, model.config.n_head, K))
    hits = np.zeros(K)
    nll, count, pairs = 0.0, 0, 0
    with torch.no_grad():
        for x, y in zip(inputs, labels):
            logits, an = model(torch.tensor([x]), return_analysis={"attn"})
            for l, a in enumerate(an.attn):
                a = a[0].double().numpy()
                for h in range(a.shape[0]):
                    for k in range(K):
                        score = sum(a[h, i, k] for i in range(k, T)) / (T - k)
                        alpha[l, h, k] += score / len(inputs)
                        hits[k] += score > EPS
                    pairs += 1
            lp = torch.log_softmax(logits[0].double(), dim=-1)
            for i in range(T):
                nll -= float(lp[i, y[i]])
                count += 1
    return alpha, hits / pairs * 100, nll / count


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_protocol")
    packed = make_packed(tmp, block_size=32)
    texts = [" ".join(WORDS[i % 7:i % 7 + 12]) + f" {i}" for i in range(N)]
    probe = tmp / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    torch.manual_seed(0)
    cfg = Config.from_name("tiny", n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=320)
    model = GPT(cfg).eval()
    with torch.no_grad():                       # strong first keys: sinks that depend on the inputs
        for b in model.blocks:
            b.attn.qkv.weight.mul_(4.0)
    runs = {}
    for name, transform in (("fixed", {"fixed_token": {"position": 1, "token_id": 7}}),
                            ("random", {"random_tokens": {"start": 0, "end": 2}})):
        d = tiny_run(packed, tmp / name)
        d["model"] = cfg.to_dict()
        d["data"].update(transform)
        d["probe"] = {"source": str(probe), "n": N, "T": T, "k_max": K, "eps": EPS, "batch_size": 3}
        run = from_dict(d)
        runs[name] = (run, save_checkpoint(tmp / name / "final", model, cfg, run_config=run.to_dict(), step=6))
    return tmp, model, texts, probe, runs


def paths_agree_with_the_seed(setup, name, seed_inputs, seed_labels):
    import eval_sink

    tmp, model, texts, probe, runs = setup
    run, ckpt = runs[name]
    ref_alpha, ref_sink, ref_loss = seed_metrics(model, seed_inputs, seed_labels)
    # 1. training: the preflight probe and the training-time call
    plan = preflight(run)
    train_res, train_loss = sink_on_probe(model, plan.probe, eps=EPS, k_max=K, batch_size=3,
                                          transforms=plan.data.transforms)
    # 2. eval_sink.py --run-probe on the checkpoint (the run's own probe, as training measured it)
    assert eval_sink.main([str(ckpt), "--run-probe", "--device", "cpu", "--out", str(tmp / f"{name}_ev.json")]) == 0
    ev = json.loads((tmp / f"{name}_ev.json").read_text())
    # 3. eval_sink.py on the checkpoint (its tokenizer and transform come from the checkpoint)
    assert eval_sink.main([str(ckpt), "--probe", str(probe), "--n", str(N), "--T", str(T), "--k-max", str(K),
                           "--eps", str(EPS), "--device", "cpu", "--out", str(tmp / f"{name}_es.json")]) == 0
    es = json.loads((tmp / f"{name}_es.json").read_text())["checkpoints"][0]
    es_sink = es["inputs"]["natural"]["sink"]
    for alpha, sink, loss in ((train_res.mean_alpha.tolist(), train_res.to_dict()["sink"], train_loss),
                              (ev["mean_alpha"], ev["sink"], ev["probe_loss"]),
                              (es_sink["mean_alpha"], es_sink["sink"], es["inputs"]["natural"]["loss"])):
        assert np.allclose(np.array(alpha, dtype=np.float64), ref_alpha, atol=1e-6)
        assert [sink[f"sink_{k + 1}"] for k in range(K)] == pytest.approx(list(ref_sink), abs=1e-9)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    return ref_alpha, es


def test_fixed_token_runs_are_probed_with_the_token_in_place(setup):
    tmp, model, texts, probe, runs = setup
    fixed = runs["fixed"][0].data.fixed_token
    ref_alpha, es = paths_agree_with_the_seed(setup, "fixed", *seed_probe(texts, fixed))
    natural_alpha, _, _ = seed_metrics(model, *seed_probe(texts))
    assert not np.allclose(ref_alpha, natural_alpha, atol=1e-3)     # the fixed token changes what is measured
    assert es["probe_transforms"] == ["FixedToken(position=1, token_id=7)"]
    assert es["tokenizer"] == "bytes"                                # the checkpoint's, not --tokenizer's default


def test_random_token_runs_are_probed_on_natural_text(setup):
    tmp, model, texts, probe, runs = setup
    ref_alpha, es = paths_agree_with_the_seed(setup, "random", *seed_probe(texts))
    assert es["probe_transforms"] == []
    # validation data keeps the run's random tokens (the seed's lit_dataset_regmix_random* valid shards)
    plan = preflight(runs["random"][0])
    name = next(iter(plan.data.valid_set.domains))
    batch = next(plan.data.valid_set.batches(name, 4))
    natural = np.stack([plan.data.valid_set.domains[name].chunk(int(i)) for i in plan.data.valid_set.indices[name][:4]])
    assert (batch[:, 2:].numpy() == natural[:, 2:]).all() and (batch[:, :2].numpy() != natural[:, :2]).any()


def test_probe_view_leaves_targets_and_rows_natural():
    from lit_gpt.data import FixedToken, RandomTokens

    rows = torch.arange(30).reshape(3, 10)
    inputs, targets = probe_view(rows, [RandomTokens(0, 3, 50, seed=0), FixedToken(2, 99)])
    assert inputs.shape == (3, 9) and (inputs[:, 2] == 99).all()
    assert (inputs[:, [0, 1, 3]] == rows[:, [0, 1, 3]]).all()        # no random tokens on the probe
    assert (targets == rows[:, 1:]).all() and (rows == torch.arange(30).reshape(3, 10)).all()
    only, none = probe_view(rows[:, :9], [FixedToken(0, 5)], has_targets=False)
    assert none is None and (only[:, 0] == 5).all() and (only[:, 1:] == rows[:, 1:9]).all()


def test_run_probe_writes_one_record(setup, capsys):
    import eval_sink

    tmp, model, texts, probe, runs = setup
    ckpts = [str(runs[name][1]) for name in ("fixed", "random")]
    with pytest.raises(SystemExit) as e:
        eval_sink.main([*ckpts, "--run-probe", "--device", "cpu", "--out", str(tmp / "two.json")])
    assert e.value.code == 2 and "writes one record; got 2 checkpoints" in capsys.readouterr().err
    assert not (tmp / "two.json").exists()
