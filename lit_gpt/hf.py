"""Hugging Face causal LMs meet the same analysis code as our GPT.

* :func:`load_hf` — a Hub id, a local folder (``local_files_only=True``: a local path never touches the Hub) or a
  GGUF file (``path/to/model.gguf`` or a folder / Hub id plus ``gguf_file=``), with its tokenizer.
* Capture: a recording attention function registered in transformers' attention interface
  (``AttentionInterface`` + its mask interface) under the name :data:`CAPTURE_IMPL`. It receives q/k/v exactly
  as the model attends with them (after RoPE, partial rotary included; keys/values before the grouped-KV
  repeat), records them, and delegates to the model family's own eager attention, so the numbers and the
  attention maps are those of ``attn_implementation="eager"``. No model source is edited. Hidden states come
  from forward hooks on the decoder layers (input of every layer, then the output of the last layer before the
  final norm — the convention of our GPT's :class:`lit_gpt.model.Analysis`; HF's own ``hidden_states[-1]`` is
  after the final norm).
* :func:`hf_forward` — ``(logits, Analysis)`` for a Hugging Face model, like ``GPT(idx, return_analysis=...)``.
  Queries are rescaled so that the attention logit is q·k/sqrt(d) for every family (OPT pre-scales q inside
  its projection; GPT-2 may scale by the inverse layer index).
* :func:`export_llama` — our checkpoints whose variant ``LlamaForCausalLM`` can express (RoPE, SwiGLU,
  pre-RMSNorm, softmax, causal mask, no extra slots) to a Hugging Face folder.
"""
from __future__ import annotations

import contextvars
import gc
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lit_gpt.attention import repeat_kv
from lit_gpt.utils import invalid_choice

CAPTURE_IMPL = "sinklab_capture"

# The seed's pool of 30 open-source models (its eval_sink_open_source.py), the default list of the drivers.
DEFAULT_POOL: Tuple[str, ...] = (
    "openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
    "openai-community/gpt2-xl",
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-7b-chat-hf",
    "meta-llama/Llama-2-13b-chat-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
    *(f"EleutherAI/pythia-{s}" for s in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")),
    *(f"facebook/opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b")),
    "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1",
)


