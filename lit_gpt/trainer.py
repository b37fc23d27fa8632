"""Pretraining on Lightning Fabric: preflight checks, the training loop, validation, sink curves, checkpoints.

``fit(cfg)`` is what ``pretrain.py`` runs; it is made of pieces that each work (and are tested) on their own, as
litgpt's pretrain is:

1. :func:`preflight` — every check that can fail on bad input, before any model is built: the output folder is
   writable and holds no other run's checkpoints (``train.resume``), the shards exist, are non-empty, share one
   tokenizer that matches ``data.tokenizer``, fit the model's vocabulary and block size, the probe set can be
   built. Returns a :class:`Plan`.
2. :func:`setup` — Fabric (CPU, one GPU, DDP / FSDP over devices and nodes; bf16-mixed on GPU), model, data
   loader, AdamW(β1, β2); the batch sizes must divide over the world. Returns a :class:`Run`.
3. :func:`resume` — the newest readable checkpoint restores the model, optimizer, data position, RNG and the
   counters (:class:`TrainState`), so an interrupted run continues the same loss curve; ``metrics.csv`` rows
   after the checkpoint's step are dropped (:class:`RunLog`).
4. :func:`fit` — the loop: the lr schedule (:func:`lr_at`: linear warmup, then cosine / linear / constant from
   ``lr`` to ``min_lr``), :func:`optimizer_step` (gradient accumulation to ``global_batch_size``, clipping),
   :func:`stop_reason` (``stop_at_step`` / ``max_time_s``). Every ``eval_interval`` / ``sink_interval`` steps
   :func:`validate`: the validation loss (per domain and weighted) and Sink_1..k with the probe loss on the
   fixed probe set (step 0 included), logged to ``metrics.csv`` (always), TensorBoard and wandb (when installed).
5. :func:`save` — every ``save_interval`` steps and at the end an atomic, self-describing checkpoint folder
   (``step-XXXXXXX/``, ``final/``: lit_gpt.checkpoint; model config, run config, weights, optimizer, schedule, step,
   data position, RNG).
6. :func:`summarize` — ``summary.json`` (tokens/s, losses, the Sink_1 curve) and ``curves.png``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lit_gpt.checkpoint import (FINAL, CheckpointError, check_state_keys, delete_checkpoint, find_checkpoint,
                                 legacy_checkpoints, list_checkpoints, load_checkpoint, model_state_dict, rng_state,
                                 set_rng_state, step_checkpoints, step_name, write_checkpoint)
from lit_gpt.config import Config
from lit_gpt.data import DataError, MixtureLoader, RunData, ValidationSet, open_run_data
from lit_gpt.evaluate import sink_on_probe, sink_summary
from lit_gpt.packed import ShardError
from lit_gpt.probe import make_probe
from lit_gpt.run_config import RunConfig, loss_skip
from lit_gpt.sink_metrics import format_sink
from lit_gpt.attention import set_sdpa_backend
from lit_gpt.throughput import PhaseTimer, PinnedBatches, compile_model, eager, time_steps
from lit_gpt.results import environment
from lit_gpt.utils import atomic_write_text, check_writable_dir, invalid_choice


class PreflightError(ValueError):
    """Bad input found before training started; nothing was written."""


# ---------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-indexed): linear warmup to ``lr`` over ``warmup_steps``,
    then ``lr_schedule`` from ``lr`` to ``min_lr`` at ``max_steps``. ``min_lr == lr`` gives a constant."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant" or t.max_steps <= t.warmup_steps:
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / (t.max_steps - t.warmup_steps))
    if t.lr_schedule == "linear":
        return t.lr - progress * (t.lr - t.min_lr)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


# ---------------------------------------------------------------------------- checkpoints
MUST_MATCH_TRAIN = ("global_batch_size", "seed")
MUST_MATCH_DATA = ("train", "mixture_mode", "downsample_ratio", "seed", "random_tokens", "fixed_token")
MAY_DIFFER_MODEL = ("attn_impl", "extra")


def check_resume_compatible(payload: dict, cfg: RunConfig, mc: Config) -> None:
    old_model = {k: v for k, v in payload["model_config"].items() if k not in MAY_DIFFER_MODEL}
    new_model = {k: v for k, v in mc.to_dict().items() if k not in MAY_DIFFER_MODEL}
    diffs = [f"model.{k}: {old_model.get(k)!r} -> {new_model.get(k)!r}" for k in sorted(set(old_model) | set(new_model))
             if old_model.get(k) != new_model.get(k)]
    old = payload.get("run_config") or {}
    for sec, keys in (("data", MUST_MATCH_DATA), ("train", MUST_MATCH_TRAIN)):
        a, b = old.get(sec, {}), getattr(cfg, sec)
        for k in keys:
            if k in a and a[k] != getattr(b, k):
                diffs.append(f"{sec}.{k}: {a[k]!r} -> {getattr(b, k)!r}")
    if diffs:
        raise PreflightError(f"{payload['_path']} was written by a different run ({'; '.join(diffs[:6])}); "
                             "resume with the same settings or choose another train.out_dir")


# ---------------------------------------------------------------------------- preflight
@dataclass
class Plan:
    cfg: RunConfig
    mc: Config
    out_dir: Path
    data: RunData
    probe: torch.Tensor
    probe_where: str
    resume_from: List[Path] = field(default_factory=list)   # candidates, newest first
    skip: int = 0


def preflight(cfg: RunConfig) -> Plan:
    """All input checks; raises PreflightError (or DataError / ShardError / RunConfigError) before any work."""
    mc = cfg.model_config()
    accelerator, devices, _ = resolve_hardware(cfg)
    if cfg.train.strategy == "fsdp" and accelerator == "cpu":
        raise PreflightError("train.strategy=fsdp is invalid on CPU (Lightning's FSDP needs GPUs); allowed on CPU: "
                             "auto, ddp")
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise PreflightError(f"train.accelerator={cfg.train.accelerator!r} but no GPU is visible; allowed here: cpu")
    if devices < 1:
        raise PreflightError("train.devices=auto found no GPU; set train.accelerator=cpu or train.devices")
    try:
        rd = open_run_data(cfg, mc)
    except (DataError, ShardError) as e:
        raise PreflightError(str(e)) from e
    if not rd.valid:
        print("note: data.valid is empty: no validation loss will be logged")
    try:
        probe, where = make_probe(cfg, rd)
    except DataError as e:
        raise PreflightError(str(e)) from e
    if probe.max() >= mc.vocab_size:
        raise PreflightError(f"probe token id {int(probe.max())} >= model vocab_size={mc.vocab_size}")
    out_dir = cfg.out_dir
    try:
        check_writable_dir(out_dir)
    except OSError as e:
        raise PreflightError(f"train.out_dir={str(out_dir)!r} is not writable ({e.strerror or e})") from e
    legacy = legacy_checkpoints(out_dir, unconverted=True)
    if legacy:
        raise PreflightError(f"train.out_dir={str(out_dir)!r} holds checkpoints of the old pickle format "
                             f"({', '.join(p.name for p in legacy[:3])}); nothing was overwritten. Convert them "
                             f"(python -m lit_gpt.checkpoint convert {out_dir}) or choose another train.out_dir")
    existing = list_checkpoints(out_dir)
    resume = cfg.train.resume
    if isinstance(resume, str) and resume.lower() in ("true", "false", "auto"):
        resume = {"true": True, "false": False, "auto": "auto"}[resume.lower()]
    if resume is False and existing:
        raise PreflightError(f"train.out_dir={str(out_dir)!r} already holds checkpoints ({existing[0].name}, ...) "
                             "and train.resume=false; nothing was overwritten. Use train.resume=auto to continue "
                             "that run or choose another train.out_dir")
    if resume is True and not existing:
        raise PreflightError(f"train.resume=true but {out_dir} holds no checkpoint")
    candidates: List[Path] = []
    if isinstance(resume, str) and resume != "auto":
        try:
            candidates = [find_checkpoint(resume)]
        except (FileNotFoundError, CheckpointError) as e:
            raise PreflightError(f"train.resume={resume!r}: {e}") from e
    elif resume in (True, "auto"):
        candidates = existing
    return Plan(cfg, mc, out_dir, rd, probe, where, candidates, loss_skip(cfg, mc))


# ---------------------------------------------------------------------------- logging
class MetricsCSV:
    """``metrics.csv``: one row per step that logged anything; on resume rows after the checkpoint are dropped."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: Optional[int]) -> None:
        self.path = path
        self.columns = list(columns)
        rows: List[dict] = []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                old_cols = reader.fieldnames or []
                rows = [r for r in reader]
            if resume_step is None:
                path.rename(path.with_name(f"metrics-before-{time.strftime('%Y%m%d-%H%M%S')}.csv"))
                rows = []
            else:
                rows = [r for r in rows if r.get("step") and int(float(r["step"])) <= resume_step]
                self.columns += [c for c in old_cols if c not in self.columns]
        text = ",".join(self.columns) + "\n"
        if rows:
            import io

            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
            w.writerows(rows)
            text += buf.getvalue()
        atomic_write_text(path, text)
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore")

    def write(self, row: Dict[str, Any]) -> None:
        self._w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def make_loggers(cfg: RunConfig, out_dir: Path) -> list:
    import importlib.util

    loggers = []
    tb = cfg.logging.tensorboard
    has_tb = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
    if tb is True and not has_tb:
        raise PreflightError("logging.tensorboard=true but neither tensorboard nor tensorboardX is installed")
    if tb is True or (tb == "auto" and has_tb):
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=str(out_dir), name="tensorboard", version=0))
    wb = cfg.logging.wandb
    has_wb = importlib.util.find_spec("wandb") is not None
    if wb is True and not has_wb:
        raise PreflightError("logging.wandb=true but wandb is not installed (pip install wandb)")
    if wb is True or (wb == "auto" and has_wb):
        if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
            os.environ.setdefault("WANDB_MODE", "offline")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logging.wandb_project, name=cfg.run_name, save_dir=str(out_dir)))
    return loggers


