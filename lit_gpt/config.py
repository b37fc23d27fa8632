"""Model configuration: one dataclass whose fields select every architectural variant of the paper.

``Config.from_name("tinyllama_60M", pos_encoding="alibi")`` gives a named size with overrides;
``Config.from_file("model_config.yaml")`` reads what a checkpoint wrote. Every value is validated in
:meth:`Config.validate`, which raises :class:`ConfigError` with one line naming the field, the value and
the allowed values.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from lit_gpt.utils import did_you_mean, invalid_choice

# allowed values of the categorical fields, in one place
CHOICES: Dict[str, tuple] = {
    "norm_class": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "mlp": ("relu", "gelu", "swish", "reglu", "geglu", "swiglu"),
    # relative: the paper's / seed's T5 buckets, the fixed index g(i-j) added to the logits (no parameters);
    # relative_learned: T5's learned scalar per (bucket, head)
    "pos_encoding": ("rope", "nope", "sinusoidal", "learned", "alibi", "relative", "relative_learned"),
    "head_output": ("concat", "sum"),
    "attn_mask": ("causal", "window", "prefix"),
    # attention operation v_i = Z_i^-1 sum_j sim(q_i, k_j) v_j (paper Tables 6 and 15)
    #   softmax:    sim = exp(q.k/sqrt(d)),            Z = sum / alpha        (alpha = softmax_alpha)
    #   sigmoid:    sim = sigmoid(q.k/sqrt(d)),        Z = sum or 1
    #   elu:        sim = elu(q.k/sqrt(d)) + 1,        Z = sum or 1
    #   elu_kernel: sim = phi(q).phi(k), phi = elu+1,  Z = sum or 1          (linear attention)
    #   identity:   sim = q.k/sqrt(d),                 Z = max(|sum|, 1) or 1
    #   mlp_kernel: sim = phi(q).phi(k)/sqrt(d), phi = Linear-ReLU-Linear on d_h shared by q and k,
    #               Z = max(|sum|, 1) or 1
    "attn_op": ("softmax", "sigmoid", "elu", "elu_kernel", "identity", "mlp_kernel"),
    # extra key/value parameters (paper §7.3):
    #   k:  a learned key slot k* prepended on the key axis with value v* (zero unless kv_bias_value says otherwise)
    #   kv: a learned key slot k* with a learned value v*
    #   v:  a learned value bias v* added to every value (no extra slot; equals output + v* under softmax)
    "kv_bias": ("none", "k", "v", "kv"),
    "kv_bias_value": ("zero", "one_hot", "uniform"),
    # auto: SDPA / FlexAttention for softmax, the fused Triton kernel for sigmoid / elu on CUDA, eager otherwise;
    # triton: that kernel explicitly (sigmoid / elu only; on CPU it runs in Triton's interpreter, for tests)
    "attn_impl": ("auto", "sdpa", "flex", "eager", "triton"),
    # RoPE on the qkv projection: auto: the fused Triton op on CUDA (lit_gpt.kernels.rope), tensor ops elsewhere;
    # triton: that op explicitly (on CPU in Triton's interpreter, for tests); torch: tensor ops everywhere
    "rope_impl": ("auto", "triton", "torch"),
}


RELATIVE_POSITIONS = ("relative", "relative_learned")                # T5 bucketed relative biases
SCORE_BIAS_POSITIONS = ("alibi",) + RELATIVE_POSITIONS                # additive score biases


class ConfigError(ValueError):
    """A configuration field has an invalid or incompatible value."""


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(invalid_choice(f"Config.{name}", value, allowed))


@dataclass
class Config:
    name: str = "custom"
    # ---- sizes ----
    block_size: int = 2048                 # training context length
    vocab_size: int = 50432                # embedding rows (a tokenizer's vocab must not exceed it)
    padding_multiple: int = 64             # vocab_size is rounded up to a multiple of this
    n_layer: int = 10
    n_head: int = 8
    n_embd: int = 768
    head_size: Optional[int] = None        # default: n_embd // n_head (concat) or n_embd (sum)
    n_query_groups: Optional[int] = None   # grouped-query attention; default n_head (MHA)
    intermediate_size: int = 1536
    bias: bool = False                     # biases on the linear layers
    tie_embeddings: bool = False           # share the embedding with the LM head
    # ---- norms ----
    norm_class: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    # ---- feed-forward ----
    mlp: str = "swiglu"
    # ---- positions ----
    pos_encoding: str = "rope"
    rope_base: float = 10000.0
    rotary_percentage: float = 1.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # ---- heads ----
    head_output: str = "concat"
    # ---- attention mask ----
    attn_mask: str = "causal"
    window_size: Optional[int] = None      # attn_mask="window": query i sees keys j with i - w < j <= i
    prefix_size: Optional[int] = None      # attn_mask="prefix": the first p tokens see each other
    # ---- attention operation ----
    attn_op: str = "softmax"
    attn_normalize: bool = True            # Z = sum (or max(|sum|,1)) vs Z = 1; softmax is always normalised
    softmax_alpha: float = 1.0             # softmax rows sum to alpha (paper Table 14)
    # ---- extra key/value slots ----
    kv_bias: str = "none"
    kv_bias_shared: bool = False           # one k*/v* shared by all heads instead of one per head
    kv_bias_value: str = "zero"            # value of the k* slot when kv_bias="k": 0, m*[1,0..0] or m*[1/sqrt(d_h)]*d_h
    kv_bias_value_scale: float = 1.0       # m in the line above
    kv_bias_key_dims: Optional[int] = None  # only the first d_a dims of k* are learnable (paper Table 13)
    sink_token: bool = False               # learnable sink token prepended to every sequence (StreamingLLM §3.3)
    sink_logit: bool = False               # learned per-head logit in the softmax denominator (gpt-oss form)
    # ---- implementation ----
    attn_impl: str = "auto"                # auto: SDPA / Flex (CUDA) for softmax, Triton (CUDA) for sigmoid / elu
    rope_impl: str = "torch"               # torch: tensor ops; auto: the fused Triton RoPE + qkv split on CUDA (full
                                           # forwards), triton: it everywhere. Opt-in until a GPU run has measured it
    extra: Dict[str, Any] = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        if self.head_size is None:
            self.head_size = self.n_embd if self.head_output == "sum" else (
                self.n_embd // self.n_head if isinstance(self.n_head, int) and self.n_head > 0 else None)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if isinstance(self.vocab_size, int) and isinstance(self.padding_multiple, int) and self.padding_multiple > 0:
            self.vocab_size = int(math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(invalid_choice(f"Config.{name}", value, allowed))
        for name in ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_head", "n_embd",
                     "head_size", "n_query_groups", "intermediate_size", "relative_buckets",
                     "relative_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(name, value, "a positive integer")
        for name in ("bias", "tie_embeddings", "attn_normalize", "kv_bias_shared", "sink_token", "sink_logit"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise _bad("norm_eps", self.norm_eps, "a positive number")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise _bad("rope_base", self.rope_base, "a number > 1")
        if not (isinstance(self.softmax_alpha, (int, float)) and self.softmax_alpha > 0):
            raise _bad("softmax_alpha", self.softmax_alpha, "a positive number")
        if self.head_output == "concat" and self.n_head * self.head_size != self.n_embd:
            raise _bad("head_size", self.head_size,
                       f"n_embd / n_head = {self.n_embd}/{self.n_head} when head_output='concat' "
                       f"(n_embd must be divisible by n_head)")
        if self.n_head % self.n_query_groups != 0:
            raise _bad("n_query_groups", self.n_query_groups, f"a divisor of n_head={self.n_head}")
        if not (0.0 < self.rotary_percentage <= 1.0):
            raise _bad("rotary_percentage", self.rotary_percentage, "0 < value <= 1")
        if self.pos_encoding == "rope" and int(self.rotary_percentage * self.head_size) % 2 != 0:
            raise _bad("rotary_percentage", self.rotary_percentage,
                       f"a value making rotary_percentage*head_size even (head_size={self.head_size})")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2 != 0:
            raise _bad("n_embd", self.n_embd, "an even number with pos_encoding='sinusoidal'")
        # masks
        if self.attn_mask == "window":
            if not isinstance(self.window_size, int) or isinstance(self.window_size, bool) or self.window_size < 1:
                raise _bad("window_size", self.window_size, "a positive integer when attn_mask='window'")
        elif self.window_size is not None:
            raise _bad("window_size", self.window_size,
                       f"null unless attn_mask='window' (attn_mask={self.attn_mask!r})")
        if self.attn_mask == "prefix":
            if (not isinstance(self.prefix_size, int) or isinstance(self.prefix_size, bool)
                    or not 1 <= self.prefix_size <= self.block_size):
                raise _bad("prefix_size", self.prefix_size, f"an integer in [1, block_size={self.block_size}] "
                                                            "when attn_mask='prefix'")
        elif self.prefix_size is not None:
            raise _bad("prefix_size", self.prefix_size,
                       f"null unless attn_mask='prefix' (attn_mask={self.attn_mask!r})")
        # attention operation
        if self.attn_op == "softmax" and not self.attn_normalize:
            raise _bad("attn_normalize", self.attn_normalize,
                       "true with attn_op='softmax' (use softmax_alpha to rescale; pick sigmoid/elu/... for Z=1)")
        if self.attn_op != "softmax" and self.softmax_alpha != 1.0:
            raise _bad("softmax_alpha", self.softmax_alpha, f"1.0 unless attn_op='softmax' (attn_op={self.attn_op!r})")
        if self.attn_impl in ("sdpa", "flex") and self.attn_op != "softmax":
            raise _bad("attn_impl", self.attn_impl, f"auto or eager with attn_op={self.attn_op!r} "
                                                   "(fused kernels only compute softmax attention)")
        if self.attn_impl == "triton" and (self.attn_op not in ("sigmoid", "elu")
                                           or self.pos_encoding in RELATIVE_POSITIONS):
            raise _bad("attn_impl", self.attn_impl, f"auto, sdpa, flex or eager with attn_op={self.attn_op!r}, "
                       f"pos_encoding={self.pos_encoding!r} (the Triton kernel computes sigmoid / elu without T5 bias)")
        if self.pos_encoding in SCORE_BIAS_POSITIONS and self.attn_op not in ("softmax", "sigmoid", "elu"):
            raise _bad("pos_encoding", self.pos_encoding,
                       f"rope, nope, sinusoidal or learned with attn_op={self.attn_op!r} "
                       "(an additive score bias needs a score-based operation: softmax, sigmoid, elu)")
        # extra slots
        if self.kv_bias_value != "zero" and self.kv_bias != "k":
            raise _bad("kv_bias_value", self.kv_bias_value,
                       f"'zero' unless kv_bias='k' (kv_bias={self.kv_bias!r}); a fixed value needs a learned key only")
        if self.kv_bias_key_dims is not None:
            if self.kv_bias not in ("k", "kv"):
                raise _bad("kv_bias_key_dims", self.kv_bias_key_dims,
                           f"null unless kv_bias is 'k' or 'kv' (kv_bias={self.kv_bias!r})")
            if (not isinstance(self.kv_bias_key_dims, int) or isinstance(self.kv_bias_key_dims, bool)
                    or not 0 <= self.kv_bias_key_dims <= self.head_size):
                raise _bad("kv_bias_key_dims", self.kv_bias_key_dims, f"an integer in [0, head_size={self.head_size}]")
        if self.kv_bias_shared and self.kv_bias == "none":
            raise _bad("kv_bias_shared", self.kv_bias_shared, "false when kv_bias='none'")
        if self.sink_logit and self.attn_op != "softmax":
            raise _bad("sink_logit", self.sink_logit, f"false unless attn_op='softmax' (attn_op={self.attn_op!r})")
        if self.sink_token and self.attn_mask == "prefix":
            raise _bad("sink_token", self.sink_token, "false with attn_mask='prefix' (the prefix would shift)")

    # ------------------------------------------------------------------ derived
    @property
    def n_extra_slots(self) -> int:
        """Columns placed before the token keys in attention maps (k* slot, sink logit, sink token)."""
        return int(self.kv_bias in ("k", "kv")) + int(self.sink_logit) + int(self.sink_token)

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_keys(cls, keys, where: str = "Config") -> None:
        known = set(cls.field_names())
        for key in keys:
            if key not in known:
                raise ConfigError(f"{where}: unknown field {key!r}{did_you_mean(key, known)}; allowed: "
                                  f"{', '.join(sorted(known))}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "Config") -> "Config":
        cls.check_keys(d.keys(), where)
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in NAMED_CONFIGS:
            hint = did_you_mean(name, NAMED_CONFIGS)
            raise ConfigError(f"Config.name={name!r} is not a known config{hint}; allowed: "
                              f"{', '.join(sorted(NAMED_CONFIGS))}")
        d = dict(NAMED_CONFIGS[name])
        cls.check_keys(overrides.keys(), f"Config.from_name({name!r})")
        d.update(overrides)
        d.setdefault("name", name)
        return cls(**d)

    @classmethod
    def from_file(cls, path: Union[str, Path], **overrides: Any) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of Config fields, got {type(d).__name__}")
        if "model_config" in d and isinstance(d["model_config"], dict):   # a checkpoint's full record
            d = d["model_config"]
        d.update(overrides)
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes``; derived defaults (head_size, n_query_groups) follow the change."""
        self.check_keys(changes.keys(), "Config.replace")
        d = self.to_dict()
        shape = {k: d[k] for k in ("n_layer", "n_head", "n_embd", "head_output")}
        default = Config(**shape, block_size=self.block_size)
        for derived in ("head_size", "n_query_groups"):
            if derived not in changes and d[derived] == getattr(default, derived):
                d[derived] = None
        d.update(changes)
        return Config(**d)

    def save(self, path: Union[str, Path]) -> None:
        from lit_gpt.utils import atomic_write_text

        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(
            self.to_dict(), sort_keys=False)
        atomic_write_text(path, text)


