"""The general-ability suite as a task: does the tuned model still answer ordinary questions, and does the task's
template leak into them (``lit-llama-lab evaluate --suite general``, ``export --verify_suites [general]``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from lit_llama_lab.tasks.common import answers_table, run_name, sample_rows, write_result
from lit_llama_lab.tasks.task import Task

GENERAL_COLUMNS = {"accuracy": ("general accuracy", "{:.1%}"), "leakage": ("template leakage", "{:.1%}"),
                   "eos_rate": ("eos termination", "{:.1%}"), "mean_answer_tokens": ("mean answer tokens", "{:.1f}")}


def answer_suite(model, tokenizer, rows: Sequence[dict], max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy answers to the suite items ``rows``, scored: one record per item (id, category, prompt, answer,
    correct, leaks, stopped, tokens)."""
    from lit_llama_lab.generation import generate
    from lit_llama_lab.tasks.general import general_records

    outputs = generate(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress="general suite")
    records = general_records(rows, [o.text for o in outputs])
    for record, out in zip(records, outputs, strict=True):
        record.update(stopped=out.stopped, tokens=len(out.token_ids))
    return records


def general_metrics(records: Sequence[dict]) -> dict:
    """The suite's metrics (:func:`lit_llama_lab.tasks.general.score_general`) with eos rate and answer length."""
    from lit_llama_lab.tasks.general import score_general

    return {**score_general(records), "eos_rate": sum(r["stopped"] for r in records) / len(records),
            "mean_answer_tokens": sum(r["tokens"] for r in records) / len(records)}


def general_table(results: Sequence[dict]) -> str:
    """A Markdown table, a row per general-suite result: model, items, the metrics, then accuracy per category."""
    categories = sorted({k.split("/", 1)[1] for r in results for k in r["metrics"] if k.startswith("accuracy/")})
    head = ["model", "items", *(title for title, _ in GENERAL_COLUMNS.values()), *categories]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["metrics"]
        cells = [str(r["model"]), str(m["answers"]), *(fmt.format(m[k]) for k, (_, fmt) in GENERAL_COLUMNS.items())]
        cells += ["{:.0%}".format(m[f"accuracy/{c}"]) if f"accuracy/{c}" in m else "—" for c in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_general(model, tokenizer, model_name: str, settings: dict, output_dir: Path, examples: int = 10) -> list[dict]:
    """Run the general suite (or a seeded sample of ``settings['limit']`` items) on one loaded model; write
    metrics.json, answers.jsonl and report.md into ``<output_dir>/<model>-general-suite/`` (each atomically) and
    return ``[the metrics.json contents]``."""
    from lit_llama_lab.tasks.general import load_suite

    started = time.perf_counter()
    rows = sample_rows(load_suite(), settings["limit"], settings["seed"])
    records = answer_suite(model, tokenizer, rows, settings["general_max_new_tokens"], settings["batch_size"])
    result = {"model": model_name, "split": "general", "wordings": "suite", "suite": "general",
              "metrics": general_metrics(records),
              "settings": {**settings, "device": str(next(model.parameters()).device),
                           "seconds": round(time.perf_counter() - started, 1)}}
    wrong = [r for r in records if not r["correct"] or r["leaks"]]
    columns = {"id": "id", "prompt": "prompt", "answer": "answer", "correct": "correct", "leaks": "mentions emoji"}
    report = (f"# General-ability suite: {model_name}\n\n{general_table([result])}\n"
              f"## First {min(examples, len(records))} answers\n\n{answers_table(records[:examples], columns)}\n"
              f"## Wrong or leaking answers ({len(wrong)})\n\n{answers_table(wrong, columns)}")
    write_result(output_dir / run_name(model_name, "general", "suite"), result, records, report)
    return [result]


def general_suite(model, tokenizer, limit: int | None, seed: int = 42) -> dict:
    """The general suite as an export-verification suite (:mod:`lit_llama_lab.tools.export_verify`): accuracy and
    the share of answers free of the task's template (``1 - leakage``) on a seeded sample of ``limit`` items."""
    from lit_llama_lab.tasks.general import load_suite

    records = answer_suite(model, tokenizer, sample_rows(load_suite(), limit, seed), 128, batch_size=16)
    metrics = general_metrics(records)
    return {"scores": {"general_accuracy": metrics["accuracy"], "no_leakage": 1 - metrics["leakage"]},
            "answers": [r["answer"] for r in records]}


TASK = Task(name="general", title="General-ability suite", evaluate=evaluate_general, table=general_table,
            verify=general_suite)