# ---------------------------------------------------------------------------- fabric
def resolve_hardware(cfg: RunConfig) -> Tuple[str, int, str]:
    """(accelerator, devices per node, precision) with the ``auto`` values filled in."""
    t = cfg.train
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    devices = t.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator in ("cuda", "gpu") else 1
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator in ("cuda", "gpu") and torch.cuda.is_bf16_supported() else \
            ("16-mixed" if accelerator in ("cuda", "gpu") else "32-true")
    return accelerator, devices, precision


def make_fabric(cfg: RunConfig, loggers: list):
    import lightning as L

    t = cfg.train
    accelerator, devices, precision = resolve_hardware(cfg)
    strategy: Any = t.strategy
    world = devices * t.num_nodes
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "auto"
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        from lit_gpt.model import Block

        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD",
                                activation_checkpointing_policy={Block} if t.fsdp_activation_checkpointing else None)
    return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=t.num_nodes, strategy=strategy,
                    precision=precision, loggers=loggers)


def _is_fsdp(fabric) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def _full_state(fabric, model, optimizer, raw) -> Tuple[dict, dict]:
    if _is_fsdp(fabric):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model._forward_module, optimizer.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return msd, osd
    return model_state_dict(raw), optimizer.state_dict()


def _load_full_state(fabric, model, optimizer, raw, msd: dict, osd: dict) -> None:
    if _is_fsdp(fabric):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model._forward_module, optimizer.optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
        return
    missing, unexpected = raw.load_state_dict(msd, strict=False)
    problem = check_state_keys(raw.config, missing, unexpected, "checkpoint")
    if problem:
        raise PreflightError(problem)
    optimizer.load_state_dict(osd)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validation_loss(fabric, model, vs: ValidationSet, weights: Dict[str, float], micro_batch_size: int,
                    skip: int, headline: str = "mean") -> Dict[str, float]:
    """Mean next-token loss per validation domain (all ranks share the work), their weighted mean
    (``val_loss_mean``) and the headline ``val_loss``: the ``headline`` domain's loss (the paper's Pile-CC), or
    the weighted mean when ``headline == "mean"``."""
    model.eval()
    out: Dict[str, float] = {}
    world, rank = fabric.world_size, fabric.global_rank
    for name in vs.domains:
        total = torch.zeros(2, device=fabric.device, dtype=torch.float64)
        idx = vs.indices[name]
        usable = (len(idx) // world) * world or len(idx)      # equal shares so that FSDP ranks stay in step
        saved = vs.indices[name]
        vs.indices[name] = idx[:usable]
        for batch in vs.batches(name, micro_batch_size, rank, world):
            batch = batch.to(fabric.device)
            logits = model(batch[:, :-1])
            lg, tg = logits[:, skip:], batch[:, 1 + skip:]
            total[0] += F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tg.reshape(-1), reduction="sum")
            total[1] += tg.numel()
        vs.indices[name] = saved
        total = fabric.all_reduce(total, reduce_op="sum")
        out[f"val_loss/{name}"] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    w = {k: weights.get(k, 0.0) for k in vs.domains}
    wsum = sum(w.values()) or 1.0
    out["val_loss_mean"] = sum(out[f"val_loss/{k}"] * w[k] for k in vs.domains) / wsum
    out["val_loss"] = out["val_loss_mean"] if headline == "mean" else out[f"val_loss/{headline}"]
    model.train()
    return out


