"""How ``lit-llama-lab bench`` measures a path: the setup every path builds with, the training steps it times (in
a process group, with the adapters' gradients averaged as :class:`lit_llama_lab.train.ddp.QLoRADDPStrategy` does),
and the figures of :func:`measure_speed`. Shared by :mod:`lit_llama_lab.tools.bench` and its multi-GPU and
workload modules."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from lit_llama_lab.tools.bench_paths import runs, shape_model, split_amp, step_flops
from lit_llama_lab.train.ddp import GradientBucket

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 spec sheets


def distributed() -> bool:
    """Whether this process is one rank of a process group (``bench --devices N``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def train_steps(model, loss_fn: Callable, batches: list[dict], device: torch.device, amp: bool = False) -> list[float]:
    """One AdamW step (lr 2e-4, fused on GPU) per batch, under bf16 autocast on GPU when ``amp`` (the baseline+amp
    path only: training, and so every ``ours`` path, runs no autocast). In a process group (``bench --devices N``)
    the adapters' gradients are averaged over the ranks after each backward, as
    :class:`lit_llama_lab.train.ddp.QLoRADDPStrategy` does. Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = getattr(model, "_bench_optimizer", None) or torch.optim.AdamW(params, lr=2e-4,
                                                                              fused=device.type == "cuda")
    model._bench_optimizer = optimizer
    bucket = getattr(model, "_bench_bucket", None) or (GradientBucket(params) if distributed() else None)
    model._bench_bucket = bucket  # made once, as QLoRADDPStrategy makes it at setup
    model.train()
    losses = []
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = loss_fn(batch)
        loss.backward()
        if bucket is not None:  # what QLoRADDPStrategy does after each step's backward
            bucket.all_reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(x) for x in losses]


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock reads what ran."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_device(device: torch.device) -> None:
    """Drop what the last path left (garbage, the CUDA cache) and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_speed(builder: Callable, options: dict, setup: dict, batch: dict, steps: int, warmup: int) -> dict:
    """Warm-up steps, then ``steps`` timed steps on one batch: tokens/s, seconds/step, peak GPU memory, MFU."""
    device = setup["device"]
    free_device(device)
    amp, options = split_amp(options)
    model, loss_fn, prepare = builder(setup["name"], setup["rank"], setup["checkpointing"], device, setup["seed"],
                                      **options)
    prepared = prepare(batch)
    train_steps(model, loss_fn, [prepared] * warmup, device, amp)
    sync_device(device)
    warm_peak = None
    if device.type == "cuda":  # warm-up holds compilation and graph capture: the timed steps' own peak is kept apart
        warm_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    if distributed():
        torch.distributed.barrier()  # every rank starts the timed steps together
    start = time.perf_counter()
    losses = train_steps(model, loss_fn, [prepared] * steps, device, amp)
    sync_device(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch["input_ids"].numel()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = step_flops(model.get_base_model().config, tokens, setup["doc_len"], lora)
    result = {"runs": runs(loss_fn, amp), "tokens_per_s": tokens / seconds, "step_s": seconds, "last_step_loss": losses[-1],
              # peak_gib: the whole run's peak. steady_peak_gib: the timed steps' alone; for graphed paths it
              # misses the graph's private pool (replays allocate nothing), so it is only meaningful without graphs
              "peak_gib": max(warm_peak, torch.cuda.max_memory_allocated() / 2**30) if warm_peak is not None else None,
              "steady_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "tflops_per_s": flops / seconds / 1e12, "flops_per_step": flops, "trainable_params": lora}
    if setup["peak_tflops"]:
        result["mfu"] = result["tflops_per_s"] / setup["peak_tflops"]
    if getattr(loss_fn, "plan", None) is not None:
        result["plan"] = loss_fn.plan.as_dict()
    if distributed():  # equal on every rank when the gradients were averaged
        result["adapter_checksum"] = float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))
    del model, loss_fn
    free_device(device)
    return result


def bench_setup(arguments: dict) -> tuple[torch.device, str, dict, dict]:
    """``(device, shape, setup, defaults)`` of :func:`bench`'s ``arguments`` (its parameters, speed and precision as
    dicts): the device, the model shape, what every path builds with, and the settings the modifiers start from."""
    a = arguments
    device = a["device"]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    shape = a["shape"] if a["shape"] != "auto" else ("llama-3.2-1b" if dev.type == "cuda" else "tiny")
    peak_tflops = a["peak_tflops"]
    if dev.type == "cuda" and not peak_tflops:
        name = torch.cuda.get_device_name(dev)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    loss_model = a["loss_model"]
    setup = {"name": shape_model(shape), "rank": a["rank"], "checkpointing": a["speed"]["gradient_checkpointing"],
             "device": dev, "seed": a["seed"], "doc_len": a["doc_len"], "peak_tflops": peak_tflops,
             "loss_model": ("tiny-random" if shape == "tiny" else "smollm2-135m") if loss_model == "auto" else loss_model}
    defaults = {k: v for k, v in {**a["speed"], **a["precision"]}.items() if k != "gradient_checkpointing"}
    return dev, shape, setup, defaults
