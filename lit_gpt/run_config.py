"""Run configuration for ``pretrain.py``: YAML files that compose, plus command-line overrides.

A run YAML has five sections (every key optional; defaults below)::

    base: ../tinyllama_60m.yaml        # optional: a file this one overrides (path relative to this file)
    model:   {name: tinyllama_60M, attn_mask: window, window_size: 256}   # Config name + Config fields
    data:    {train_dir: ..., mixture: ..., mixture_mode: weighted, downsample_ratio: 1.0, random_tokens: ...}
    train:   {global_batch_size: 512, micro_batch_size: 16, max_steps: 20000, lr: 4.0e-4, ...}
    probe:   {source: auto, n: 100, T: 64, eps: 0.3}
    logging: {tensorboard: auto, wandb: auto}

``base`` chains are merged key by key (a child's value wins); mappings that are a unit -- ``data.train``,
``data.valid`` (mixtures) and the ``data.random_tokens`` / ``data.fixed_token`` transforms -- are replaced
whole. Command-line overrides use dotted keys: ``train.max_steps=100`` or ``--train.max_steps 100``; values
are parsed as YAML. Unknown sections or keys are an error naming the key and the allowed ones.
Relative paths in ``base`` and ``data.mixture`` are relative to the YAML file that names them; all other
paths are relative to the working directory (the repository root in the scripts).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from lit_gpt.config import Config, ConfigError
from lit_gpt.utils import did_you_mean, invalid_choice

SECTIONS = ("model", "data", "train", "probe", "logging")
REPLACED_WHOLE = {("data", "train"), ("data", "valid"), ("data", "random_tokens"), ("data", "fixed_token")}


class RunConfigError(ValueError):
    """A run configuration key or value is invalid."""


@dataclass
class DataConfig:
    train_dir: str = "datasets/lit_dataset_regmix"   # folder of packed shards (preprocess/prepare.py)
    valid_dir: Optional[str] = None                  # default: train_dir
    tokenizer: Optional[str] = None                  # tokenizer folder; checked against the shards' fingerprint
    mixture: Optional[str] = None                    # YAML file with train:/valid: maps (merged under inline ones)
    train: Dict[str, float] = field(default_factory=dict)   # domain prefix -> weight
    valid: Dict[str, float] = field(default_factory=dict)   # domain prefix -> weight of its loss in val_loss_mean
    headline: str = "auto"                           # the validation domain reported as val_loss (the paper's
                                                     # Pile-CC); auto: see resolve_headline; "mean": val_loss_mean
    mixture_mode: str = "weighted"                   # weighted: draw each sample's domain with data.train weights;
                                                     # pooled: the seed's loader, all chunks in one shuffled pool
                                                     # (weights only select domains; sizes set the proportions)
    downsample_ratio: float = 1.0                    # keep this fraction of every training domain's chunks
    seed: int = 3406                                 # data order (the seed's data_seed)
    random_tokens: Optional[Dict[str, int]] = None   # {start, end[, vocab_size]}: random ids at [start, end)
    fixed_token: Optional[Dict[str, int]] = None     # {position[, token_id=1]}: a fixed id at one position
    val_samples: int = 256                           # chunks per validation domain


@dataclass
class TrainConfig:
    name: Optional[str] = None                       # run name (default: the config file's stem)
    out_dir: Optional[str] = None                    # default: checkpoints/<name>
    accelerator: str = "auto"                        # auto | cpu | cuda
    devices: Union[int, str] = "auto"                # GPUs per node (auto: all visible; 1 on CPU)
    num_nodes: int = 1
    strategy: str = "auto"                           # auto | ddp | fsdp
    precision: str = "auto"                          # auto: bf16-mixed on GPU, 32-true on CPU
    global_batch_size: int = 512                     # sequences per optimizer step, over all devices
    micro_batch_size: int = 16                       # sequences per device per forward
    max_steps: int = 20000                           # optimizer steps; also the length of the lr schedule
    warmup_steps: int = 100
    lr: float = 4.0e-4
    min_lr: float = 4.0e-4                           # = lr: constant after warmup (the seed); smaller: decay
    lr_schedule: str = "cosine"                      # cosine | linear | constant (decay from lr to min_lr)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1.0e-8
    grad_clip: float = 1.0                           # max gradient norm; 0 disables clipping
    loss_skip_first: Union[int, str] = "auto"        # positions without loss; auto: prefix_size-1 for prefix LM
    log_interval: int = 10
    eval_interval: int = 1000                        # validation loss every N steps (0: only at the end)
    sink_interval: int = 1000                        # Sink_1..k on the probe every N steps (0: only at the end)
    save_interval: int = 1000                        # checkpoint every N steps (0: only at the end)
    keep_last: Optional[int] = None                  # keep only the newest N step checkpoints
    compile: bool = False                            # torch.compile (FSDP: the whole model; else compile_scope)
    compile_scope: str = "auto"                      # auto | blocks | model: lit_gpt.throughput.compile_model
    loss_impl: str = "auto"                          # fused | plain | auto (fused on CUDA): lit_gpt/fused_ce.py
    sdpa_backend: str = "auto"                       # auto | cudnn | flash | efficient | default (torch's order)
    profile: bool = False                            # pretrain.py --profile: phase times + bare-step ratio
    seed: int = 3406                                 # model initialisation
    resume: Union[bool, str] = "auto"                # auto: continue from the newest checkpoint in out_dir
    stop_at_step: Optional[int] = None               # leave (with a checkpoint) after this step; resume later
    max_time_s: Optional[float] = None               # leave (with a checkpoint) after this many seconds
    fsdp_activation_checkpointing: bool = False
    cpu_threads: Optional[int] = None                # torch threads on CPU (None: torch's default)
    save_final: bool = True                          # write the final/ checkpoint at max_steps


@dataclass
class ProbeConfig:
    source: str = "auto"      # auto | shards | <probe JSONL file>; auto: datasets/probe_valid_natural.jsonl
                              # (built from ../shared when present), else held-out chunks of the valid shards
    n: int = 100              # probe sequences
    T: int = 64               # tokens per sequence (one more is read for the probe loss)
    eps: float = 0.3
    k_max: int = 10
    batch_size: int = 20


@dataclass
class LoggingConfig:
    tensorboard: Union[bool, str] = "auto"   # auto: when tensorboard is installed
    wandb: Union[bool, str] = "auto"         # auto: when wandb is installed (offline without WANDB_API_KEY)
    wandb_project: str = "attention-sink-lab"
    progress: bool = True                    # print a line every log_interval steps


@dataclass
class RunConfig:
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "tinyllama_60M"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Optional[str] = None             # the YAML this came from

    # ------------------------------------------------------------------ derived
    def model_config(self) -> Config:
        d = dict(self.model)
        name = d.pop("name", None)
        try:
            if name is None:
                return Config.from_dict(d, where="model")
            return Config.from_name(name, **d)
        except TypeError as e:
            raise RunConfigError(f"model: {e}") from e

    @property
    def run_name(self) -> str:
        if self.train.name:
            return self.train.name
        return Path(self.source).stem if self.source else "run"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir) if self.train.out_dir else Path("checkpoints") / self.run_name

    def to_dict(self) -> Dict[str, Any]:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "probe": dataclasses.asdict(self.probe),
                "logging": dataclasses.asdict(self.logging), "source": self.source}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------- loading
def _bad(where: str, value: Any, allowed: Union[str, Sequence]) -> RunConfigError:
    return RunConfigError(invalid_choice(where, value, allowed))


def _unknown(key: str, allowed: Sequence[str], where: str) -> RunConfigError:
    return RunConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; allowed: "
                          f"{', '.join(sorted(allowed))}")


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(x: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read it as the number everyone means."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    if isinstance(x, str) and _SCI.match(x):
        return float(x)
    return x


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RunConfigError(f"config file not found: {path}")
    try:
        d = _numbers(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(d, dict):
        raise RunConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return d


def _merge(base: Dict[str, Any], child: Dict[str, Any], path: tuple = ()) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and (path + (k,)) not in REPLACED_WHOLE:
            out[k] = _merge(out[k], v, path + (k,))
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_tree(path: Union[str, Path], _seen: Optional[List[Path]] = None) -> Dict[str, Any]:
    """A YAML file with its ``base`` chain merged in and its relative ``data.mixture`` made absolute."""
    path = Path(path).resolve()
    seen = list(_seen or [])
    if path in seen:
        raise RunConfigError(f"config base cycle: {' -> '.join(str(p) for p in seen + [path])}")
    d = _read_yaml(path)
    for key in d:
        if key not in SECTIONS + ("base",):
            raise _unknown(key, SECTIONS + ("base",), str(path))
    mixture = (d.get("data") or {}).get("mixture")
    if isinstance(mixture, str) and not Path(mixture).is_absolute():
        d["data"]["mixture"] = str((path.parent / mixture).resolve())
    base = d.pop("base", None)
    if base is None:
        return d
    return _merge(load_yaml_tree(path.parent / base, seen + [path]), d)


def parse_overrides(args: Sequence[str]) -> Dict[str, Any]:
    """``["train.lr=1e-3", "--data.seed", "7"]`` -> nested dict; values parsed as YAML."""
    out: Dict[str, Any] = {}
    items: List[tuple] = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" not in a:
                if i + 1 >= len(args):
                    raise RunConfigError(f"override --{a} has no value")
                items.append((a, args[i + 1]))
                i += 2
                continue
        if "=" not in a:
            raise _bad("override", a, "section.key=value or --section.key value")
        k, v = a.split("=", 1)
        items.append((k, v))
        i += 1
    for k, v in items:
        parts = k.split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise _bad("override", k, f"<section>.<key> with section in {', '.join(SECTIONS)}")
        try:
            value = _numbers(yaml.safe_load(v))
        except yaml.YAMLError:
            value = v
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _build(cls, d: Optional[Dict[str, Any]], where: str):
    d = dict(d or {})
    names = [f.name for f in fields(cls)]
    for k in d:
        if k not in names:
            raise _unknown(k, names, where)
    return cls(**d)


def from_dict(d: Dict[str, Any], source: Optional[str] = None) -> RunConfig:
    for key in d:
        if key not in SECTIONS + ("source",):
            raise _unknown(key, SECTIONS, "config")
    model = dict(d.get("model") or {})
    cfg = RunConfig(model=model or {"name": "tinyllama_60M"},
                    data=_build(DataConfig, d.get("data"), "data"),
                    train=_build(TrainConfig, d.get("train"), "train"),
                    probe=_build(ProbeConfig, d.get("probe"), "probe"),
                    logging=_build(LoggingConfig, d.get("logging"), "logging"),
                    source=source or d.get("source"))
    _resolve_mixture(cfg)
    cfg.data.headline = resolve_headline(cfg.data)
    validate(cfg)
    return cfg


def load_run_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run YAML (with its ``base`` chain) and apply dotted overrides; everything validated."""
    tree = load_yaml_tree(path) if path is not None else {}
    over = parse_overrides(overrides)
    if isinstance((over.get("data") or {}).get("mixture"), str):
        over["data"]["mixture"] = str(Path(over["data"]["mixture"]).resolve())
    tree = _merge(tree, over)
    return from_dict(tree, source=str(path) if path is not None else None)


