"""``lit-llama-lab bench``: training's QLoRA step against the plain transformers + peft + bitsandbytes stack, on the
same 4-bit model and data: tokens/s, peak GPU memory, MFU, and the held-out loss after the same steps on real data
(emoji chats) to show the math is unchanged. The paths are in :mod:`lit_llama_lab.tools.bench_paths`; each ``ours``
path is training's own plan, builder and step, and each result row says what it ran.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.io import write_json
from lit_llama_lab.tools.bench_paths import (  # noqa: F401  (re-exported for scripts)
    BENCH_SPEED,
    Shape,
    emoji_batches,
    model_vocab,
    path_options,
    runs,
    shape_model,
    split_amp,
    step_flops,
    synthetic_batch,
)
from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs
from lit_llama_lab.train.ddp import all_reduce_gradients

GPU_PATHS = "baseline,baseline+amp,ours+graphs+compile,ours+varlen+compile+graphs"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 spec sheets

def _distributed() -> bool:
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
    model.train()
    losses = []
    distributed = _distributed()
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = loss_fn(batch)
        loss.backward()
        if distributed:  # what QLoRADDPStrategy does after each step's backward
            all_reduce_gradients(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(x) for x in losses]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_speed(builder: Callable, options: dict, setup: dict, batch: dict, steps: int, warmup: int) -> dict:
    """Warm-up steps, then ``steps`` timed steps on one batch: tokens/s, seconds/step, peak GPU memory, MFU."""
    device = setup["device"]
    _free(device)
    amp, options = split_amp(options)
    model, loss_fn, prepare = builder(setup["name"], setup["rank"], setup["checkpointing"], device, setup["seed"],
                                      **options)
    prepared = prepare(batch)
    train_steps(model, loss_fn, [prepared] * warmup, device, amp)
    _sync(device)
    warm_peak = None
    if device.type == "cuda":  # warm-up holds compilation and graph capture: the timed steps' own peak is kept apart
        warm_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    if _distributed():
        torch.distributed.barrier()  # every rank starts the timed steps together
    start = time.perf_counter()
    losses = train_steps(model, loss_fn, [prepared] * steps, device, amp)
    _sync(device)
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
    if _distributed():  # equal on every rank when the gradients were averaged
        result["adapter_checksum"] = float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))
    del model, loss_fn
    _free(device)
    return result


def measure_loss(builder: Callable, options: dict, setup: dict, batches: list[dict], held_out: dict) -> dict:
    """Train a fresh model on real batches, then the loss on a held-out batch (the path's own loss; for ``ours``
    validation's)."""
    device = setup["device"]
    amp, options = split_amp(options)
    model, loss_fn, prepare = builder(setup["loss_model"], setup["rank"], setup["checkpointing"], device,
                                      setup["seed"], **options)
    losses = train_steps(model, loss_fn, [prepare(b) for b in batches], device, amp)
    model.eval()
    held_fn = getattr(loss_fn, "evaluate", loss_fn)  # ours: the loss as training's validation computes it
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        held = float(held_fn(prepare(held_out)))
    del model, loss_fn
    _free(device)
    return {"held_out_loss": held, "train_loss_first": losses[0], "train_loss_last": losses[-1]}


def format_table(results: dict) -> str:
    """A Markdown table of the measured paths, ratios and loss differences against ``baseline``."""
    base = results["paths"].get("baseline", {})
    amp = results["paths"].get("baseline+amp", {})
    rows = ["| path | tokens/s | × baseline | × baseline+amp | peak GiB | timed-steps peak GiB | TFLOP/s | MFU | held-out loss "
            "| Δ loss | runs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for path, r in results["paths"].items():
        if "error" in r:
            rows.append(f"| {path} | failed: {r['error'][:80]} ||||||||||")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else None
        amp_ratio = r["tokens_per_s"] / amp["tokens_per_s"] if "tokens_per_s" in amp else None
        loss, base_loss = r.get("held_out_loss"), base.get("held_out_loss")
        delta = (loss - base_loss) / abs(base_loss) if loss is not None and base_loss else None
        rows.append(f"| {path} | {r['tokens_per_s']:,.0f} | {fmt(ratio, '.2f')} | {fmt(amp_ratio, '.2f')} | "
                    f"{fmt(r['peak_gib'], '.2f')} | {fmt(r.get('steady_peak_gib'), '.2f')} | "
                    f"{r['tflops_per_s']:.1f} | {fmt(r.get('mfu'), '.1%')} | {fmt(loss, '.4f')} | {fmt(delta, '+.3%')} | "
                    f"{r.get('runs', '')} |")
    return "\n".join(rows)


def bench(
    shape: Shape = "auto",
    seq_len: int = 2048,
    micro_batch: int = 4,
    rank: int = 16,
    steps: int = 20,
    warmup: int = 3,
    doc_len: int = 512,
    device: str = "auto",
    paths: str = "auto",
    loss_steps: int = 50,
    real_data: bool = True,
    loss_model: str = "auto",
    loss_batch: int = 32,
    speed: SpeedArgs = BENCH_SPEED,
    precision: PrecisionArgs = PrecisionArgs(),  # noqa: B008 (frozen: --precision.*)
    peak_tflops: float = 0.0,
    seed: int = 0,
    isolate: bool | None = None,
    devices: int = 1,
    workload: Literal["synthetic", "finetome"] = "synthetic",
    conversations: int = 100_000,
    output: str | None = None,
) -> dict:
    """Benchmark QLoRA training steps: the plain transformers+peft+bitsandbytes stack against training's step.

    Args:
        shape: model shape with random (1B) or real weights: llama-3.2-1b, smollm2-135m, or tiny (CPU tests);
            ``auto``: llama-3.2-1b on a GPU, tiny on a CPU (a 1B step in fp32 on a CPU takes minutes).
        seq_len: tokens per row of the speed batch.
        micro_batch: rows per step.
        rank: LoRA rank (alpha = rank) on all seven projections.
        steps: timed steps after ``warmup`` untimed ones.
        warmup: untimed steps first (compilation, allocator warm-up).
        doc_len: length of the packed documents in the speed batch (position_ids restart every doc_len tokens).
        device: ``auto`` (CUDA when present), ``cuda`` or ``cpu``. bf16 compute on GPU, fp32 on CPU.
        paths: comma-separated: baseline (the issue's recipe: no autocast), baseline+amp (bf16 autocast), ours, or
            ours+modifiers (sdpa|flex|varlen, compile, liger, graphs, bf16act). ``ours`` is training's plan, setup
            and step with ``speed`` and ``precision`` as settings and the modifiers over them. ``auto``: on a GPU
            baseline, baseline+amp, ours+graphs+compile (the sdpa mask, training's previous default) and
            ours+varlen+compile+graphs (what training runs for a 1B model on a GPU); on a CPU baseline and ours.
        loss_steps: steps on real emoji chats before the held-out loss is compared (0 or real_data=False: skip).
        real_data: run the loss check.
        loss_model: model for the loss check; ``auto``: tiny-random for the tiny shape, else smollm2-135m.
        loss_batch: emoji chats per real-data step (packed into rows of 512 tokens).
        speed: training's speed settings for the ``ours`` paths before their modifiers (default: sdpa with our mask,
            eager layers, no CUDA graphs, ``dequantize_once`` auto as in training, gradient checkpointing on, for
            the baseline too).
        precision: training's precision settings for the ``ours`` paths (``+bf16act`` turns fp32 activations off).
        peak_tflops: the device's bf16 peak for MFU; 0 guesses from the GPU name (H100/H200: 989), none on CPU.
        seed: seeds the adapter initialisation (the same for every path).
        isolate: run each path in its own Python process (this command spawns them), so no path inherits another's
            compiled code, CUDA graph pools or allocator state: measured in one process, the fourth path's peak read
            0.23 GiB above its own process's. Default: on a GPU when more than one path runs.
        workload: ``synthetic`` (the speed batch above, repeated) or ``finetome``: ``warmup`` + ``steps`` batches of the
            FineTome-like corpus of :mod:`lit_llama_lab.tools.bench_workload` (16 conversations a step in rows of
            <= 2048 tokens, as ``configs/finetome-tuned.yaml``), every path in this process, and the projected time
            of ``conversations`` conversations beside the seed's FineTome-100k epoch.
        conversations: how many conversations the ``finetome`` workload projects.
        devices: GPUs (processes) per path. Above 1, each path runs on 1 and then on ``devices`` GPUs, each rank its
            own batch of the same shape, the adapters' gradients averaged after every backward as
            :class:`lit_llama_lab.train.ddp.QLoRADDPStrategy` does (:mod:`lit_llama_lab.tools.bench_devices`):
            tokens/s in total and per GPU, scaling efficiency, peak memory per GPU. On a CPU: gloo processes.
        output: write the results as JSON here (atomically).

    Returns the results dict; prints a Markdown table whose last column says what each path ran. The one surprising
    thing: MFU counts no recomputation.
    """
    speed = SpeedArgs(**speed) if isinstance(speed, dict) else speed  # a child process of isolate gets dicts
    precision = PrecisionArgs(**precision) if isinstance(precision, dict) else precision
    arguments = {**locals(), "speed": asdict(speed), "precision": asdict(precision)}  # for isolate's children
    if devices < 1:
        raise ValueError(f"--devices {devices}: give the number of GPUs (processes) to run on, 1 or more.")
    dev, shape, setup, defaults = bench_setup(arguments)
    if paths == "auto":
        paths = GPU_PATHS if dev.type == "cuda" else "baseline,ours"
    plans = {p.strip(): path_options(p, defaults) for p in paths.split(",") if p.strip()}
    if workload == "finetome":
        return _bench_finetome(plans, setup, dev, steps, warmup, conversations, seed, devices, output)
    if devices > 1:
        from lit_llama_lab.tools.bench_devices import bench_on_devices

        return bench_on_devices(arguments, list(plans), devices, output)
    if isolate is None:
        isolate = dev.type == "cuda" and len(plans) > 1
    if isolate:
        return _bench_isolated(arguments, list(plans), output)
    batch = synthetic_batch(model_vocab(setup["name"]), micro_batch, seq_len, doc_len, dev)
    real = emoji_batches(setup["loss_model"], loss_steps, dev, loss_batch) if real_data and loss_steps > 0 else None
    results = {"settings": {k: str(v) for k, v in {**setup, "shape": shape, "seq_len": seq_len, "micro_batch": micro_batch,
               "steps": steps, "warmup": warmup, "loss_steps": loss_steps if real else 0}.items()},
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "versions": _versions(), "paths": {}}
    for path, (builder, options) in plans.items():
        results["paths"][path] = measure_path(builder, options, setup, batch, steps, warmup, real)
        print(f"{path}: {results['paths'][path]}", flush=True)
    print(format_table(results), flush=True)
    if output:
        write_json(output, results)
    return results


def _bench_finetome(plans: dict, setup: dict, dev: torch.device, steps: int, warmup: int, conversations: int, seed: int,
                    devices: int, output: str | None) -> dict:
    from lit_llama_lab.tools.bench_workload import bench_finetome, format_workload_table

    if devices > 1:
        raise ValueError("--workload finetome runs on one device: leave out --devices.")
    results = {"settings": {k: str(v) for k, v in {**setup, "steps": steps, "warmup": warmup}.items()},
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "versions": _versions(),
               "workload": bench_finetome(plans, setup, steps, warmup, conversations, seed)}
    print(format_workload_table(results["workload"]), flush=True)
    if output:
        write_json(output, results)
    return results


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


def measure_path(builder: Callable, options: dict, setup: dict, batch: dict, steps: int, warmup: int,
                 real: tuple | None) -> dict:
    """One path's speed (and, with ``real`` batches, its loss check); a failure becomes the path's ``error``, so one
    failing variant does not lose the others."""
    try:
        entry = {"options": options, **measure_speed(builder, options, setup, batch, steps, warmup)}
        if real:
            entry.update(measure_loss(builder, options, setup, *real))
    except Exception as error:
        entry = {"options": options, "error": f"{type(error).__name__}: {error}"}
        _free(setup["device"])
    return entry


def _bench_isolated(arguments: dict, paths: list[str], output: str | None) -> dict:
    """:func:`bench` with each path in a child process (same arguments, one path, ``isolate=False``, this process's
    CPU thread count, which decides how CPU matmuls sum); the results are merged in order. A child that fails or dies
    becomes that path's ``error`` entry."""
    import subprocess
    import sys

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="lit-bench-") as tmp:
        for i, path in enumerate(paths):
            child = {**arguments, "paths": path, "isolate": False, "output": str(Path(tmp) / f"{i}.json")}
            code = (f"import json, sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
                    "from lit_llama_lab.tools.bench import bench; bench(**json.loads(sys.argv[1]))")
            last = "no output"
            with subprocess.Popen([sys.executable, "-c", code, json.dumps(child)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) as run:
                for line in run.stdout:  # the child's progress, as it comes
                    print(line, end="", flush=True)
                    last = line.strip() or last
            if run.returncode == 0 and Path(child["output"]).is_file():
                part = json.loads(Path(child["output"]).read_text())
                results = results or {k: v for k, v in part.items() if k != "paths"} | {"paths": {}}
                results["paths"].update(part["paths"])
            else:
                results.setdefault("paths", {})[path] = {"error": f"process exited {run.returncode}: {last}"}
    results["settings"] = {**results.get("settings", {}), "isolated": "True"}
    print(format_table(results), flush=True)
    if output:
        write_json(output, results)
    return results


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