# ---------------------------------------------------------------------------- named sizes
_LLAMA_60M = dict(block_size=2048, vocab_size=50432, n_layer=10, n_head=8, n_embd=768, intermediate_size=1536,
                  mlp="swiglu", norm_class="rmsnorm", norm_eps=1e-5, rope_base=10000.0, bias=False)

NAMED_CONFIGS: Dict[str, Dict[str, Any]] = {
    # the paper's default ~60M LLaMA; vocab 50432 as in the seed (GPT-NeoX has 50277 tokens; 50432 = 788 * 64)
    "tinyllama_60M": dict(_LLAMA_60M),
    "tinyllama_60M_head1": dict(_LLAMA_60M, n_head=1),
    "tinyllama_60M_head2": dict(_LLAMA_60M, n_head=2),
    "tinyllama_60M_head4": dict(_LLAMA_60M, n_head=4),
    # the paper's 1B scale-up (TinyLlama-1.1B shape with the GPT-NeoX vocabulary)
    "tinyllama_1_1b": dict(_LLAMA_60M, n_layer=22, n_head=16, n_embd=2048, intermediate_size=5632),
    # tiny sizes for tests and CPU demos
    "tiny": dict(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=32, intermediate_size=64),
    "tiny_1M": dict(block_size=256, vocab_size=50432, n_layer=2, n_head=4, n_embd=64, intermediate_size=128),
    "tinyllama_demo": dict(block_size=128, vocab_size=50432, n_layer=4, n_head=4, n_embd=128, intermediate_size=256),
    # llama2.c stories260K (see lit_gpt/llama2c.py): GQA, tied embeddings
    "stories260K": dict(block_size=512, vocab_size=512, padding_multiple=1, n_layer=5, n_head=8,
                        n_query_groups=4, n_embd=64, intermediate_size=172, tie_embeddings=True),
}
