"""Replay: the frozen starting model's own answers to general prompts, mixed into a task's training data.

A model fine-tuned on one narrow task forgets how to chat: after the emoji run every answer became "… is the X
emoji." Nothing can be downloaded at run time, so the general chat comes from the model itself (self-distillation
replay, as in Self-Distillation Fine-Tuning, arXiv 2402.13669): before training, the model training starts from
(the base, or the base with ``init_adapter``) answers a pool of general prompts greedily, once; the answers are
cached, and a share of each training epoch is those chats. Training on them keeps the model's own behaviour on
ordinary questions while it learns the task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.io import write_atomic

log = logging.getLogger(__name__)
REPLAY_VERSION = "1"  # bump when the generation below changes, to invalidate cached answers


@dataclass(frozen=True)
class ReplayArgs:
    """Replay of the starting model's own answers to general prompts, mixed into training so a task run keeps the
    assistant.

    Args:
        ratio: share of the training examples that are replay chats, in [0, 1); 0 turns replay off.
        prompts: a .jsonl file of ``{"prompt": ...}`` rows to draw from; default: the bundled pool of general prompts
            (disjoint from the general evaluation suite).
        max_new_tokens: answer budget; answers that do not end within it are not used.
        model: the model that answers: linked to the model's ``init_adapter`` when one is set, else its base.
        quantize: the answering model's 4-bit format, linked to the model's ``quantize``.
    """

    ratio: float = 0.0
    prompts: str | None = None
    max_new_tokens: int = 160
    model: str | None = None
    quantize: Literal["nf4", "fp4", "none"] = "nf4"


def replay_count(task_rows: int, ratio: float) -> int:
    """How many replay chats make them ``ratio`` of the training examples next to ``task_rows`` task rows."""
    if not 0 <= ratio < 1:
        raise ValueError(f"replay_ratio must be in [0, 1) (the share of replay chats among training examples), "
                         f"got {ratio}: e.g. --data.replay.ratio 0.15.")
    return round(task_rows * ratio / (1 - ratio))


def replay_cache_file(model: str, quantize: str, dtype: torch.dtype, max_new_tokens: int) -> Path:
    """The cache file of one answering model and setting: answers differ with the weights, the 4-bit format and the
    compute dtype (bf16 on a GPU, fp32 on a CPU), so each gets its own file."""
    from lit_llama_lab.model.source import cache_dir

    key = json.dumps([_model_identity(model), quantize, str(dtype), max_new_tokens, REPLAY_VERSION])
    return cache_dir() / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def _model_identity(model: str) -> list:
    """What names a model's weights: its path with size and modification time for local files, else the name."""
    path = Path(model).expanduser()
    if not path.exists():
        return [model]
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return [str(path.resolve())] + [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def read_cache(file: Path) -> dict[str, dict]:
    """Cached answers by prompt: ``{prompt: {"answer", "stopped"}}`` (empty when there is no cache yet)."""
    if not file.is_file():
        return {}
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["prompt"]: r for r in rows}


def answer_prompts(model: str, prompts: list[str], quantize: str = "nf4", max_new_tokens: int = 160,
                   device: torch.device | str | None = None, batch_size: int | None = None) -> dict[str, dict]:
    """The answers of ``model`` (a base or an adapter folder) to ``prompts``: greedy, generated once and cached
    (:func:`replay_cache_file`); only prompts missing from the cache are generated, then the cache is rewritten
    atomically. Returns ``{prompt: {"prompt", "answer", "stopped"}}`` for every prompt."""
    from lit_llama_lab.generation import generate
    from lit_llama_lab.model.load import load_for_inference
    from lit_llama_lab.model.precision import dtype_name, resolve_compute_dtype

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_compute_dtype("auto", device)
    file = replay_cache_file(model, quantize, dtype, max_new_tokens)
    cached = read_cache(file)
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        log.info("Replay: %s answers %d general prompts once (cached in %s)", model, len(missing), file)
        loaded, tokenizer = load_for_inference(model, quantize=quantize,
                                               compute_dtype=dtype_name(dtype), device=device)
        order = sorted(missing, key=len)  # similar lengths together: less left padding per batch
        size = batch_size or (256 if device.type == "cuda" else 16)
        outputs = generate(loaded, tokenizer, [[{"role": "user", "content": p}] for p in order],
                           max_new_tokens=max_new_tokens, batch_size=size, progress="replay")
        for prompt, out in zip(order, outputs, strict=True):
            cached[prompt] = {"prompt": prompt, "answer": out.text, "stopped": out.stopped}
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_atomic(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cached.values()))
    return {p: cached[p] for p in prompts}


def replay_chats(answers: dict[str, dict], count: int, seed: int) -> list[list[dict]]:
    """``count`` chats (user prompt, the model's answer) drawn with ``seed`` from the answers that ended with eos
    (an answer cut by the token budget would teach the model to stop mid-sentence). Fewer when too few ended;
    that shortfall is logged."""
    usable = [a for a in answers.values() if a["stopped"] and a["answer"].strip()]
    if count > len(usable):
        log.warning("Replay: %d chats asked for, %d usable answers (of %d prompts): training uses %d.", count,
                    len(usable), len(answers), len(usable))
    picked = random.Random(seed).sample(usable, min(count, len(usable)))
    return [[{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["answer"]}] for a in picked]


def load_prompts(path: str | None = None) -> list[str]:
    """Replay prompts from a .jsonl file of ``{"prompt": ...}`` rows, or the bundled pool of general prompts
    (:func:`lit_llama_lab.tasks.general.replay_prompts`, disjoint from the general evaluation suite)."""
    if path is None:
        from lit_llama_lab.tasks.general import replay_prompts

        return replay_prompts()
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"Replay prompts file {path!r} does not exist: pass a .jsonl of {{\"prompt\": ...}} rows, or "
                         "leave --data.replay.prompts unset for the bundled pool.")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{file}:{number}: not a JSON object with a 'prompt' string ({error}).") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{file}:{number}: 'prompt' must be a non-empty string.")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{file} holds no prompts.")
    return prompts


def prompts_needed(pool: list[str], count: int, seed: int, spare: float = 1.3) -> list[str]:
    """The first prompts of a seeded shuffle of ``pool``: enough for ``count`` usable answers with ``spare`` for
    those that run out of budget (the whole pool at most). Stable for a seed, so a larger ``count`` extends the
    cache instead of replacing it."""
    order = list(pool)
    random.Random(seed).shuffle(order)
    return order[: min(len(order), max(1, round(count * spare)))]
