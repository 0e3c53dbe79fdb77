"""What a resume may change: a checkpoint continues only under the settings its saved state means something in.

Refused, naming both values: the base model, quantization, LoRA ``r``, ``alpha``, ``target_modules``, rsLoRA and
DoRA (the saved adapters were trained for them), the data seed (it draws the epoch order the saved position is in)
and, when the checkpoint stopped mid-epoch, the batch size (the position counts batches of the old size).
Applied and logged as changed: the learning rate and weight decay (written into the restored optimizer, whose
``initial_lr`` is the peak the warmup schedule scales), the trainer's lengths and callbacks, and every other
setting (the model and data are built from this run's settings).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

RUN_SETTINGS = "lit_llama_lab_run"  # checkpoint key: the trainer settings it was written under
REFUSED = ("model.name_or_path", "model.quantize", "model.lora.r", "model.lora.alpha", "model.lora.target_modules",
           "model.lora.use_rslora", "model.lora.use_dora")
REFUSED_IN_FIT = ("data.seed",)
REFUSED_MID_EPOCH = ("data.batch_size",)
OPTIMIZER = {"model.learning_rate": "lr", "model.weight_decay": "weight_decay"}


class ResumeError(ValueError):
    """A resume whose settings contradict the checkpoint's saved state; the message names both values."""


def flatten(prefix: str, hparams: Mapping) -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` under ``model`` → ``{"model.lora.r": 8}``; private keys (``_instantiator``) left out."""
    flat: dict[str, Any] = {}
    for key, value in dict(hparams or {}).items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def run_settings(trainer) -> dict[str, Any]:
    """The trainer settings a checkpoint records (under :data:`RUN_SETTINGS`) for a later resume to compare."""
    callbacks = sorted(type(cb).__name__ for cb in trainer.callbacks if not type(cb).__module__.startswith("lightning."))
    return {"trainer.max_steps": trainer.max_steps, "trainer.max_epochs": trainer.max_epochs,
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches, "trainer.callbacks": callbacks}


def saved_settings(checkpoint: dict) -> dict[str, Any]:
    """The model, data and trainer settings a checkpoint was written under, flattened."""
    return {**flatten("model", checkpoint.get("hyper_parameters", {})),
            **flatten("data", checkpoint.get("datamodule_hyper_parameters", {})),
            **checkpoint.get(RUN_SETTINGS, {})}


def current_settings(trainer) -> dict[str, Any]:
    """This run's settings, flattened as :func:`saved_settings`."""
    data = trainer.datamodule
    return {**flatten("model", trainer.lightning_module.hparams),
            **flatten("data", data.hparams if data is not None else {}), **run_settings(trainer)}


def _same_model(a: Any, b: Any) -> bool:
    from lit_llama_lab.model.source import resolve_model_source

    try:
        return resolve_model_source(str(a)) == resolve_model_source(str(b))
    except ValueError:
        return False


def same(key: str, saved: Any, now: Any) -> bool:
    """Whether a setting is unchanged: target modules in any order, a base model under another spelling."""
    if key.endswith("target_modules"):
        return sorted(saved or []) == sorted(now or [])
    if key == "model.name_or_path" and saved != now:
        return _same_model(saved, now)
    return saved == now


def mid_epoch(checkpoint: dict) -> tuple[int, int] | None:
    """``(epoch, batches)`` when the checkpoint stopped inside an epoch (from the train loader's saved position)."""
    states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    loader = states[0] if states and isinstance(states[0], Mapping) else {}
    batches = loader.get("batches", 0)
    if 0 < batches < loader.get("epoch_batches", sys.maxsize):
        return loader.get("epoch", 0), batches
    return None


def refusal(ckpt_path: Any, refused: dict[str, tuple[Any, Any]], position: tuple[int, int] | None) -> str:
    """The message of a refused resume: each setting with both values, then the ways out."""
    lines = []
    for key, (saved, now) in refused.items():
        line = f"  --{key}: the checkpoint has {saved!r}, this run asks for {now!r}"
        if key == "data.batch_size" and position:
            epoch, batches = position
            line += (f" (it stopped in epoch {epoch} after {batches} batches of {saved}: resuming would skip "
                     f"{batches}×{now} examples where {batches}×{saved} were trained)")
        lines.append(line)
    tail = " or resume from a checkpoint written at an epoch end," if "data.batch_size" in refused else ""
    return (f"Cannot resume from {ckpt_path}: these settings give its saved state its meaning and differ from it:\n"
            + "\n".join(lines) + f"\nResume with the checkpoint's values (leave out these overrides),{tail} or start "
            "a new run without --ckpt_path under a new name (--trainer.logger.init_args.name NAME).")


def apply_optimizer_settings(checkpoint: dict, changed: dict[str, Any]) -> None:
    """Write a changed learning rate / weight decay into the checkpoint's optimizer groups before they are restored.

    The peak rate is the group's ``initial_lr`` (what WarmupSchedule scales); its current ``lr`` keeps its ratio to
    the peak, so the schedule's position is unchanged.
    """
    for state in checkpoint.get("optimizer_states", []):
        for group in state.get("param_groups", []):
            if "model.learning_rate" in changed:
                lr = changed["model.learning_rate"]
                factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
                if "initial_lr" in group:
                    group["initial_lr"] = lr
                group["lr"] = lr * factor
            if "model.weight_decay" in changed:
                group["weight_decay"] = changed["model.weight_decay"]


def check_resume(module, checkpoint: dict) -> None:
    """Compare ``checkpoint``'s settings with this run's when the Trainer restores it (``on_load_checkpoint``).

    Raises :class:`ResumeError` naming every refused difference (the same on every process, as each reads the
    same checkpoint); in a fit, applies a changed learning rate / weight decay and logs what changed.
    """
    trainer = module._trainer
    if trainer is None:
        return
    fit = trainer.state.fn == "fit"
    saved, now = saved_settings(checkpoint), current_settings(trainer)
    changed = {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if not same(k, saved[k], now[k])}
    position = mid_epoch(checkpoint) if fit else None
    keys = REFUSED + (REFUSED_IN_FIT if fit else ()) + (REFUSED_MID_EPOCH if position else ())
    refused = {k: changed[k] for k in keys if k in changed}
    if refused:
        raise ResumeError(refusal(trainer.ckpt_path, refused, position))
    if not fit or not changed:
        return
    apply_optimizer_settings(checkpoint, {k: now[k] for k in OPTIMIZER if k in changed})
    if trainer.is_global_zero:
        log.warning("Resuming from %s with changed settings, applied: %s", trainer.ckpt_path,
                    "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
