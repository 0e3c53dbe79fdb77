"""Data benchmark: packed vs padded batches of the FineTome sample, in one run.

``python -m lit_llama_lab.tools.bench_data [--model tiny-random|smollm2-135m] [--epochs 1]`` prints a table of
padding efficiency (share of token slots holding a real token), training tokens/s (real tokens, forward + backward
+ AdamW step on a 4-bit base with LoRA adapters) and the epoch time of ``configs/finetome-tuned.yaml`` vs
``configs/finetome.yaml`` (each config's batch size, packing and LoRA rank), beside the seed's 23 h → 11 h.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.data.packing import padding_efficiency
from lit_llama_lab.train.args import LoraArgs, PrecisionArgs, SpeedArgs

SAMPLE = Path(__file__).parents[1] / "data" / "samples" / "finetome_sample.jsonl"
SEED_SPEEDUP = 23 / 11  # the seed's FineTome epoch, plain run vs tuned run
# (name, data settings, LoRA settings) as in configs/finetome.yaml and configs/finetome-tuned.yaml
RUNS = (
    ("finetome (padded)", {"packing": False, "batch_size": 8}, LoraArgs(r=16, alpha=16, use_rslora=False)),
    ("finetome-tuned (packed)", {"packing": True, "batch_size": 16}, LoraArgs(r=8, alpha=16, use_rslora=True)),
)


@dataclass
class Result:
    """One configuration's measurements over the sample's training split."""

    name: str
    batches: int
    efficiency: float  # real tokens / token slots
    real_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds


def batches_of(source: str, model: str, max_seq_length: int, **data) -> list[dict]:
    """Every training batch of one epoch of ``source`` (seeded order)."""
    dm = ChatDataModule(source=source, tokenizer=model, max_seq_length=max_seq_length, test_fraction=0.0,
                        val_fraction=0.0, **data)
    dm.setup()
    return [dm.on_before_batch_transfer(batch, 0) for batch in dm.train_dataloader()]  # as training gets them


def train_epoch(model_name: str, lora: LoraArgs, batches: list[dict], epochs: int) -> float:
    """Seconds to train ``epochs`` passes over ``batches`` (after one warm-up step that is not timed), with
    training's plan, setup and step (:mod:`lit_llama_lab.train`)."""
    from lit_llama_lab.train.build import build, plan_for
    from lit_llama_lab.train.step import TrainStep

    plan = plan_for(model_name, "nf4", PrecisionArgs(), SpeedArgs(), lora)
    model, tokenizer = build(model_name, "nf4", lora, plan, seed=0)
    loss = TrainStep(model, plan, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in batches:
            step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: str, source: str, max_seq_length: int, epochs: int) -> list[Result]:
    """Efficiency and training time of each of :data:`RUNS` on the same data and model."""
    results = []
    for name, data, lora in RUNS:
        batches = batches_of(source, model, max_seq_length, **data)
        slots = sum(b["input_ids"].numel() for b in batches)
        real = sum(round(padding_efficiency(b) * b["input_ids"].numel()) for b in batches)
        seconds = train_epoch(model, lora, batches, epochs)
        results.append(Result(name, len(batches), real / slots, real * epochs, seconds))
    return results


def table(results: list[Result], model: str) -> str:
    """A Markdown table of the results with the ratios and the seed's figure."""
    plain, tuned = results
    lines = [
        f"Data benchmark on {SAMPLE.name} ({model}, {'GPU' if torch.cuda.is_available() else 'CPU'})",
        "",
        "| run | batches/epoch | non-pad share | real tokens/s | epoch s |",
        "|---|---|---|---|---|",
        *(f"| {r.name} | {r.batches} | {r.efficiency:.1%} | {r.tokens_per_second:,.0f} | {r.seconds:.2f} |"
          for r in results),
        "",
        f"packed/padded tokens/s: {tuned.tokens_per_second / plain.tokens_per_second:.2f}x; "
        f"epoch time finetome / finetome-tuned: {plain.seconds / tuned.seconds:.2f}x "
        f"(seed: 23 h / 11 h = {SEED_SPEEDUP:.2f}x)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (``make bench-data``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random", help="tiny-random (seconds) or smollm2-135m")
    parser.add_argument("--source", default=str(SAMPLE), help="chat data (default: the bundled FineTome sample)")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    print(table(measure(args.model, args.source, args.max_seq_length, args.epochs), args.model))


if __name__ == "__main__":
    main()
