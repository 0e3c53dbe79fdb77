"""Where the 1B bench step's GPU time goes (issue 20's profile): training's step for a bench path, built as
``lit-llama-lab bench`` builds it, with CUDA graphs off so the profiler sees every kernel (a graph replays the same
ones). Prints, per step: GPU busy time, kernels by family, the 15 busiest kernels, and the step's model FLOPs
against the GPU busy time.

    python scripts/bench_census.py [path, default ours+varlen+compile] [steps profiled, default 3]
    CENSUS_SHAPE=tiny python scripts/bench_census.py ours 1    # a CPU check of the script
"""

import collections
import sys
import time

import torch

from lit_llama_lab.tools.bench_paths import (
    path_options,
    shape_model,
    step_flops,
    synthetic_batch,
)

FAMILIES = (("triton (compiled)", ("triton",)),  # first: a compiled kernel's fused name can hold "gemm_4bit"
            ("dequantize", ("dequant", "kgetabsmax")), ("4-bit gemm", ("gemm_4bit", "gemv_4bit")),
            ("flash attention", ("fmha", "flash", "attention")),
            ("gemm", ("gemm", "cutlass", "sm90", "sm80", "xmma", "ampere", "hopper", "cublas", "nvjet")),
            ("adam", ("adam",)), ("softmax", ("softmax",)), ("copy/cast", ("copy", "cast", "cat")),
            ("reduce", ("reduce", "norm")), ("elementwise", ("elementwise", "vectorized")))


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "ours+varlen+compile"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    import os

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = os.environ.get("CENSUS_SHAPE", "llama-3.2-1b")
    seq, docs = (2048, 512) if shape != "tiny" else (64, 32)
    name = shape_model(shape)
    builder, options = path_options(path, {})
    options = {k: v for k, v in options.items() if k != "amp"}
    options["cuda_graphs"] = False
    model, loss_fn, _ = builder(name, 16, True, device, 0, **options)
    batch = synthetic_batch(model.config.vocab_size, 4, seq, docs, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=cuda)

    def step():
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        step()
    sync()
    ms = (time.perf_counter() - start) / 10 * 1000
    from torch.profiler import ProfilerActivity, profile

    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == kind and (cuda or not e.cpu_children):  # CPU: leaf ops only
            by_name[e.name][0] += 1
            by_name[e.name][1] += e.device_time if cuda else e.self_cpu_time_total
    family = collections.defaultdict(lambda: [0, 0.0])
    for kernel, (n, us) in by_name.items():
        low = kernel.lower()
        key = next((f for f, words in FAMILIES if any(w in low for w in words)), "other")
        family[key][0] += n
        family[key][1] += us
    busy = sum(v[1] for v in family.values()) / steps / 1000
    lora = sum(p.numel() for p in params)
    flops = step_flops(model.config, 4 * seq, docs, lora)
    print(f"{path} (graphs off), {loss_fn.plan.summary() if hasattr(loss_fn, 'plan') else ''}")
    print(f"  step {ms:.1f} ms wall (10 steps, no per-step sync), GPU busy {busy:.1f} ms; model FLOPs "
          f"{flops / 1e12:.1f} T: {flops / ms / 1e9:.0f} TFLOP/s on the wall, {flops / busy / 1e9:.0f} on busy time")
    for key, (n, us) in sorted(family.items(), key=lambda kv: -kv[1][1]):
        print(f"    {key:18s} {n / steps:6.0f} kernels {us / steps / 1000:7.2f} ms")
    for kernel, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"      {n / steps:5.0f} x {us / max(n, 1):7.1f} us  {kernel[:120]}")
    if cuda:
        print(f"  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
