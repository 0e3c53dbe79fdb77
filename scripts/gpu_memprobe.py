"""Where does a training step's peak GPU memory go? One benchmark path on the 1B shape, a few warm-up steps, then one
step recorded by torch's allocator history; the live allocations at the step's peak are grouped by the Python
frames that made them.

    python scripts/gpu_memprobe.py OUT.json ours+varlen+compile [--tokenizer .tok] [--steps 3]

Prints: memory before the step (weights, optimizer state), after the forward (what the forward keeps for backward),
the peak and where it is (forward or backward), and the largest groups of live allocations at the peak.
"""

import argparse
import json
import os
import time
from collections import defaultdict

import torch

from lit_llama_lab.tools.bench import model_vocab, path_options, shape_model, split_amp, synthetic_batch, train_steps

SKIP = ("torch/utils/_contextlib", "torch/nn/modules/module.py", "torch/_dynamo/", "torch/_compile.py",
        "torch/_tensor.py", "torch/autograd/function.py", "torch/_ops.py", "torch/_library/", "torch/utils/_python",
        "functools.py", "torch/cuda/memory.py", "torch/_functorch/_aot_autograd/utils.py")


def frames_key(frames: list[dict], depth: int = 6) -> str:
    kept = [f for f in frames if not any(s in f["filename"] for s in SKIP)]
    parts = []
    for f in kept[:depth]:
        name = f["filename"]
        short = "inductor:" + os.path.basename(name) if "torchinductor" in name else "/".join(name.split("/")[-2:])
        parts.append(f"{short}:{f['line']}:{f['name']}")
    return " <- ".join(parts) or "(no python frames)"


def live_blocks(snapshot: dict) -> dict:
    return {b["address"]: (b["size"], "live before the recorded step") for seg in snapshot["segments"]
            for b in seg["blocks"] if b["state"] == "active_allocated"}


def replay(start: dict, events: list[dict]) -> tuple[int, int, dict]:
    """Apply the trace to the starting live set: (peak bytes, event index of the peak, live set at the peak)."""

    def apply(live: dict, e: dict) -> int:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], frames_key(e.get("frames", [])))
            return e["size"]
        if e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            return -live.pop(e["addr"])[0]
        return 0

    live = dict(start)
    total = peak = sum(s for s, _ in live.values())
    at = -1
    for i, e in enumerate(events):
        total += apply(live, e)
        if total > peak:
            peak, at = total, i
    live = dict(start)  # a second pass to the peak: cheaper than copying the live set at every new peak
    for e in events[:at + 1]:
        apply(live, e)
    return peak, at, live


def top_groups(live: dict, top: int) -> list[dict]:
    """The ``top`` largest groups of a live set (:func:`replay`) by the frames that allocated them."""
    groups = defaultdict(lambda: [0, 0])
    for size, key in live.values():
        groups[key][0] += size
        groups[key][1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"gib": round(s / 2**30, 4), "count": n, "where": k} for k, (s, n) in ranked]


def print_groups(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['gib']:8.3f} GiB {row['count']:6d}x  {row['where']}")


def apply_variant(model, variant: str) -> None:
    """Experiments on how checkpointing meets torch.compile (PROBE_VARIANT): ``sac`` (a selective-checkpoint policy
    that marks every op must-recompute), ``budget`` (the partitioner's activation memory budget at 0), ``outside``
    (the eager checkpoint around compiled attention, MLP and norms instead of a compiled layer)."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    layers = model.get_base_model().get_decoder().layers
    if variant == "sac":
        policy = lambda ctx, op, *a, **k: CheckpointPolicy.MUST_RECOMPUTE  # noqa: E731
        for layer in layers:
            layer._gradient_checkpointing_func = partial(
                checkpoint, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, policy))
    elif variant == "budget":
        torch._functorch.config.activation_memory_budget = 0.0
    elif variant == "outside":
        for layer in layers:
            layer._compiled_call_impl = None
            for child in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                getattr(layer, child).compile()
    elif variant:
        raise ValueError(f"unknown PROBE_VARIANT {variant!r}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("path")
    parser.add_argument("--tokenizer", default="llama-3.2")
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no_checkpointing", action="store_true")
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--warmup_trace", action="store_true",
                        help="also record the warm-up steps (compilation, CUDA graph capture) and group the live "
                             "allocations at their peak")
    args = parser.parse_args()
    device = torch.device("cuda")
    name = shape_model(args.shape, args.tokenizer) if args.shape == "llama-3.2-1b" else shape_model(args.shape)
    builder, options = path_options(args.path, {})
    amp, options = split_amp(options)
    batch = synthetic_batch(model_vocab(name), args.micro_batch, args.seq_len, 512, device)
    t0 = time.perf_counter()
    model, loss_fn, prepare = builder(name, 16, not args.no_checkpointing, device, 0, **options)
    variant = os.environ.get("PROBE_VARIANT", "")
    apply_variant(model, variant)
    if args.warmup_trace:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        warm_start = live_blocks(torch.cuda.memory._snapshot())
    prepared = prepare(batch)
    train_steps(model, loss_fn, [prepared] * args.steps, device, amp)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    warm_top = []
    if args.warmup_trace:
        warm_events = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
        w_peak, _, w_live = replay(warm_start, warm_events)
        warm_top = top_groups(w_live, args.top)
        print(f"warm-up: replayed peak {w_peak / 2**30:.3f} GiB over {len(warm_events)} events")
        print_groups(warm_top)
    t1 = time.perf_counter()
    train_steps(model, loss_fn, [prepared] * args.timed, device, amp)
    torch.cuda.synchronize()
    tokens_per_s = batch["input_ids"].numel() * args.timed / (time.perf_counter() - t1)
    warm_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()

    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    start = live_blocks(torch.cuda.memory._snapshot())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = model._bench_optimizer
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
        loss = loss_fn(prepared)
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated()
    forward_events = len(torch.cuda.memory._snapshot()["device_traces"][0])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][0]
    peak, at, peak_live = replay(start, events)
    gib = lambda b: b / 2**30  # noqa: E731
    from torch._dynamo.utils import counters

    result = {"path": args.path, "variant": os.environ.get("PROBE_VARIANT", ""), "checkpointing": not args.no_checkpointing, "warm_seconds": warm_s, "tokens_per_s": tokens_per_s, "warm_peak_gib": gib(warm_peak),
              "before_step_gib": gib(before), "after_forward_gib": gib(after_forward),
              "step_peak_gib": gib(torch.cuda.max_memory_allocated()), "replayed_peak_gib": gib(peak),
              "peak_in": "forward" if at < forward_events else "backward/optimizer", "events": len(events),
              "loss": float(loss), "trainable": sum(p.numel() for p in params),
              "graph_breaks": {k: v for k, v in counters["graph_break"].items()},
              "dynamo_stats": {k: v for k, v in counters["stats"].items()},
              "top": top_groups(peak_live, args.top), "warm_top": warm_top}
    print(json.dumps({k: v for k, v in result.items() if k not in ("top", "warm_top")}, indent=1))
    print_groups(result["top"])
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