# ---------------------------------------------------------------------------- capture
class _Recorder:
    def __init__(self, need: Iterable[str]) -> None:
        self.need = set(need)
        self.q: Dict[int, torch.Tensor] = {}
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self._order: Dict[int, int] = {}

    def layer_of(self, module: nn.Module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:                     # fall back to call order
            idx = self._order.setdefault(id(module), len(self._order))
        return int(idx)

    def record(self, module, query, key, value, scaling: Optional[float]) -> None:
        layer = self.layer_of(module)
        d = query.shape[-1]
        s = d ** -0.5 if scaling is None else float(scaling)
        if "q" in self.need:
            # logit = s * q·k = (q * s * sqrt(d))·k / sqrt(d)
            q = query.detach()
            self.q[layer] = q if abs(s * d ** 0.5 - 1.0) < 1e-12 else q * (s * d ** 0.5)
        if "k" in self.need:
            self.k[layer] = key.detach()
        if "v" in self.need:
            self.v[layer] = value.detach()


_ACTIVE: contextvars.ContextVar[Optional[_Recorder]] = contextvars.ContextVar("sinklab_recorder", default=None)


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention for families without a module-level ``eager_attention_forward``."""
    H = query.shape[1]
    k, v = repeat_kv(key, H), repeat_kv(value, H)
    s = query.shape[-1] ** -0.5 if scaling is None else scaling
    w = (query @ k.transpose(-1, -2)) * s
    if attention_mask is not None:
        w = w + attention_mask[..., : k.shape[-2]]
    w = torch.softmax(w.float(), dim=-1).to(query.dtype)
    return (w @ v).transpose(1, 2).contiguous(), w


def _family_eager(module: nn.Module) -> Callable:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else _generic_eager


def capture_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: record q/k/v (post positional encoding), then the family's eager path."""
    rec = _ACTIVE.get()
    if rec is not None:
        rec.record(module, query, key, value, kwargs.get("scaling"))
    return _family_eager(module)(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> str:
    """Register :func:`capture_attention` (and the eager mask for it) in transformers' interfaces; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(CAPTURE_IMPL, capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return CAPTURE_IMPL


def enable_capture(model: nn.Module) -> bool:
    """Switch a loaded model to the capture attention. False if the model does not dispatch through
    transformers' AttentionInterface (then only attention maps and hidden states can be measured)."""
    register_capture()
    if getattr(model.config, "_attn_implementation", None) == CAPTURE_IMPL:
        return True
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        return False
    model.set_attn_implementation(CAPTURE_IMPL)
    return model.config._attn_implementation == CAPTURE_IMPL


def text_config(model_or_config) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (transformer.h, gpt_neox.layers, model.decoder.layers, model.layers...)."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    best = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            if best is None:
                best = m
    if best is None:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (a ModuleList of "
                         f"num_hidden_layers={n} modules)")
    return best


@torch.no_grad()
def hf_forward(model: nn.Module, idx: torch.Tensor, need: Iterable[str] = ("attn", "hidden", "q", "k", "v"),
               position_ids: Optional[torch.Tensor] = None):
    """``(logits, Analysis)`` for a Hugging Face causal LM, in the conventions of our GPT's analysis
    (``position_ids`` (B|1, T): the model's default 0..T-1 when None)."""
    from lit_gpt.model import ANALYSIS_KEYS, Analysis

    need = set(need)
    bad = need - set(ANALYSIS_KEYS)
    if bad:
        raise ValueError(invalid_choice("need", sorted(bad), ANALYSIS_KEYS))
    qkv = need & {"q", "k", "v"}
    if (qkv or "attn" in need) and not enable_capture(model):
        if qkv:
            raise ValueError(f"{type(model).__name__} does not dispatch through transformers' AttentionInterface; "
                             "q/k/v capture is unsupported for it (only 'attn' with eager attention and 'hidden')")
    hidden: List[Optional[torch.Tensor]] = []
    handles = []
    if "hidden" in need:
        layers = decoder_layers(model)
        hidden = [None] * (len(layers) + 1)

        def pre_hook(_m, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            hidden[0] = x.detach()

        def make_hook(i):
            def hook(_m, _args, out):
                hidden[i + 1] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
            return hook

        handles.append(layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles += [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    rec = _Recorder(qkv)
    token = _ACTIVE.set(rec if qkv else None)
    try:
        pos = {} if position_ids is None else {"position_ids": position_ids}
        out = model(input_ids=idx, output_attentions="attn" in need, use_cache=False, return_dict=True, **pos)
    finally:
        _ACTIVE.reset(token)
        for h in handles:
            h.remove()
    an = Analysis()
    if "attn" in need:
        attn = getattr(out, "attentions", None)
        if not attn or any(a is None for a in attn):
            raise ValueError(f"{type(model).__name__} returned no attention maps; load it with eager attention")
        an.attn = [a.float() for a in attn]
    if "hidden" in need:
        if any(h is None for h in hidden):
            raise ValueError(f"{type(model).__name__}: the decoder-layer hooks did not see every layer")
        an.hidden = hidden
    for name in qkv:
        got = getattr(rec, name)
        if not got:
            raise ValueError(f"{type(model).__name__}: the capture attention was not called (does the model use "
                             "transformers' AttentionInterface?)")
        setattr(an, name, [got[i] for i in sorted(got)])
    return out.logits, an


# ---------------------------------------------------------------------------- loading
def resolve_source(spec: Union[str, Path], gguf_file: Optional[str] = None) -> Tuple[str, Optional[str], bool]:
    """(name_or_folder, gguf_file, is_local). A path to a .gguf file splits into its folder and file name; a
    folder is local; a string that looks like a path but does not exist is an error (never a Hub lookup)."""
    s = str(spec)
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model={s!r} is a file but not a .gguf; allowed: a Hub id, a model folder, a .gguf file")
        return str(p.parent.resolve()), p.name, True
    if p.is_dir():
        if gguf_file is None and not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif len(ggufs) > 1:
                raise ValueError(f"{p} holds several .gguf files {ggufs}; pass gguf_file= (--gguf-file) to choose")
        return str(p.resolve()), gguf_file, True
    if s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") > 1:
        raise FileNotFoundError(f"model={s!r} is not an existing file or folder (and not a Hub id 'owner/name')")
    return s, gguf_file, False


def _source_kwargs(spec: Union[str, Path], gguf_file: Optional[str], trust_remote_code: bool,
                   revision: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(name_or_folder, the from_pretrained keywords every loader of that source shares)."""
    name, gguf_file, local = resolve_source(spec, gguf_file)
    common: Dict[str, Any] = {"local_files_only": local, "trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    if revision and not local:
        common["revision"] = revision
    return name, common


def load_hf_config(spec: Union[str, Path], *, gguf_file: Optional[str] = None, trust_remote_code: bool = False,
                   revision: Optional[str] = None):
    """The model's config alone (``AutoConfig``; for a GGUF file, its metadata): what can be checked before
    the weights load."""
    from transformers import AutoConfig

    name, common = _source_kwargs(spec, gguf_file, trust_remote_code, revision)
    return AutoConfig.from_pretrained(name, **common)


def load_hf(spec: Union[str, Path], *, dtype: Union[str, torch.dtype] = "float32",
            device: Union[str, torch.device, None] = None, gguf_file: Optional[str] = None,
            device_map: Optional[str] = None, trust_remote_code: bool = False, revision: Optional[str] = None,
            with_tokenizer: bool = True, config=None):
    """Load a causal LM (and its tokenizer) for analysis, attention through :data:`CAPTURE_IMPL` (the family's
    eager attention plus recording). GGUF weights are dequantised by transformers, then cast to ``dtype``.
    ``config``: the already-loaded config of that source (:func:`load_hf_config`), not read again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_gpt.utils import default_device, parse_dtype

    name, common = _source_kwargs(spec, gguf_file, trust_remote_code, revision)
    torch_dtype = parse_dtype(dtype)
    register_capture()
    kwargs = dict(common, dtype=torch_dtype, attn_implementation=CAPTURE_IMPL)
    if config is not None:
        kwargs["config"] = config
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if torch_dtype is not None and next(model.parameters()).dtype != torch_dtype:
        model.to(torch_dtype)                   # GGUF tensors arrive dequantised in float32
    if not device_map:
        model.to(torch.device(device) if device is not None else default_device())
    model.eval()
    tok = AutoTokenizer.from_pretrained(name, **common) if with_tokenizer else None
    return model, tok


def free_model(model: Optional[nn.Module] = None) -> None:
    """Drop references held here and return cached memory (call ``del model`` in the caller as well)."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- tokenizer helpers
def special_prefix(tokenizer) -> List[int]:
    """The ids the tokenizer puts before the text (BOS for Llama/OPT, nothing for GPT-2/Pythia/SmolLM2)."""
    text = "The attention sink is the first token."
    with_sp = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i:i + len(plain)] == plain:
            return with_sp[:i]
    return []


# ---------------------------------------------------------------------------- export
def llama_incompatibility(config) -> Optional[str]:
    """None if ``LlamaForCausalLM`` expresses the config, else one line naming the field and value."""
    required = {
        "pos_encoding": "rope", "mlp": "swiglu", "norm_class": "rmsnorm", "norm_position": "pre",
        "attn_op": "softmax", "attn_mask": "causal", "kv_bias": "none", "head_output": "concat",
        "sink_token": False, "sink_logit": False, "softmax_alpha": 1.0, "rotary_percentage": 1.0,
    }
    for name, want in required.items():
        got = getattr(config, name)
        if got != want:
            return (f"cannot export to LlamaForCausalLM: Config.{name}={got!r}; LlamaForCausalLM needs "
                    f"{name}={want!r}")
    return None


def _llama_config(config, tokenizer=None):
    from transformers import LlamaConfig

    extra = {}
    if tokenizer is not None:
        extra = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, head_dim=config.head_size, hidden_act="silu",
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_base)},
        attention_bias=config.bias, mlp_bias=config.bias, tie_word_embeddings=config.tie_embeddings,
        **extra,
    )


def llama_state_dict(model) -> Dict[str, torch.Tensor]:
    """Our GPT's weights under LlamaForCausalLM names (qkv rows split [q|k|v], fc rows split [gate; up])."""
    cfg = model.config
    H, G, d = cfg.n_head, cfg.n_query_groups, cfg.head_size
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "norm_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "norm_2.weight"]
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[src + f"attn.qkv.{suffix}"].split((H * d, G * d, G * d), dim=0)
            out[dst + f"self_attn.q_proj.{suffix}"] = q
            out[dst + f"self_attn.k_proj.{suffix}"] = k
            out[dst + f"self_attn.v_proj.{suffix}"] = v
            out[dst + f"self_attn.o_proj.{suffix}"] = sd[src + f"attn.proj.{suffix}"]
            gate, up = sd[src + f"mlp.fc.{suffix}"].chunk(2, dim=0)
            out[dst + f"mlp.gate_proj.{suffix}"] = gate
            out[dst + f"mlp.up_proj.{suffix}"] = up
            out[dst + f"mlp.down_proj.{suffix}"] = sd[src + f"mlp.proj.{suffix}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_llama(checkpoint_or_model, out_folder: Union[str, Path], tokenizer: Union[str, Path, None] = None,
                 dtype: Union[str, torch.dtype, None] = None, overwrite: bool = False) -> Path:
    """Write a LlamaForCausalLM folder (config.json, model.safetensors, tokenizer files when ``tokenizer`` is a
    tokenizer.json) from a checkpoint path or a GPT. The folder appears complete or not at all."""
    from transformers import LlamaForCausalLM

    from lit_gpt.checkpoint import checkpoint_tokenizer, load_model
    from lit_gpt.model import GPT
    from lit_gpt.utils import parse_dtype

    if isinstance(checkpoint_or_model, GPT):
        model, payload = checkpoint_or_model, {}
    else:
        model, payload = load_model(checkpoint_or_model)
        if tokenizer is None:
            tokenizer = checkpoint_tokenizer(payload)
    reason = llama_incompatibility(model.config)
    if reason:
        raise ValueError(reason)
    out = Path(out_folder)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_folder={str(out)!r} exists and is not empty; pass overwrite=True (--overwrite)")
    tok = None
    if tokenizer is not None:
        from lit_gpt.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        if tok.kind != "hf":
            raise ValueError(f"tokenizer={str(tokenizer)!r} is {tok.kind}; export copies tokenizer.json files only "
                             "(allowed: a tokenizer.json or a folder holding one)")
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer vocab_size={tok.vocab_size} exceeds the model's {model.config.vocab_size}")
    hf_cfg = _llama_config(model.config, tok)
    target_dtype = parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    missing = [m for m in missing if not (model.config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:     # a bug in the name mapping, never a user error
        raise RuntimeError(f"export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.to(target_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:
        hf.save_pretrained(tmp)
        if tok is not None:
            _save_tokenizer(tok, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_tokenizer(tok, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    src = Path(tok.source).expanduser()
    file = src / "tokenizer.json" if src.is_dir() else src
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id}
    special = {k: tok._tok.id_to_token(v) for k, v in names.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_file=str(file), **special)
    fast.save_pretrained(folder)
