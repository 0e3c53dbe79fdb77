"""``lit-llama-lab bench --workload finetome``: the seed's FineTome run, projected.

The seed's headline was the time of one epoch of FineTome-100k on Llama-3.2-1B ("23 hours to 11 hours"). Here each
path trains on a FineTome-like corpus: the bundled FineTome sample's conversations (``data/samples``), tokenized and
masked by the data module as ``configs/finetome-tuned.yaml`` does (ShareGPT format, assistant turns labelled, 16
conversations a step packed into rows of at most 2048 tokens), drawn with replacement (seeded), so the conversation
lengths follow the sample's distribution. Every batch is a new draw, so batch shapes vary as in a real run (CUDA
graphs capture the first batches of each shape). The timed batches run twice: the first pass meets each shape for the
first time (compilations and captures, paid once in a real epoch), the second gives the rate of the rest of the epoch.
The projection: the one-time cost + ``conversations`` / the second pass's conversations per second. On the Llama 3.2
shapes the tokenizer is the real Llama 3.2 one with Llama 3's chat template.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "finetome_sample.jsonl"
SEED_HOURS = (23.0, 11.0)  # the seed's FineTome-100k epoch on Llama-3.2-1B: before, after its tuning


def finetome_batches(model_name: str, steps: int, device: torch.device, batch_size: int = 16,
                     max_seq_length: int = 2048, seed: int = 0) -> tuple[list[dict], list[int], list[int]]:
    """``steps`` training batches of ``batch_size`` conversations drawn from the bundled FineTome sample, as the data
    module hands them to training; returns ``(batches, tokens per batch, token length of each sample conversation)``."""
    from lit_llama_lab.data.datamodule import ChatDataModule
    from lit_llama_lab.tools.bench_paths import to_device

    data = ChatDataModule(source=str(SAMPLE), tokenizer=model_name, format="sharegpt", batch_size=batch_size,
                          max_seq_length=max_seq_length, packing=True, test_fraction=0.0, val_fraction=0.0)
    data.setup("fit")
    train = data.splits["train"]
    rows = train if isinstance(train, list) else train.to_list()
    rng = random.Random(seed)
    batches, tokens = [], []
    for _ in range(steps):
        picked = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        tokens.append(sum(len(r["input_ids"]) for r in picked))
        batches.append(to_device(data.on_before_batch_transfer(data.collate(picked), 0), device))
    return batches, tokens, [len(r["input_ids"]) for r in rows]


def measure_workload(builder, options: dict, setup: dict, batches: list[dict], tokens: list[int], warmup: int,
                     conversations: int, per_batch: int) -> dict:
    """``warmup`` untimed batches, then the rest twice, each pass timed. The first pass meets every batch shape of
    the workload for the first time (compilations, CUDA graph captures, autotuning: a path's one-time costs); the
    second repeats the same batches in the same order, every shape already met, so it runs at the rate the rest of a
    long epoch runs. Conversations and real (unpadded) tokens per second are the second pass's; the projection of
    ``conversations`` adds the one-time cost once: the warm-up's time and the first pass's excess over the second."""
    from lit_llama_lab.tools.bench_measure import free_device, sync_device, train_steps
    from lit_llama_lab.tools.bench_paths import runs, split_amp

    device = setup["device"]
    free_device(device)
    amp, options = split_amp(options)
    model, loss_fn, prepare = builder(setup["name"], setup["rank"], setup["checkpointing"], device, setup["seed"],
                                      **options)
    prepared = [prepare(b) for b in batches]
    timed = prepared[warmup:]
    seconds = []
    for part in (prepared[:warmup], timed, timed):
        sync_device(device)
        start = time.perf_counter()
        losses = train_steps(model, loss_fn, part, device, amp)
        sync_device(device)
        seconds.append(time.perf_counter() - start)
    warm, first, second = seconds
    per_s = len(timed) * per_batch / second
    once = warm + max(first - second, 0.0)
    result = {"runs": runs(loss_fn, amp), "conversations_per_s": per_s, "tokens_per_s": sum(tokens[warmup:]) / second,
              "step_s": second / len(timed), "timed_steps": len(timed), "first_pass_step_s": first / len(timed),
              "one_time_s": once, "last_step_loss": losses[-1],
              "projected_hours": (once + conversations / per_s) / 3600,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del model, loss_fn
    free_device(device)
    return result


def bench_finetome(plans: dict, setup: dict, steps: int, warmup: int, conversations: int, seed: int) -> dict:
    """Every path of ``plans`` on the same FineTome-like batches (``warmup`` + ``steps`` of them)."""
    batches, tokens, lengths = finetome_batches(setup["name"], warmup + steps, setup["device"], seed=seed)
    corpus = {"source": str(SAMPLE.name), "sample_conversations": len(lengths),
              "tokens_per_conversation": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                                          "min": min(lengths), "max": max(lengths)},
              "batch_size": 16, "max_seq_length": 2048, "conversations": conversations,
              "tokenizer": Path(setup["name"]).name}
    paths = {}
    for path, (builder, options) in plans.items():
        try:
            paths[path] = measure_workload(builder, options, setup, batches, tokens, warmup, conversations, 16)
        except Exception as error:  # one failing path keeps the others
            paths[path] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{path}: {paths[path]}", flush=True)
    return {"corpus": corpus, "paths": paths}


def format_workload_table(workload: dict) -> str:
    """A Markdown table: conversations/s, tokens/s, the projected hours, beside the seed's 23 h -> 11 h."""
    c = workload["corpus"]
    lengths = c["tokens_per_conversation"]
    rows = [f"FineTome-like corpus: the {c['sample_conversations']} conversations of {c['source']} drawn with "
            f"replacement, {lengths['mean']:.0f} tokens each on average (median {lengths['median']:.0f}, "
            f"{lengths['min']}-{lengths['max']}; tokenizer and chat template of {c['tokenizer']}), "
            f"{c['batch_size']} a step in rows of <= {c['max_seq_length']} tokens; the seed's FineTome-100k epoch: "
            f"{SEED_HOURS[0]:.0f} h -> {SEED_HOURS[1]:.0f} h. Rates: the second pass over the timed batches (every "
            "shape met before); one-time: the warm-up and the first pass's excess over the second.", "",
            f"| path | conversations/s | tokens/s | first pass conversations/s | one-time s | projected hours for "
            f"{c['conversations']:,} conversations | peak GiB | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for path, r in workload["paths"].items():
        if "error" in r:
            rows.append(f"| {path} | failed: {r['error'][:80]} |||||||")
            continue
        first = c["batch_size"] / r["first_pass_step_s"]
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        rows.append(f"| {path} | {r['conversations_per_s']:,.1f} | {r['tokens_per_s']:,.0f} | {first:,.1f} | "
                    f"{r['one_time_s']:.0f} | {r['projected_hours']:.2f} | {peak} | {r['runs']} |")
    return "\n".join(rows)