# ---------------------------------------------------------------------------- set-up
@dataclass
class TrainState:
    """The loop's counters; a checkpoint restores them with the weights, optimizer, data position and RNG."""
    step: int = 0                 # optimizer steps done
    tokens_seen: int = 0
    train_seconds: float = 0.0    # training time only (evaluation and saving excluded)


@dataclass
class Run:
    """What the loop works on, built by :func:`setup` (litgpt's ``state`` dict, typed)."""
    cfg: RunConfig
    plan: Plan
    fabric: Any
    raw: Any                      # the GPT itself (weights, parameter count, probes)
    model: Any                    # the model as Fabric set it up (compiled / DDP / FSDP)
    optimizer: Any
    loader: MixtureLoader
    accum: int                    # micro-batches per optimizer step
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Optional[Path] = None
    prof: Optional[PhaseTimer] = None         # train.profile: phase times of the loop (a no-op when disabled)
    ignore_first: Optional[torch.Tensor] = None   # (block_size,) bool: loss positions skipped (data transforms)

    @property
    def probe_model(self):
        """The module the probe runs through: FSDP needs the sharded wrapper, everything else the plain GPT."""
        return self.model if _is_fsdp(self.fabric) else self.raw

    @property
    def headline(self) -> Optional[str]:
        """The domain behind ``val_loss`` (None when the run has no validation data)."""
        return self.cfg.data.headline if self.plan.data.valid else None


