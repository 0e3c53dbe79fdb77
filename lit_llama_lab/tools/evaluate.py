"""``lit-llama-lab evaluate``: load each model once and run each asked task's evaluation on it (the tasks of
:mod:`lit_llama_lab.tasks.registry`: ``emoji``, ``general``), then write a summary of every result.

The tool knows no task: it checks the settings with each task, loads the models (transformers, or a GGUF in
llama.cpp), and asks each task to evaluate, tabulate and compare. Everything answers through the one shared
:func:`~lit_llama_lab.generation.generate`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.io import write_atomic
from lit_llama_lab.tasks.registry import get_task, task_names


def check_models(models: Sequence[str]) -> None:
    """Fail before any model loads when one of ``models`` is neither an adapter folder nor a base model."""
    from lit_llama_lab.model.adapters import is_adapter_folder
    from lit_llama_lab.model.source import resolve_model_source

    for name in models:
        if not is_adapter_folder(name):
            resolve_model_source(name)  # raises ModelNotFoundError naming the accepted forms


def result_task(result: dict) -> str:
    """The task a result (``metrics.json`` contents) belongs to (results written before tasks were recorded are
    emoji results)."""
    return result.get("suite") or "emoji"


def summary(results: Sequence[dict]) -> str:
    """A Markdown section per task, each with that task's table of ``results``."""
    by_task: dict[str, list[dict]] = {}
    for result in results:
        by_task.setdefault(result_task(result), []).append(result)
    return "\n".join(f"## {get_task(name).title or name}\n\n{get_task(name).table(part)}" for name, part in by_task.items())


def compare(paths: Sequence[str | Path]) -> str:
    """Markdown tables comparing saved results: each path is a ``metrics.json`` or a folder holding one (one table
    when they are of one task)."""
    results = []
    for path in map(Path, paths):
        file = path / "metrics.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No metrics.json at {str(path)!r}: pass an evaluation output folder or file.")
        results.append(json.loads(file.read_text(encoding="utf-8")))
    tasks = {result_task(r) for r in results}
    return get_task(tasks.pop()).table(results) if len(tasks) == 1 else summary(results)


def check_arguments(suites: Sequence[str], settings: dict) -> None:
    """Refuse unknown suites and bad numbers, then let each task check its settings; all before any model loads."""
    known = task_names("evaluate")
    unknown = [s for s in suites if s not in known]
    if unknown or not suites:
        raise ValueError(f"Unknown suite {unknown or suites}: use {', '.join(known)}, or several as [emoji,general].")
    if settings["limit"] is not None and settings["limit"] < 1:
        raise ValueError(f"limit must be at least 1 (or unset for whole splits), got {settings['limit']}.")
    if settings["max_new_tokens"] < 1 or settings["batch_size"] < 1:
        raise ValueError(f"max_new_tokens and batch_size must be at least 1, got {settings['max_new_tokens']}, "
                         f"{settings['batch_size']}.")
    if settings["general_max_new_tokens"] < 1:
        raise ValueError(f"general_max_new_tokens must be at least 1, got {settings['general_max_new_tokens']}.")
    for name in suites:
        if get_task(name).check is not None:
            get_task(name).check(settings)


def as_list(value) -> list:
    """A value or a list of values, as a list."""
    return [value] if isinstance(value, str) else list(value)


def trained_answer_style(name: str) -> str | None:
    """The answer style an adapter folder records it was trained on (its ``lit_llama_lab.json``); None for a base
    model, a GGUF file or an adapter written before the style was recorded."""
    from lit_llama_lab.model.adapters import adapter_metadata, is_adapter_folder

    return adapter_metadata(Path(name)).get("answer_style") if is_adapter_folder(name) else None


