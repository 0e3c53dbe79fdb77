"""Where does a GPU training step's time go? The floor of the step (no Lightning), eager vs CUDA graphs, a census of
the kernels one step launches, and the cost of validation and of the sample generations, on real batches of a
config; each for 4-bit layers dequantized at every use and once (``--model.speed.dequantize_once``). Both lines time
training's own step (:class:`lit_llama_lab.train.step.TrainStep`): with the run's plan, and with CUDA graphs off.

    python scripts/gpu_profile.py --config configs/emoji.yaml [overrides, e.g. --model.precision.tf32 false]
    DEQUANTIZE_ONCE=true python scripts/gpu_profile.py ...   # one setting only (default: false,true)
"""

import dataclasses
import os
import sys
import time

import torch

from lit_llama_lab.cli import LabCLI
from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.generation import generate
from lit_llama_lab.speed.loss import fast_label_loss, label_loss
from lit_llama_lab.train.module import QLoRAModule
from lit_llama_lab.train.step import TrainStep

CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def to_device(batch: dict) -> dict:
    return {k: v.cuda() if CUDA and isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eager_step(module) -> TrainStep:
    """Training's step with the run's plan but no CUDA graphs (made once per module)."""
    if getattr(module, "_eager_step", None) is None:
        plan = dataclasses.replace(module.plan, cuda_graphs=False)
        module._eager_step = TrainStep(module.model, plan, module.tokenizer.pad_token_id, module.hparams.distill_weight)
    return module._eager_step


def graphed_math(module, batch) -> torch.Tensor:
    """The graphed step's loss computed eagerly: the kernels a CUDA graph of the step replays."""
    train = module.step
    return fast_label_loss(module.model, train.inputs(pad_packed_batch(batch, train.plan.graph_pad_multiple, train.pad_id)))


def step(module, batch, params, optimizer, graphs: bool, census: bool = False) -> None:
    if census:
        loss = graphed_math(module, batch)
    else:
        loss = module.training_loss(batch) if graphs else eager_step(module)(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ms_per_step(module, batches, optimizer, graphs: bool) -> float:
    """ms per step (loss, backward, clip, AdamW) over ``batches``, one sync at the end only."""
    params = [p for p in module.parameters() if p.requires_grad]
    for phase in ("warm", "timed"):
        sync()
        start = time.perf_counter()
        for batch in batches if phase == "timed" else batches[:6]:
            step(module, batch, params, optimizer, graphs)
        sync()
    return (time.perf_counter() - start) / len(batches) * 1000


def kernel_census(module, batches, optimizer, steps: int = 3) -> None:
    """Kernels of ``steps`` eager steps (the same kernels a graph replays), per step: count and GPU time by family
    and the 12 busiest kernels (grouped as ``scripts/bench_census.py`` groups them)."""
    from bench_census import print_kernels, profile_kernels  # this script's folder is on sys.path

    params = [p for p in module.parameters() if p.requires_grad]
    batch_iter = iter(batches[:steps])
    by_name, family = profile_kernels(
        lambda: step(module, next(batch_iter), params, optimizer, graphs=False, census=True), steps)
    total_n, total_us = sum(v[0] for v in family.values()), sum(v[1] for v in family.values())
    print(f"  kernels per step: {total_n / steps:.0f}, GPU busy {total_us / steps / 1000:.1f} ms/step "
          f"(mean {total_us / max(total_n, 1):.1f} us a kernel)")
    print_kernels(by_name, family, steps, top=12)


def main():
    chats = [[{"role": "user", "content": f"What is {e}?"}] for e in "🐼🇺🇸🎂🤌👋🏽🦩🧑‍🚀"] + [[{"role": "user", "content": "Hi"}]]
    for once in [v == "true" for v in os.environ.get("DEQUANTIZE_ONCE", "false,true").split(",")]:
        cli = LabCLI(QLoRAModule, ChatDataModule,
                     args=[*sys.argv[1:], "--model.speed.dequantize_once", str(once).lower()], run=False)
        data, module = cli.datamodule, cli.model
        data.setup("fit")
        sync()
        start = time.perf_counter()
        module.configure_model()
        sync()
        print(f"dequantize_once={once}: model load {time.perf_counter() - start:.2f} s", flush=True)
        optimizer = module.configure_optimizers()
        loader = iter(data.train_dataloader())
        start = time.perf_counter()
        # as Lightning gives them: with num_labelled and max_documents (varlen's offsets need it; without it the
        # step would take the mask)
        cpu_batches = [data.on_before_batch_transfer(next(loader), 0) for _ in range(60)]
        print(f"  plan: {module.plan.summary()}")
        print(f"  collate: {(time.perf_counter() - start) / 60 * 1000:.1f} ms/batch", flush=True)
        batches = [to_device(b) for b in cpu_batches]
        for graphs in (False, True, True) if module.plan.cuda_graphs else (False,):
            print(f"  {'graphs' if graphs else 'eager '}: {ms_per_step(module, batches, optimizer, graphs):.1f} ms/step "
                  f"(no per-step sync; loss, backward, clip, fused AdamW)", flush=True)
        if module.plan.cuda_graphs:
            print(f"  graphs captured: {len(module._graphed.graphs)}, eager fallbacks: {module._graphed.eager_calls}")
        kernel_census(module, batches, optimizer)
        val = [to_device(b) for b in data.val_dataloader()]
        for _ in range(2):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                module.model.eval()
                for batch in val:
                    label_loss(module.model, module.eval_inputs(batch))
                module.model.train()
            sync()
            print(f"  validation ({len(val)} batches): {time.perf_counter() - start:.3f} s", flush=True)
        for _ in range(2):
            sync()
            start = time.perf_counter()
            answers = generate(module.model, module.tokenizer, chats, max_new_tokens=24)
            sync()
            print(f"  generate {len(chats)} chats x 24 tokens: {time.perf_counter() - start:.2f} s "
                  f"({max(len(a.token_ids) for a in answers)} tokens)", flush=True)
        del module, optimizer, batches, cli
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
