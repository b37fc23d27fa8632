"""Self-describing checkpoints: every file carries the model config (and the run config when training wrote it).

A checkpoint file is ``torch.save`` of a dict with at least ``{"model_config": Config.to_dict(), "model":
state_dict}``; training adds ``optimizer``, ``scheduler``, ``step``, ``data_state``, ``rng``, ``run_config``.
Files are written atomically, so a crash leaves the previous checkpoint intact.

:func:`load_model` accepts a checkpoint file or a run folder (it then takes ``final.pth`` if present, else the
highest ``step-XXXXXXX.pth``).

Checkpoints written before issue #8 changed two variants are recognised: a ``pos_encoding: relative`` checkpoint
holding the learned T5 table (``rel_bias.embedding.weight``) loads as ``relative_learned`` (what it was trained
as), with a warning; a post-norm checkpoint holding a final norm ``ln_f`` is refused with a one-line reason
(post-norm models no longer have one, as in the seed, so no config computes what it was trained as).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch

from lit_gpt.config import Config
from lit_gpt.utils import atomic_torch_save

if TYPE_CHECKING:
    from lit_gpt.model import GPT

STEP_RE = re.compile(r"step-(\d+)\.pth$")


def model_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict without torch.compile / DDP prefixes."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def write_checkpoint(path: Union[str, Path], state_dict: Dict[str, torch.Tensor], config: Config,
                     **extra: Any) -> Path:
    """Atomically write ``{"model_config", "model", **extra}`` (the one checkpoint layout)."""
    path = Path(path)
    atomic_torch_save({"model_config": config.to_dict(), "model": state_dict, **extra}, path)
    return path


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, config: Config, **extra: Any) -> Path:
    return write_checkpoint(path, model_state_dict(model), config, **extra)


def step_checkpoints(folder: Union[str, Path]) -> List[Path]:
    """``step-XXXXXXX.pth`` files of a run folder, newest (highest step) first."""
    found = ((int(m.group(1)), p) for p in Path(folder).glob("step-*.pth") if (m := STEP_RE.search(p.name)))
    return [p for _, p in sorted(found, reverse=True)]


def list_checkpoints(folder: Union[str, Path]) -> List[Path]:
    """``final.pth`` (if any), then the step checkpoints newest first."""
    final = Path(folder) / "final.pth"
    return ([final] if final.is_file() else []) + step_checkpoints(folder)


def find_checkpoint(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    found = list_checkpoints(path)
    if found:
        return found[0]
    pths = sorted(path.glob("*.pth"))
    if len(pths) == 1:
        return pths[0]
    raise FileNotFoundError(f"no checkpoint in {path}: expected final.pth, step-XXXXXXX.pth or a single *.pth")


def _upgrade_legacy(payload: Dict[str, Any]) -> None:
    """Rename what an older version called the variant a checkpoint was trained as (see the module docstring)."""
    mc = payload["model_config"]
    if isinstance(mc, dict) and mc.get("pos_encoding") == "relative" and "rel_bias.embedding.weight" in payload["model"]:
        mc["pos_encoding"] = "relative_learned"
        warnings.warn(f"{payload['_path']}: pos_encoding='relative' with a learned bucket table is what is now called "
                      "'relative_learned' ('relative' is the paper's fixed bucket bias); loading it as relative_learned")


def check_state_keys(config: Config, missing, unexpected, where: str) -> Optional[str]:
    """One line describing why a state dict does not fit a model of ``config`` (None when it fits)."""
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if not missing and not unexpected:
        return None
    msg = f"{where}: weights do not match the config: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
    if config.norm_position == "post" and any(k.startswith("ln_f.") for k in unexpected):
        msg += ("; it has a final norm ln_f, which post-norm models no longer apply (the seed's model_postln.py has "
                "none): it was trained as another function and no config of this version computes it")
    return msg


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    file = find_checkpoint(path)
    payload = torch.load(file, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise ValueError(f"{file} is not a lit_gpt checkpoint: expected a dict with 'model' and 'model_config'")
    payload["_path"] = str(file)
    _upgrade_legacy(payload)
    return payload


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, **config_overrides: Any) -> Tuple["GPT", Dict[str, Any]]:
    """Build the model described by a checkpoint and load its weights. Returns (model in eval mode, payload
    without the weights). ``config_overrides`` change inference-only fields (e.g. attn_impl="eager")."""
    from lit_gpt.model import GPT

    payload = load_checkpoint(path)
    config = Config.from_dict(dict(payload["model_config"], **config_overrides), where=payload["_path"])
    model = GPT(config)
    missing, unexpected = model.load_state_dict(payload.pop("model"), strict=False)
    problem = check_state_keys(config, missing, unexpected, payload["_path"])
    if problem:
        raise ValueError(problem)
    model.to(device=device, dtype=dtype).eval()
    for k in ("optimizer", "scheduler"):
        payload.pop(k, None)
    return model, payload
