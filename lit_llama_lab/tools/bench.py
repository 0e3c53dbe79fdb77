"""``lit-llama-lab bench``: training's QLoRA step against the plain transformers + peft + bitsandbytes stack, on the
same 4-bit model and data: tokens/s, peak GPU memory, MFU, and the held-out loss after the same steps on real data
(emoji chats) to show the math is unchanged. The paths are in :mod:`lit_llama_lab.tools.bench_paths`; each ``ours``
path is training's own plan, builder and step, and each result row says what it ran.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.io import write_json
from lit_llama_lab.tools.bench_measure import (  # noqa: F401  (re-exported for scripts)
    PEAK_BF16_TFLOPS,
    bench_setup,
    free_device,
    measure_speed,
    sync_device,
    train_steps,
)
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

GPU_PATHS = "baseline,baseline+amp,ours+graphs+compile,ours+varlen+compile+graphs"
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
    free_device(device)
    return {"held_out_loss": held, "train_loss_first": losses[0], "train_loss_last": losses[-1]}


LOSS_BAR = 0.01  # issue 20's quality bar: a held-out loss at most 1% above the plain stack's


def format_table(results: dict) -> str:
    """A Markdown table of the measured paths, ratios and loss differences against ``baseline``. Two peer ratios:
    against the fastest peer that ran (the headline), and against the fastest whose held-out loss is within
    :data:`LOSS_BAR` of the plain stack's (when the loss check ran): a peer that learns worse is not the same result."""
    from lit_llama_lab.tools.bench_peers import PEERS

    base = results["paths"].get("baseline", {})
    amp = results["paths"].get("baseline+amp", {})
    base_loss = base.get("held_out_loss")

    def delta(r: dict) -> float | None:
        loss = r.get("held_out_loss")
        return (loss - base_loss) / abs(base_loss) if loss is not None and base_loss else None

    ran = [r for p, r in results["paths"].items() if p in PEERS and "tokens_per_s" in r]
    fastest = lambda rows: max(rows, key=lambda r: r["tokens_per_s"]) if rows else {}  # noqa: E731
    peer = fastest(ran)  # the headline: against the best peer that ran
    good_peer = fastest([r for r in ran if delta(r) is not None and delta(r) <= LOSS_BAR])
    rows = ["| path | tokens/s | × baseline | × baseline+amp | × best peer | × best peer within 1% loss | peak GiB "
            "| timed-steps peak GiB | TFLOP/s | MFU | held-out loss | Δ loss | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    ratio = lambda r, other: r["tokens_per_s"] / other["tokens_per_s"] if "tokens_per_s" in other else None  # noqa: E731
    for path, r in results["paths"].items():
        if "error" in r:
            rows.append(f"| {path} | failed: {r['error'][:80]} ||||||||||||")
            continue
        rows.append(f"| {path} | {r['tokens_per_s']:,.0f} | {fmt(ratio(r, base), '.2f')} | {fmt(ratio(r, amp), '.2f')} | "
                    f"{fmt(ratio(r, peer), '.2f')} | {fmt(ratio(r, good_peer), '.2f')} | "
                    f"{fmt(r['peak_gib'], '.2f')} | {fmt(r.get('steady_peak_gib'), '.2f')} | "
                    f"{r['tflops_per_s']:.1f} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('held_out_loss'), '.4f')} | "
                    f"{fmt(delta(r), '+.3%')} | {r.get('runs', '')} |")
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
    unsloth_pythonpath: str | None = None,
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
            ours+modifiers (sdpa|flex|varlen, compile, liger, graphs, bf16act, fp32act, bf16lora, fp32lora). ``ours`` is
            training's plan, setup and step with ``speed`` and ``precision`` as settings and the modifiers over
            them. ``auto``: on a GPU baseline, baseline+amp, ours+graphs+compile (the sdpa mask, training's previous
            default) and ours+varlen+compile+graphs (what training runs for a 1B model on a GPU); on a CPU baseline
            and ours.
        loss_steps: steps on real emoji chats before the held-out loss is compared (0 or real_data=False: skip).
        real_data: run the loss check.
        loss_model: model for the loss check; ``auto``: tiny-random for the tiny shape, else smollm2-135m.
        loss_batch: emoji chats per real-data step (packed into rows of 512 tokens).
        speed: training's speed settings for the ``ours`` paths before their modifiers (default: sdpa with our mask,
            eager layers, no CUDA graphs, ``dequantize_once`` auto as in training, gradient checkpointing on, for
            the baseline too).
        precision: training's precision settings for the ``ours`` paths (``+bf16act`` / ``+fp32act`` force fp32
            activations off / on).
        peak_tflops: the device's bf16 peak for MFU; 0 guesses from the GPU name (H100/H200: 989), none on CPU.
        seed: seeds the adapter initialisation (the same for every path).
        isolate: run each path in its own Python process (this command spawns them), so no path inherits another's
            compiled code, CUDA graph pools or allocator state: measured in one process, the fourth path's peak read
            0.23 GiB above its own process's. Default: on a GPU when more than one path runs.
        workload: ``synthetic`` (the speed batch above, repeated) or ``finetome``: ``warmup`` + ``steps`` batches of the
            FineTome-like corpus of :mod:`lit_llama_lab.tools.bench_workload` (16 conversations a step in rows of
            <= 2048 tokens, as ``configs/finetome-tuned.yaml``), the paths isolated as above (``unsloth`` and its
            PYTHONPATH too), and the projected time of ``conversations`` conversations beside the seed's FineTome-100k
            epoch.
        conversations: how many conversations the ``finetome`` workload projects.
        unsloth_pythonpath: the ``PYTHONPATH`` the ``unsloth`` path's process runs with (default: this process's), so
            one invocation can bench Unsloth from a site of its own beside ours (Unsloth pins another transformers).
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
    if isolate is None:
        isolate = dev.type == "cuda" and len(plans) > 1
    if workload == "finetome":
        if devices > 1:
            raise ValueError("--workload finetome runs on one device: leave out --devices.")
        if isolate:
            return _bench_isolated(arguments, list(plans), output)
        return _bench_finetome(plans, setup, dev, steps, warmup, conversations, seed, output)
    if devices > 1:
        from lit_llama_lab.tools.bench_devices import bench_on_devices, check_devices

        check_devices(dev, devices)
        single = bench(**{**arguments, "devices": 1, "output": None})
        return bench_on_devices(arguments, list(plans), devices, single, output)
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
                    output: str | None) -> dict:
    from lit_llama_lab.tools.bench_workload import bench_finetome, format_workload_table

    results = {"settings": {k: str(v) for k, v in {**setup, "steps": steps, "warmup": warmup}.items()},
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "versions": _versions(),
               "workload": bench_finetome(plans, setup, steps, warmup, conversations, seed)}
    print(format_workload_table(results["workload"]), flush=True)
    if output:
        write_json(output, results)
    return results


