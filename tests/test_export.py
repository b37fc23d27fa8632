"""Export to LlamaForCausalLM: logits round trip, refusals, tokenizer, and eval_sink.py on the same checkpoint
agreeing with eval_sink_open_source.py on its export."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.checkpoint import save_checkpoint  # noqa: E402
from lit_gpt.hf import export_llama, llama_incompatibility  # noqa: E402

WORDS = [f"w{i}" for i in range(93)]


def tiny_tokenizer_json(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def trained_like(cfg: Config) -> GPT:
    """A GPT with non-trivial norm weights (all-ones norms would hide a swapped norm_1/norm_2)."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [
    {},
    {"n_query_groups": 2, "tie_embeddings": True},
    {"bias": True, "rope_base": 500.0, "norm_eps": 1e-6},
])
def test_logits_round_trip(tmp_path, overrides):
    from transformers import LlamaForCausalLM

    cfg = Config.from_name("tiny", **overrides)
    model = trained_like(cfg)
    ckpt = save_checkpoint(tmp_path / "final", model, cfg)
    out = export_llama(ckpt, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == cfg.n_query_groups
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    idx = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours.abs().max().item() > 0.1                           # not a trivially zero comparison


@pytest.mark.parametrize("field, value", [
    ("pos_encoding", "alibi"), ("mlp", "gelu"), ("norm_class", "layernorm"), ("norm_position", "post"),
    ("attn_op", "sigmoid"), ("kv_bias", "kv"), ("sink_token", True), ("sink_logit", True),
    ("softmax_alpha", 2.0), ("rotary_percentage", 0.5), ("head_output", "sum"),
])
def test_refuses_what_llama_cannot_express(tmp_path, field, value):
    extra = {"attn_normalize": True} if field == "attn_op" else {}
    cfg = Config.from_name("tiny", **{field: value}, **extra)
    msg = llama_incompatibility(cfg)
    assert msg is not None and f"Config.{field}={value!r}" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=f"Config.{field}="):
        export_llama(GPT(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_window_mask_refused_and_no_overwrite(tmp_path):
    cfg = Config.from_name("tiny", attn_mask="window", window_size=8)
    with pytest.raises(ValueError, match="attn_mask='window'"):
        export_llama(GPT(cfg), tmp_path / "w")
    model = GPT(Config.from_name("tiny"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_llama(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    export_llama(model, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "config.json").is_file() and not (tmp_path / "busy" / "keep.txt").exists()


def test_eval_sink_agrees_with_open_source_driver_on_the_export(tmp_path):
    """eval_sink.py on our checkpoint and eval_sink_open_source.py on its export see the same tokens and the same
    attention: equal mean α per (layer, head, k)."""
    import eval_sink
    import eval_sink_open_source
    from transformers import AutoTokenizer

    from lit_gpt.tokenizer import Tokenizer

    tok_file = tiny_tokenizer_json(tmp_path / "tok")
    cfg = Config.from_name("tiny", n_query_groups=2)
    model = trained_like(cfg)
    with torch.no_grad():                       # make some heads attend to token 1 so α is not uniform noise
        for b in model.blocks:
            b.attn.qkv.weight.mul_(4.0)
    ckpt = save_checkpoint(tmp_path / "run" / "final", model, cfg, run_config={"tokenizer": str(tok_file)})
    export_llama(ckpt, tmp_path / "hf")         # tokenizer from the checkpoint's run_config
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = " ".join(WORDS[5:25])
    assert hf_tok(text)["input_ids"] == Tokenizer(tok_file).encode(text)

    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 30])}) + "\n" for i in range(8)))
    common = ["--probe", str(probe), "--n", "8", "--T", "16", "--device", "cpu", "--inputs", "natural", "random"]
    assert eval_sink.main([str(tmp_path / "run")] + common + ["--out", str(tmp_path / "ours.json"),
                                                              "--plots", str(tmp_path / "plots")]) == 0
    assert eval_sink_open_source.main(["--models", str(tmp_path / "hf"), "--out", str(tmp_path / "os")] + common) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["checkpoints"][0]["inputs"]
    # natural text: the same tokens reach both (random inputs are drawn with T+1 vs T columns, so they differ)
    theirs = json.loads((tmp_path / "os" / "hf" / "sink_natural.json").read_text())
    a = torch.tensor(ours["natural"]["sink"]["mean_alpha"])
    assert torch.allclose(a, torch.tensor(theirs["mean_alpha"]), atol=1e-5)
    assert a.std() > 0.01                                          # heads differ: not a uniform-attention tie
    assert ours["natural"]["sink"]["sink"] == pytest.approx(theirs["sink"], abs=1e-9)
    for kind in ("natural", "random"):
        assert ours[kind]["loss"] > 0 and len(ours[kind]["activations"]["summary"]["massive_ratio"]) == cfg.n_layer + 1
    assert (tmp_path / "plots" / "final" / "norms_natural.png").is_file()