def _resolve_mixture(cfg: RunConfig) -> None:
    """Fill data.train / data.valid (and data.headline) from data.mixture (inline maps win). A config that already
    holds both maps (e.g. the run config saved in a checkpoint) does not need the mixture file any more."""
    d = cfg.data
    if not d.mixture or (d.train and d.valid):
        return
    m = _read_yaml(Path(d.mixture))
    for k in m:
        if k not in MIXTURE_KEYS:
            raise _unknown(k, MIXTURE_KEYS, f"mixture file {d.mixture}")
    if not d.train:
        d.train = dict(m.get("train") or {})
    if not d.valid:
        d.valid = dict(m.get("valid") or {})
        if d.headline == "auto" and m.get("headline"):
            d.headline = m["headline"]


MIXTURE_KEYS = ("train", "valid", "headline")


def resolve_headline(d: DataConfig) -> str:
    """The validation domain whose loss is the headline ``val_loss``: the paper reports the Pile-CC validation loss
    (3.73 for its default run). ``auto`` picks, in order: the domain the mixture file names (``headline:``), the
    validation domain whose prefix ends in ``pile_cc``, the only validation domain, else ``mean`` (the weighted mean
    over the validation domains, always logged as ``val_loss_mean``)."""
    if d.headline != "auto":
        return d.headline
    used = [k for k, w in d.valid.items() if w > 0]
    pile_cc = [k for k in used if k.endswith("pile_cc")]
    if len(pile_cc) == 1:
        return pile_cc[0]
    return used[0] if len(used) == 1 else "mean"