def setup(cfg: RunConfig, plan: Plan) -> Run:
    """Launch Fabric and build the model, the data loader and AdamW, seeded by ``train.seed``; nothing is
    restored yet (:func:`resume`). Raises PreflightError when the batch sizes do not divide over the world."""
    from lit_gpt.model import GPT

    t, mc = cfg.train, plan.mc
    fabric = make_fabric(cfg, make_loggers(cfg, plan.out_dir))
    fabric.launch()
    if fabric.device.type == "cpu" and t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    world = fabric.world_size
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise PreflightError(invalid_choice("train.global_batch_size", t.global_batch_size, "a multiple of "
                                            f"micro_batch_size x devices x nodes = {t.micro_batch_size} x {world} = "
                                            f"{per_step}"))
    accum = t.global_batch_size // per_step
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_sdpa_backend(t.sdpa_backend, fabric.device if fabric.device.type == "cuda" else None)

    fabric.seed_everything(t.seed, verbose=False)
    with fabric.init_module(empty_init=False):
        raw = GPT(mc)
    loader = MixtureLoader(plan.data.train, {k: w for k, w in cfg.data.train.items() if w > 0},
                           t.micro_batch_size, cfg.data.seed, fabric.global_rank, world, plan.data.transforms,
                           mode=cfg.data.mixture_mode)
    fabric.print(f"model {mc.name}: {raw.num_parameters() / 1e6:.2f}M parameters; world {world} x micro "
                 f"{t.micro_batch_size} x accum {accum} = global batch {t.global_batch_size} x {mc.block_size} "
                 f"tokens; precision {resolve_hardware(cfg)[2]}; data ({cfg.data.mixture_mode}, share of samples): "
                 f"{', '.join(f'{k} {p:.1%}' for k, p in zip(loader.names, loader.p))}; probe: {plan.probe_where}")
    if t.compile:       # train.compile_scope: blocks (one compiled block serves all layers) or the model; FSDP: model
        model = torch.compile(raw) if t.strategy == "fsdp" else compile_model(raw, t.compile_scope)
    else:
        model = raw
    model = fabric.setup(model)
    fused = fabric.device.type == "cuda" and not _is_fsdp(fabric)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay, **({"fused": True} if fused else {}))
    optimizer = fabric.setup_optimizers(optimizer)
    ignore_first = torch.arange(mc.block_size, device=fabric.device) < plan.skip if plan.skip else None
    return Run(cfg, plan, fabric, raw, model, optimizer, loader, accum,
               prof=PhaseTimer(fabric.device, enabled=False, skip=1), ignore_first=ignore_first)