def evaluate(
    model: str | list[str] = "smollm2-135m",
    split: str | list[str] = "test",
    wordings: str | list[str] = "train",
    limit: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    output_dir: str = "runs/eval",
    seed: int = 42,
    test_fraction: float = 0.2,
    val_fraction: float = 0.02,
    answer_style: str | None = None,
    examples: int = 10,
    quantize: Literal["nf4", "fp4", "none"] | None = None,
    suite: str | list[str] = "emoji",
    general_max_new_tokens: int = 128,
    runtime: Literal["transformers", "llamacpp"] = "transformers",
) -> list[dict]:
    """Measure how well models do each task of ``suite``: how well they name emoji (strict name accuracy, the old
    lenient figure beside it, eos termination, answer length, reference perplexity) and how well they still answer
    ordinary questions (the general suite: accuracy, template leakage).

    ``suite: emoji`` gives one result per model, ``split`` and ``wordings``, written to
    ``<output_dir>/<model>-<split>-<wordings>/`` (metrics.json, answers.jsonl, report.md); ``suite: general`` one
    result per model in ``<output_dir>/<model>-general-suite/``. With more than one result, comparison tables go to
    ``<output_dir>/summary.md``. Tables are printed too.

    Args:
        model: a base model (``smollm2-135m``, an HF folder, a .gguf, a hub id) or an adapter/checkpoint folder;
            or a list of them, e.g. ``[smollm2-135m, runs/emoji/adapter]`` for a before/after table.
        split: emoji: ``test`` (held-out emoji), ``train``, ``val`` or ``all``; or a list. Rebuilt as training
            splits the data, so use the training run's seed and fractions.
        wordings: emoji: ``train`` asks "What is {e}?" as in training; ``heldout`` rotates through questions
            training never uses (trained emoji asked in new words). Or a list of both.
        limit: evaluate a seeded random sample of this many rows of each split or suite (all rows when unset).
        max_new_tokens: emoji: answer budget; an answer without eos within it counts as not ended.
        batch_size: chats per generation (and perplexity) batch.
        output_dir: root folder of the results.
        seed: the training run's data seed (it decides the split) and the sample's seed.
        test_fraction: the training run's ``data.test_fraction``.
        val_fraction: the training run's ``data.val_fraction``.
        answer_style: the training run's ``data.answer_style``: the reference answers for perplexity (unset: the
            style an adapter folder records it was trained on, else the task's default).
        examples: how many answers each report shows (the emoji report always adds 🐼 🇺🇸 🎂 🤌).
        quantize: base weights as ``nf4``, ``fp4`` or ``none``; unset: as the adapter was trained (else nf4).
        suite: the tasks to evaluate: ``emoji`` (the splits and wordings above), ``general`` (the bundled
            general-ability suite: ordinary prompts with checkable answers, none about emoji), or both,
            ``[emoji,general]``.
        general_max_new_tokens: answer budget of the general suite.
        runtime: ``transformers``, or ``llamacpp`` to run .gguf models in llama.cpp with the GGUF's own tokenizer
            and chat template (needs llama-cpp-python: ``make test-llamacpp``).

    Returns the list of results (the metrics.json contents).
    """
    from lit_llama_lab.tools.llamacpp import check_runtime, load_for_runtime

    models, suites = as_list(model), as_list(suite)
    settings = {"limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "test_fraction": test_fraction, "val_fraction": val_fraction, "answer_style": answer_style,
                "general_max_new_tokens": general_max_new_tokens, "splits": as_list(split),
                "wordings": as_list(wordings)}
    check_arguments(suites, settings)
    check_models(models)
    check_runtime(models, runtime)
    torch.manual_seed(seed)
    results = []
    for name in models:
        loaded, tokenizer = load_for_runtime(name, runtime, quantize)
        own = {**settings, "answer_style": answer_style or trained_answer_style(name)}
        for task in map(get_task, suites):
            done = task.evaluate(loaded, tokenizer, name, own, Path(output_dir), examples)
            print(f"\n{task.title or task.name}: {Path(output_dir)}\n{task.table(done)}")
            results += done
        del loaded
    if len(results) > 1:
        table = summary(results)
        write_atomic(Path(output_dir) / "summary.md", "# Evaluation\n\n" + table)
        print(f"\n{Path(output_dir) / 'summary.md'}\n{table}")
    return results