def measure_path(builder: Callable, options: dict, setup: dict, batch: dict, steps: int, warmup: int,
                 real: tuple | None) -> dict:
    """One path's speed (and, with ``real`` batches, its loss check); a failure becomes the path's ``error``, so one
    failing variant does not lose the others. The loss check's smaller model multiplies its adapters in the dtype the
    speed row's plan chose and its activations' dtype (``auto`` would decide again, by the loss model's width)."""
    try:
        entry = {"options": options, **measure_speed(builder, options, setup, batch, steps, warmup)}
        if real:
            entry.update(measure_loss(builder, loss_options(options, entry.get("plan")), setup, *real))
    except Exception as error:
        entry = {"options": options, "error": f"{type(error).__name__}: {error}"}
        free_device(setup["device"])
    return entry


def loss_options(options: dict, plan: dict | None) -> dict:
    """``options`` for the loss check: ``adapter_matmuls`` and ``fp32_activations`` ``auto`` replaced by what the
    speed row's ``plan`` ran."""
    if plan is None:
        return options
    decided = {"adapter_matmuls": "float32" if plan["adapter_matmul_dtype"] == "float32" else "compute",
               "fp32_activations": plan["fp32_activations"]}
    return {**options, **{k: v for k, v in decided.items() if options.get(k) == "auto"}}


def _bench_isolated(arguments: dict, paths: list[str], output: str | None) -> dict:
    """:func:`bench` with each path in a child process (same arguments, one path, ``isolate=False``, this process's
    CPU thread count, which decides how CPU matmuls sum); the results are merged in order, the ``finetome`` workload's
    under ``workload``. A child that fails or dies becomes that path's ``error`` entry."""
    import subprocess
    import sys

    results: dict = {}
    entries: dict = {}  # path -> its result, in the order asked
    with tempfile.TemporaryDirectory(prefix="lit-bench-") as tmp:
        for i, path in enumerate(paths):
            child = {**arguments, "paths": path, "isolate": False, "output": str(Path(tmp) / f"{i}.json")}
            code = ("import unsloth; " if path == "unsloth" else "")  # Unsloth patches transformers: before it
            code += (f"import json, sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
                    "from lit_llama_lab.tools.bench import bench; bench(**json.loads(sys.argv[1]))")
            last = "no output"
            env = dict(os.environ)
            if path == "unsloth" and arguments.get("unsloth_pythonpath"):
                env["PYTHONPATH"] = arguments["unsloth_pythonpath"]
            with subprocess.Popen([sys.executable, "-c", code, json.dumps(child)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env) as run:
                for line in run.stdout:  # the child's progress, as it comes
                    print(line, end="", flush=True)
                    last = line.strip() or last
            if run.returncode == 0 and Path(child["output"]).is_file():
                part = json.loads(Path(child["output"]).read_text())
                results = results or part
                entries.update(part["workload"]["paths"] if "workload" in part else part["paths"])
            else:
                entries[path] = {"error": f"process exited {run.returncode}: {last}"}
    results["settings"] = {**results.get("settings", {}), "isolated": "True"}
    if "workload" in results:
        from lit_llama_lab.tools.bench_workload import format_workload_table

        results["workload"]["paths"] = entries
        print(format_workload_table(results["workload"]), flush=True)
    else:
        results["paths"] = entries
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