# ---------------------------------------------------------------------------- resume / save
def resume(run: Run) -> Optional[Path]:
    """Restore the newest readable checkpoint of ``plan.resume_from`` into ``run``: weights, optimizer, data
    position, RNG and counters. A torn or unreadable one is skipped with a warning (the previous one is used);
    one of another run is refused. Returns the checkpoint used, None when there was nothing to resume."""
    fabric, plan = run.fabric, run.plan
    for cand in plan.resume_from:
        try:
            payload = load_checkpoint(cand)
        except Exception as e:          # a torn or unreadable file: fall back to the previous checkpoint
            fabric.print(f"warning: cannot read checkpoint {cand} ({type(e).__name__}: {e}); trying an older one")
            continue
        check_resume_compatible(payload, run.cfg, plan.mc)
        _load_full_state(fabric, run.model, run.optimizer, run.raw, payload["model"], payload["optimizer"])
        run.loader.load_state_dict(payload["data_state"])
        set_rng_state(payload["rng"])
        run.state = TrainState(step=int(payload["step"]), tokens_seen=int(payload.get("tokens_seen", 0)),
                               train_seconds=float(payload.get("train_seconds", 0.0)))
        run.resumed_from = cand
        fabric.print(f"resumed from {cand} at step {run.state.step}")
        return cand
    if plan.resume_from:
        raise PreflightError(f"no readable checkpoint among {[p.name for p in plan.resume_from]}")
    return None


def save(run: Run, name: str) -> Path:
    """Write ``<out_dir>/<name>`` (every rank takes part in gathering the full state; rank 0 writes it, then keeps
    only the newest ``train.keep_last`` step checkpoints)."""
    fabric, t, s, out_dir = run.fabric, run.cfg.train, run.state, run.plan.out_dir
    if t.profile:                      # a profile run is a measurement: it writes no checkpoint
        return out_dir / name
    msd, osd = _full_state(fabric, run.model, run.optimizer, run.raw)
    if fabric.global_rank == 0:
        # the (possibly gathered) full state dict, in the one checkpoint layout
        write_checkpoint(out_dir / name, msd, run.plan.mc, optimizer=osd, step=s.step, tokens_seen=s.tokens_seen,
                         train_seconds=s.train_seconds, data_state=run.loader.state_dict(), rng=rng_state(),
                         run_config=run.cfg.to_dict(),
                         scheduler={"kind": t.lr_schedule, "next_lr": lr_at(s.step, run.cfg)})
        if t.keep_last:
            for p in step_checkpoints(out_dir)[t.keep_last:]:
                delete_checkpoint(p)
    fabric.barrier()
    return out_dir / name


# ---------------------------------------------------------------------------- validate / log
def validate(run: Run, do_val: bool = True, do_sink: bool = True) -> Dict[str, Any]:
    """The validation losses (``val_loss/<domain>``, ``val_loss``, ``val_loss_mean``) and Sink_1..k with the probe
    loss on the probe set; the full SinkResult rides along as ``_result``. Runs eagerly under ``train.compile``
    (other shapes and the analysis path would each cost a compilation for a few calls)."""
    with eager():
        return _validate(run, do_val, do_sink)


def _validate(run: Run, do_val: bool, do_sink: bool) -> Dict[str, Any]:
    cfg, plan = run.cfg, run.plan
    m: Dict[str, Any] = {}
    if do_val and plan.data.valid_set is not None:
        m.update(validation_loss(run.fabric, run.model, plan.data.valid_set, cfg.data.valid,
                                 cfg.train.micro_batch_size, plan.skip, run.headline))
    if do_sink:
        result, ploss = sink_on_probe(run.probe_model, plan.probe, eps=cfg.probe.eps, k_max=cfg.probe.k_max,
                                      batch_size=cfg.probe.batch_size, transforms=plan.data.transforms)
        m.update(sink_summary(result, ploss))
        m["_result"] = result
    return m


def metric_columns(cfg: RunConfig, plan: Plan) -> List[str]:
    """The columns of ``metrics.csv``."""
    val_cols = ([f"val_loss/{k}" for k in plan.data.valid] + ["val_loss", "val_loss_mean"]) if plan.data.valid else []
    sink_cols = [f"sink_{k}" for k in range(1, cfg.probe.k_max + 1)] + \
        [f"sink_extra_{i}" for i in range(plan.mc.n_extra_slots)]
    return ["step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s", "train_seconds"] + val_cols + \
        ["probe_loss"] + sink_cols