# ---------------------------------------------------------------------------- validation
def _positive_int(where: str, v: Any, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(where, v, f"an integer >= {lo}")


def _choice(where: str, v: Any, allowed: Sequence) -> None:
    if v not in allowed:
        raise _bad(where, v, allowed)


def validate(cfg: RunConfig) -> None:
    try:
        mc = cfg.model_config()
    except ConfigError as e:
        raise RunConfigError(str(e)) from e
    d, t, p, lg = cfg.data, cfg.train, cfg.probe, cfg.logging
    for name, mix in (("data.train", d.train), ("data.valid", d.valid)):
        if not isinstance(mix, dict):
            raise _bad(name, mix, "a mapping of domain prefix -> weight")
        for k, w in mix.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise _bad(f"{name}.{k}", w, "a number >= 0")
    if not d.train:
        raise RunConfigError("data.train is empty: give a mixture (domain prefix -> weight) inline or via "
                             "data.mixture")
    if sum(d.train.values()) <= 0:
        raise RunConfigError(f"data.train weights sum to 0: {d.train}")
    _choice("data.mixture_mode", d.mixture_mode, ("weighted", "pooled"))
    _choice("data.headline", d.headline, ["mean"] + [k for k, w in d.valid.items() if w > 0])
    if not (isinstance(d.downsample_ratio, (int, float)) and 0 < d.downsample_ratio <= 1):
        raise _bad("data.downsample_ratio", d.downsample_ratio, "0 < value <= 1")
    _positive_int("data.seed", d.seed, allow_zero=True)
    _positive_int("data.val_samples", d.val_samples)
    if d.random_tokens is not None:
        rt = d.random_tokens
        if not isinstance(rt, dict) or set(rt) - {"start", "end", "vocab_size"} or not {"start", "end"} <= set(rt):
            raise _bad("data.random_tokens", rt, "{start, end[, vocab_size]}")
        _positive_int("data.random_tokens.start", rt["start"], allow_zero=True)
        _positive_int("data.random_tokens.end", rt["end"])
        if rt["end"] <= rt["start"] or rt["end"] > mc.block_size + 1:
            raise _bad("data.random_tokens end", rt["end"], f"start < end <= block_size + 1 = {mc.block_size + 1}")
        if rt.get("vocab_size") is not None:
            _positive_int("data.random_tokens.vocab_size", rt["vocab_size"])
    if d.fixed_token is not None:
        ft = d.fixed_token
        if not isinstance(ft, dict) or set(ft) - {"position", "token_id"} or "position" not in ft:
            raise _bad("data.fixed_token", ft, "{position[, token_id]}")
        _positive_int("data.fixed_token.position", ft["position"], allow_zero=True)
        if ft["position"] > mc.block_size:
            raise _bad("data.fixed_token.position", ft["position"], f"<= block_size = {mc.block_size}")
        _positive_int("data.fixed_token.token_id", ft.get("token_id", 1), allow_zero=True)
    _choice("train.accelerator", t.accelerator, ("auto", "cpu", "cuda", "gpu", "mps"))
    if t.devices != "auto":
        _positive_int("train.devices", t.devices)
    _positive_int("train.num_nodes", t.num_nodes)
    _choice("train.strategy", t.strategy, ("auto", "ddp", "fsdp"))
    _choice("train.precision", t.precision, ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed"))
    for k in ("global_batch_size", "micro_batch_size", "max_steps", "log_interval"):
        _positive_int(f"train.{k}", getattr(t, k))
    for k in ("warmup_steps", "eval_interval", "sink_interval", "save_interval"):
        _positive_int(f"train.{k}", getattr(t, k), allow_zero=True)
    if t.global_batch_size % t.micro_batch_size:
        raise _bad("train.global_batch_size", t.global_batch_size,
                   f"a multiple of train.micro_batch_size={t.micro_batch_size}")
    for k in ("lr", "min_lr", "weight_decay", "grad_clip", "adam_eps"):
        v = getattr(t, k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise _bad(f"train.{k}", v, "a number >= 0")
    if t.min_lr > t.lr:
        raise _bad("train.min_lr", t.min_lr, f"<= train.lr={t.lr}")
    for k in ("beta1", "beta2"):
        v = getattr(t, k)
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise _bad(f"train.{k}", v, "0 <= value < 1")
    _choice("train.lr_schedule", t.lr_schedule, ("cosine", "linear", "constant"))
    if t.loss_skip_first != "auto":
        _positive_int("train.loss_skip_first", t.loss_skip_first, allow_zero=True)
        if t.loss_skip_first >= mc.block_size:
            raise _bad("train.loss_skip_first", t.loss_skip_first, "< block_size")
    if t.keep_last is not None:
        _positive_int("train.keep_last", t.keep_last)
    if t.cpu_threads is not None:
        _positive_int("train.cpu_threads", t.cpu_threads)
    if t.stop_at_step is not None:
        _positive_int("train.stop_at_step", t.stop_at_step)
    if t.max_time_s is not None and not (isinstance(t.max_time_s, (int, float)) and t.max_time_s > 0):
        raise _bad("train.max_time_s", t.max_time_s, "a number > 0")
    if not (isinstance(t.resume, bool) or isinstance(t.resume, str)):
        raise _bad("train.resume", t.resume, "auto, true, false or a path")
    from lit_gpt.attention import SDPA_BACKENDS
    from lit_gpt.fused_ce import IMPLS
    _choice("train.loss_impl", t.loss_impl, IMPLS)
    _choice("train.sdpa_backend", t.sdpa_backend, SDPA_BACKENDS)
    from lit_gpt.throughput import COMPILE_SCOPES
    _choice("train.compile_scope", t.compile_scope, COMPILE_SCOPES)
    for k in ("compile", "fsdp_activation_checkpointing", "save_final", "profile"):
        if not isinstance(getattr(t, k), bool):
            raise _bad(f"train.{k}", getattr(t, k), "true or false")
    _positive_int("probe.n", p.n)
    _positive_int("probe.T", p.T)
    _positive_int("probe.k_max", p.k_max)
    _positive_int("probe.batch_size", p.batch_size)
    if p.T > mc.block_size:
        raise _bad("probe.T", p.T, f"<= block_size = {mc.block_size}")
    if p.k_max > p.T:
        raise _bad("probe.k_max", p.k_max, f"<= probe.T = {p.T}")
    if not (isinstance(p.eps, (int, float)) and 0 <= p.eps < 1):
        raise _bad("probe.eps", p.eps, "0 <= eps < 1")
    for k in ("tensorboard", "wandb"):
        _choice(f"logging.{k}", getattr(lg, k), ("auto", True, False))


def loss_skip(cfg: RunConfig, mc: Config) -> int:
    """Positions at the start of a sequence without loss: the prefix of a prefix LM (the seed's ignore_loss =
    prefix - 1: tokens inside the prefix are not predicted, the first token after it is)."""
    if cfg.train.loss_skip_first != "auto":
        return int(cfg.train.loss_skip_first)
    return mc.prefix_size - 1 if mc.attn_mask == "prefix" else 0
