"""``lit-llama-lab bench --devices N``: each path on one GPU, then on N GPUs of this host as data-parallel training
runs it (:class:`lit_llama_lab.train.ddp.QLoRADDPStrategy`: every rank its own step, CUDA graphs included, the
adapters' gradients averaged after each backward).

Each rank is its own process (``RANK``/``WORLD_SIZE`` set, NCCL on GPUs, gloo on a CPU), builds the path exactly as
the one-GPU row does and trains its own batch of the same shape (rank ``r`` draws its tokens from seed ``r``; rank 0's
is the one-GPU batch). Reported per path: tokens/s in total (every rank's tokens over the slowest rank's time), per
GPU, the scaling efficiency (total / (N × the one-GPU tokens/s of the same invocation)), the peak memory of each GPU,
and a checksum of each rank's adapters after the timed steps (equal when the gradients were averaged).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lit_llama_lab.io import write_json


def check_devices(device: torch.device, devices: int) -> None:
    """Refuse ``--devices`` beyond this host's GPUs, before anything runs."""
    if device.type == "cuda" and torch.cuda.device_count() < devices:
        raise ValueError(f"--devices {devices}: this host has {torch.cuda.device_count()} GPU(s).")


def bench_on_devices(arguments: dict, paths: list[str], devices: int, single: dict, output: str | None) -> dict:
    """Each of ``paths`` on ``devices`` processes beside ``single``, the same invocation's one-device results;
    returns them with a ``devices`` entry per path and prints the table."""
    results = {**single, "devices": {}}
    for path in paths:
        results["devices"][path] = _run_ranks(arguments, path, devices, single["paths"].get(path, {}))
        print(f"{path} on {devices} devices: {results['devices'][path]}", flush=True)
    print(format_devices_table(results), flush=True)
    if output:
        write_json(output, results)
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(arguments: dict, path: str, devices: int, single: dict) -> dict:
    """``path`` on ``devices`` rank processes; their results combined (or the failure, as ``error``)."""
    threads = max(1, torch.get_num_threads() // devices)
    code = (f"import json, sys, torch; torch.set_num_threads({threads}); "
            "from lit_llama_lab.tools.bench_devices import rank_worker; "
            "rank_worker(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3])")
    with tempfile.TemporaryDirectory(prefix="lit-bench-ranks-") as tmp:
        out = str(Path(tmp) / "ranks.json")
        base_env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(devices),
                        OMP_NUM_THREADS=str(threads))
        child = {**arguments, "devices": 1, "isolate": False, "output": None}
        procs = []
        for rank in range(devices):
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            log = open(Path(tmp) / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
            procs.append((subprocess.Popen([sys.executable, "-c", code, json.dumps(child), path, out], env=env,
                                           stdout=log, stderr=subprocess.STDOUT, text=True), log))
        codes = [p.wait() for p, _ in procs]
        tails = []
        for (_, log), code_ in zip(procs, codes, strict=True):
            log.seek(0)
            text = log.read()
            log.close()
            if code_:
                tails.append(text.strip().splitlines()[-1] if text.strip() else f"exit {code_}")
        if any(codes) or not Path(out).is_file():
            return {"gpus": devices, "error": f"rank process(es) exited {codes}: {' | '.join(tails)[:400]}"}
        ranks = json.loads(Path(out).read_text())["ranks"]
    step_s = max(r["step_s"] for r in ranks)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in ranks)  # tokens of one step over all ranks
    total = tokens / step_s
    entry = {"gpus": devices, "tokens_per_s": total, "tokens_per_s_per_gpu": total / devices, "step_s": step_s,
             "peak_gib_per_gpu": [r["peak_gib"] for r in ranks],
             "adapter_checksums": [r["adapter_checksum"] for r in ranks],
             "runs": f"{ranks[0]['runs']}; {devices} ranks, adapter gradients averaged after each backward"}
    if single.get("tokens_per_s"):
        entry["single_tokens_per_s"] = single["tokens_per_s"]
        entry["scaling"] = total / (devices * single["tokens_per_s"])
    return entry


def rank_worker(arguments: dict, path: str, output: str) -> None:
    """One rank of :func:`_run_ranks`: join the process group, build ``path`` on this rank's device, time its steps
    on this rank's batch; rank 0 writes every rank's figures to ``output``."""
    import torch.distributed as dist

    from lit_llama_lab.tools.bench_measure import bench_setup, measure_speed
    from lit_llama_lab.tools.bench_paths import model_vocab, path_options, synthetic_batch

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = arguments["device"] != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    try:
        _, _, setup, defaults = bench_setup({**arguments, "device": str(device)})
        builder, options = path_options(path, defaults)
        a = arguments
        batch = synthetic_batch(model_vocab(setup["name"]), a["micro_batch"], a["seq_len"], a["doc_len"], device,
                                seed=rank)
        result = measure_speed(builder, options, setup, batch, a["steps"], a["warmup"])
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            write_json(output, {"ranks": gathered})
    finally:
        dist.destroy_process_group()


def format_devices_table(results: dict) -> str:
    """A Markdown table of each path on one device and on N: tokens/s, per GPU, scaling, peak memory per GPU."""
    rows = ["| path | GPUs | tokens/s (all GPUs) | tokens/s per GPU | scaling efficiency | × 1 GPU | peak GiB per GPU |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for path, multi in results.get("devices", {}).items():
        single = results["paths"].get(path, {})
        if "tokens_per_s" in single:
            rows.append(f"| {path} | 1 | {single['tokens_per_s']:,.0f} | {single['tokens_per_s']:,.0f} | – | 1.00 | "
                        f"{'–' if single.get('peak_gib') is None else format(single['peak_gib'], '.2f')} |")
        if "error" in multi:
            rows.append(f"| {path} | {multi['gpus']} | failed: {multi['error'][:80]} |||||")
            continue
        peaks = ", ".join("–" if p is None else f"{p:.2f}" for p in multi["peak_gib_per_gpu"])
        scaling = multi.get("scaling")
        rows.append(f"| {path} | {multi['gpus']} | {multi['tokens_per_s']:,.0f} | {multi['tokens_per_s_per_gpu']:,.0f} | "
                    f"{'–' if scaling is None else format(scaling, '.1%')} | "
                    f"{'–' if scaling is None else format(scaling * multi['gpus'], '.2f')} | {peaks} |")
    return "\n".join(rows)