class RunLog:
    """Where a run's metrics go: ``metrics.csv`` (rank 0; rows after a resumed checkpoint dropped), Fabric's
    loggers and the console. Keeps the last value of every metric, the Sink_1 curve and the logged speeds for the
    summary. Opening it writes ``run_config.yaml``."""

    def __init__(self, run: Run) -> None:
        self.fabric, self.headline = run.fabric, run.headline
        out_dir = run.plan.out_dir
        rank0 = run.fabric.global_rank == 0
        self.csv = MetricsCSV(out_dir / "metrics.csv", metric_columns(run.cfg, run.plan),
                              run.state.step if run.resumed_from else None) if rank0 else None
        if rank0:
            atomic_write_text(out_dir / "run_config.yaml", run.cfg.dump())
        self.last: Dict[str, Any] = {}
        self.sink_curve: List[Tuple[int, float]] = []
        self.speeds: List[float] = []
        self.marks: List[Tuple[int, float, int, float]] = []      # (step, wall clock, tokens, logged tokens/s)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.last.update(metrics)
        if self.csv is not None:
            self.csv.write(dict(metrics, step=step))
        self.fabric.log_dict({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def report(self, step: int, m: Dict[str, Any]) -> None:
        """Log ``m`` (as :func:`validate` and the loop build it) and print its sink and validation lines."""
        result = m.pop("_result", None)
        self.log(step, m)
        if result is not None:
            self.sink_curve.append((step, result.sink[1]))
            self.fabric.print(f"step {step}: {format_sink(result)}"
                              + (f" probe_loss {m['probe_loss']:.4f}" if "probe_loss" in m else ""))
        if "val_loss" in m:
            self.fabric.print(f"step {step}: val_loss {m['val_loss']:.4f} ({self.headline}), val_loss_mean "
                              f"{m['val_loss_mean']:.4f}")

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()


# ---------------------------------------------------------------------------- fit
def optimizer_step(run: Run, next_batch: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One optimizer step at the learning rate already set: ``accum`` micro-batches forward + backward (gradients
    synchronised on the last), clipping, AdamW, with no host synchronisation. Returns (sum of the micro-batch
    losses, gradient norm or None)."""
    fabric, model, optimizer, accum, t, prof = run.fabric, run.model, run.optimizer, run.accum, run.cfg.train, run.prof
    loss_sum = torch.zeros((), device=fabric.device)
    for micro in range(accum):
        batch = next_batch()
        prof.mark("data (load + copy)")
        x, y = batch[:, :-1], batch[:, 1:]
        if run.ignore_first is not None:
            y = y.masked_fill(run.ignore_first[: y.shape[1]], -100)
        with fabric.no_backward_sync(model, enabled=micro < accum - 1):
            loss = model(x, targets=y, loss_impl=t.loss_impl)
            fabric.backward(loss / accum)
        loss_sum += loss.detach()
        prof.mark("forward + backward")
    # error_if_nonfinite would synchronise every step; the norm is checked when it is logged
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=t.grad_clip, error_if_nonfinite=False) \
        if t.grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    prof.mark("clip + optimizer")
    return loss_sum, grad_norm


def profile_report(run: Run, log: "RunLog", profile_from: int, next_batch: Callable[[], torch.Tensor]) -> dict:
    """``train.profile``: the loop's throughput over the first half of the run (as logged, and by the wall clock
    with evaluation and probes included), the phase times of the second half (synchronised), and the bare
    optimizer step (the same function on a fixed batch already on the device) timed in the same process.
    Writes ``profile.json`` and prints a table."""
    import itertools

    fabric, cfg, prof = run.fabric, run.cfg, run.prof
    tokens_per_step = cfg.train.global_batch_size * run.plan.mc.block_size
    first = [m for m in log.marks if m[0] <= profile_from][1:]      # the first logged interval holds compilation
    logged = statistics.median([m[3] for m in first]) if first else None
    wall = (first[-1][2] - first[0][2]) / (first[-1][1] - first[0][1]) if len(first) > 1 else None
    prof.enabled = False
    fixed = itertools.cycle([next_batch() for _ in range(run.accum)])
    n = max(3, min(20, cfg.train.max_steps - profile_from))
    bare = tokens_per_step / time_steps(lambda: optimizer_step(run, fixed.__next__), n, fabric.device)
    phases = prof.summary()
    out = {"loop_tokens_per_s_logged": logged, "loop_tokens_per_s_wall": wall, "bare_step_tokens_per_s": bare,
           "loop_over_bare_logged": logged / bare if logged else None,
           "loop_over_bare_wall": wall / bare if wall else None,
           "bare_steps_timed": n, "logged_intervals": len(first), **phases}
    fabric.print(f"profile: bare optimizer step {bare:,.0f} tok/s; loop {logged or float('nan'):,.0f} tok/s as logged "
                 f"({out['loop_over_bare_logged'] or float('nan'):.3f} x bare), {wall or float('nan'):,.0f} tok/s by "
                 f"the wall clock with evaluation and probes ({out['loop_over_bare_wall'] or float('nan'):.3f} x)")
    fabric.print(f"profile: phases over {phases['steps']} synchronised steps "
                 f"({phases['tokens_per_s_synced'] or float('nan'):,.0f} tok/s with the syncs):")
    for r in phases["phases"]:
        fabric.print(f"  {r['phase']:<36} {r['ms_per_step']:>9.2f} ms/step {r['share_%']:>6.1f} %")
    if fabric.global_rank == 0:
        atomic_write_text(run.plan.out_dir / "profile.json", json.dumps(out, indent=1) + "\n")
    return out


def stop_reason(run: Run, t_start: float) -> Optional[str]:
    """Why the run leaves after this step before ``max_steps`` (None: it carries on): ``train.stop_at_step`` or
    ``train.max_time_s``, where rank 0's clock decides for every rank (ranks that stop at different steps deadlock
    in the next collective)."""
    t, step, fabric = run.cfg.train, run.state.step, run.fabric
    if step >= t.max_steps:
        return None
    stopped = None
    if t.stop_at_step is not None and step >= t.stop_at_step:
        stopped = f"train.stop_at_step={t.stop_at_step}"
    if t.max_time_s is not None:
        out_of_time = time.perf_counter() - t_start >= t.max_time_s
        if fabric.world_size > 1:
            out_of_time = bool(fabric.broadcast(out_of_time, src=0))
        if out_of_time:
            stopped = f"train.max_time_s={t.max_time_s}"
    return stopped


def fit(cfg: RunConfig, plan: Optional[Plan] = None, on_step_end: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train as configured; returns the summary (also written to ``<out_dir>/summary.json`` on rank 0).

    :func:`setup`, :func:`resume`, then the loop: :func:`optimizer_step`, logging every ``log_interval``,
    :func:`validate` every ``eval_interval`` / ``sink_interval``, :func:`save` every ``save_interval`` and at the
    end; :func:`summarize` at the end. ``on_step_end(step, metrics)`` is called after every optimizer step (tests
    use it to kill the process).
    """
    plan = plan or preflight(cfg)
    run = setup(cfg, plan)
    resume(run)
    t, fabric, s = cfg.train, run.fabric, run.state
    if s.step >= t.max_steps:
        fabric.print(f"{run.resumed_from} is at step {s.step} >= train.max_steps={t.max_steps}: nothing to do "
                     "(raise train.max_steps to train further)")
        done = plan.out_dir / "summary.json"
        return json.loads(done.read_text()) if done.is_file() else {"step": s.step, "final": {},
                                                                     "out_dir": str(plan.out_dir)}
    log = RunLog(run)
    if run.resumed_from is None:
        log.report(s.step, validate(run, bool(t.eval_interval), True))    # step 0: the curves start at initialisation

    t_start = time.perf_counter()
    t_mark, tokens_mark, overhead = time.perf_counter(), s.tokens_seen, 0.0
    stopped = None
    tokens_per_step = t.global_batch_size * plan.mc.block_size
    to_device = PinnedBatches(fabric.device)
    next_batch = lambda: to_device(run.loader.next_batch())            # noqa: E731
    prof = run.prof
    profile_from = s.step + (t.max_steps - s.step) // 2        # profile mode: the second half is timed by phase
    run.model.train()
    while s.step < t.max_steps:
        prof.enabled = t.profile and s.step >= profile_from
        prof.start()
        lr = lr_at(s.step, cfg)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        loss_sum, grad_norm = optimizer_step(run, next_batch)
        s.step += 1
        s.tokens_seen += tokens_per_step
        metrics: Dict[str, Any] = {}
        final = s.step == t.max_steps
        stopped = stop_reason(run, t_start)
        if s.step % t.log_interval == 0 or final or stopped:
            loss_val = float(fabric.all_reduce(loss_sum / run.accum, reduce_op="mean"))
            now = time.perf_counter()
            dt = max(now - t_mark - overhead, 1e-9)      # training time only: evaluation and saving excluded
            s.train_seconds += dt
            speed = (s.tokens_seen - tokens_mark) / dt
            log.speeds.append(speed)
            log.marks.append((s.step, now, s.tokens_seen, speed))
            t_mark, tokens_mark, overhead = now, s.tokens_seen, 0.0
            metrics.update(tokens=s.tokens_seen, lr=lr, train_loss=loss_val, tokens_per_s=speed,
                           train_seconds=s.train_seconds,
                           grad_norm=float(grad_norm) if grad_norm is not None else None)
            if grad_norm is not None and not math.isfinite(metrics["grad_norm"]):
                raise RuntimeError(f"non-finite gradient norm {metrics['grad_norm']} at step {s.step} "
                                   f"(train_loss {loss_val}); resume from the last checkpoint with a lower train.lr")
            if cfg.logging.progress:
                fabric.print(f"step {s.step}/{t.max_steps} loss {loss_val:.4f} lr {lr:.3g} "
                             f"{speed:,.0f} tok/s")
        prof.mark("logging")
        ending = final or stopped is not None
        do_val = bool(plan.data.valid_set) and ((t.eval_interval and s.step % t.eval_interval == 0) or ending)
        do_sink = (t.sink_interval and s.step % t.sink_interval == 0) or ending
        t0 = time.perf_counter()
        if do_val or do_sink:
            if "train_loss" not in metrics:   # an eval row always carries the train loss of its step
                metrics["train_loss"] = float(fabric.all_reduce(loss_sum / run.accum, reduce_op="mean"))
            metrics.update(validate(run, do_val, do_sink))
        if metrics:
            log.report(s.step, metrics)
        if on_step_end is not None:
            on_step_end(s.step, log.last)
        if (t.save_interval and s.step % t.save_interval == 0 and not final) or (stopped and not final):
            save(run, step_name(s.step))
        if final and t.save_final:
            save(run, FINAL)
        overhead += time.perf_counter() - t0
        prof.mark("evaluation + probes + checkpoints")
        prof.end_step(tokens_per_step)
        if stopped:
            fabric.print(f"stopping after step {s.step}: {stopped}; resume with the same command")
            break
    profile = profile_report(run, log, profile_from, next_batch) if t.profile else None
    return summarize(run, log, stopped, profile)


def summarize(run: Run, log: RunLog, stopped: Optional[str], profile: Optional[dict] = None) -> dict:
    """The run's summary; rank 0 also closes ``metrics.csv`` and writes ``summary.json`` and ``curves.png``."""
    cfg, fabric, s, t = run.cfg, run.fabric, run.state, run.cfg.train
    out_dir = run.plan.out_dir
    summary = {
        "run": cfg.run_name, "out_dir": str(out_dir), "rank": fabric.global_rank, "step": s.step,
        "max_steps": t.max_steps, "stopped_early": stopped,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "tokens_seen": s.tokens_seen, "world_size": fabric.world_size, "accum": run.accum,
        "device": torch.cuda.get_device_name() if fabric.device.type == "cuda" else "cpu",
        "precision": resolve_hardware(cfg)[2],
        "params_M": run.raw.num_parameters() / 1e6,
        "tokens_per_s_median": statistics.median(log.speeds[1:] or log.speeds) if log.speeds else None,
        "train_seconds": s.train_seconds,
        "final": {k: v for k, v in log.last.items() if not k.startswith("_")},
        "val_loss_domain": run.headline,
        "sink_1_curve": log.sink_curve, "probe": run.plan.probe_where,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if fabric.device.type == "cuda" else None,
        "environment": environment(),        # commit, versions, CPU / GPU, threads, load: where this ran
        "run_config": cfg.to_dict(),         # what ran: a summary.json describes its run on its own
    }
    if profile is not None:
        summary["profile"] = profile
    log.close()
    if fabric.global_rank == 0:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        try:
            from lit_gpt.training_curves import plot_curves

            plot_curves(out_dir / "metrics.csv", out_dir / "curves.png", title=f"{cfg.run_name} ({run.plan.mc.name})")
        except ImportError:
            fabric.print("note: matplotlib missing, no curves.png")
    return summary
