"""Where the 1B bench step's GPU time goes (issue 20's profile): training's step for a bench path, built as
``lit-llama-lab bench`` builds it, with CUDA graphs off so the profiler sees every kernel (a graph replays the same
ones). Prints, per step: GPU busy time, kernels by family, the 15 busiest kernels, and the step's model FLOPs
against the GPU busy time.

    python scripts/bench_census.py [path, default ours+varlen+compile] [steps profiled, default 3]
    CENSUS_OPS=aten::add,aten::add_ python scripts/bench_census.py ...   # also: who launches those ops' kernels
    CENSUS_SHAPE=tiny python scripts/bench_census.py ours 1    # a CPU check of the script
"""

import collections
import os
import sys
import time

import torch

FAMILIES = (("triton (compiled)", ("triton",)),  # first: a compiled kernel's fused name can hold "gemm_4bit"
            ("dequantize", ("dequant", "kgetabsmax")), ("4-bit gemm", ("gemm_4bit", "gemv_4bit")),
            ("flash attention", ("fmha", "flash", "attention")),
            ("gemm", ("gemm", "cutlass", "sm90", "sm80", "xmma", "ampere", "hopper", "cublas", "nvjet")),
            ("adam", ("adam",)), ("softmax", ("softmax",)), ("copy/cast", ("copy", "cast", "cat")),
            ("reduce", ("reduce", "norm")), ("elementwise", ("elementwise", "vectorized")))


def profile_kernels(run, steps: int) -> tuple[dict, dict]:
    """Profile ``steps`` calls of ``run`` (one training step each): ``(by_name, by_family)``, each mapping to
    ``[kernel count, microseconds]`` summed over the steps. On a GPU the CUDA kernels; on a CPU the leaf ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
        if cuda:
            torch.cuda.synchronize()
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
    return by_name, family


def print_op_callers(run, names: set[str], top: int = 12) -> None:
    """One more profiled step of ``run``: the ops named in ``names`` that launched device work, grouped by their
    input shapes and the three ops (autograd nodes, compiled regions) they ran under, with their device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    groups = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.name in names and e.device_type == torch.autograd.DeviceType.CPU:
            parents, p = [], e.cpu_parent
            while p is not None and len(parents) < 3:
                parents.append(p.name[:60])
                p = p.cpu_parent
            key = f"{e.name} {e.input_shapes[:2]} < {' < '.join(parents)}"
            groups[key][0] += 1
            groups[key][1] += e.device_time_total if cuda else e.self_cpu_time_total
    for key, (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"      {n:5d} x {us / max(n, 1):7.1f} us  {key[:200]}")


def print_kernels(by_name: dict, family: dict, steps: int, top: int) -> None:
    """Per step: kernels and time by family, then the ``top`` busiest kernels."""
    for key, (n, us) in sorted(family.items(), key=lambda kv: -kv[1][1]):
        print(f"    {key:18s} {n / steps:6.0f} kernels {us / steps / 1000:7.2f} ms")
    for kernel, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"      {n / steps:5.0f} x {us / max(n, 1):7.1f} us  {kernel[:120]}")


def main() -> None:
    from lit_llama_lab.tools.bench_paths import path_options, shape_model, split_amp, step_flops, synthetic_batch

    path = sys.argv[1] if len(sys.argv) > 1 else "ours+varlen+compile"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = os.environ.get("CENSUS_SHAPE", "llama-3.2-1b")
    seq, docs = (2048, 512) if shape != "tiny" else (64, 32)
    builder, options = path_options(path, {})
    _, options = split_amp(options)
    model, loss_fn, _ = builder(shape_model(shape), 16, True, device, 0, **{**options, "cuda_graphs": False})
    batch = synthetic_batch(model.config.vocab_size, 4, seq, docs, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=cuda)

    def step():
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(5):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(10):
        step()
    sync()
    ms = (time.perf_counter() - start) / 10 * 1000
    by_name, family = profile_kernels(step, steps)
    busy = sum(v[1] for v in family.values()) / steps / 1000
    flops = step_flops(model.config, 4 * seq, docs, sum(p.numel() for p in params))
    print(f"{path} (graphs off), {loss_fn.plan.summary() if hasattr(loss_fn, 'plan') else ''}")
    print(f"  step {ms:.1f} ms wall (10 steps, no per-step sync), GPU busy {busy:.1f} ms; model FLOPs "
          f"{flops / 1e12:.1f} T: {flops / ms / 1e9:.0f} TFLOP/s on the wall, {flops / busy / 1e9:.0f} on busy time")
    print_kernels(by_name, family, steps, top=15)
    from torch._dynamo.utils import counters

    print(f"  graph breaks: {dict(counters['graph_break']) or 'none'}")
    if os.environ.get("CENSUS_OPS"):
        print_op_callers(step, set(os.environ["CENSUS_OPS"].split(",")))
    if cuda:
        print(f"  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
