"""The CPU recipe's training step with and without --data.share_prefix, on the same batches: tokens per step and
seconds per step (forward + backward of TrainStep, the KL targets cached as a fit caches them), and the loss of each
batch both ways. Usage: python scripts/cpu_share_prefix_probe.py [STEPS] [CONFIG]."""

from __future__ import annotations

import sys
import time

import torch
import yaml

from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.data.replay import ReplayArgs
from lit_llama_lab.train.args import LoraArgs
from lit_llama_lab.train.module import QLoRAModule


def main(steps: int = 6, config_path: str = "configs/emoji-cpu.yaml") -> None:
    config = yaml.safe_load(open(config_path))
    base = config["model"]["name_or_path"]
    model_args = {k: v for k, v in config["model"].items() if k not in ("lora", "name_or_path")}
    module = QLoRAModule(name_or_path=base, lora=LoraArgs(**config["model"]["lora"]), **model_args)
    module.configure_model()
    data_args = {k: v for k, v in config["data"].items() if k not in ("replay", "share_prefix")}
    batches = {}
    for share in (False, True):
        data = ChatDataModule(**data_args, tokenizer=base, share_prefix=share,
                              replay=ReplayArgs(**config["data"].get("replay", {}), model=base))
        data.prepare_data()
        data.setup()
        loader = iter(data.train_dataloader())
        batches[share] = [data.on_before_batch_transfer(next(loader), 0) for _ in range(steps)]
    module.step.cache_teacher(data.replay_examples())
    print(f"{'share_prefix':>12} {'tokens/step':>11} {'s/step':>7} {'loss (mean)':>11}")
    times = {}
    for share in (False, True):
        torch.manual_seed(0)
        seconds, losses, tokens = [], [], []
        for batch in batches[share]:
            start = time.perf_counter()
            loss = module.step(batch)
            loss.backward()
            seconds.append(time.perf_counter() - start)
            module.model.zero_grad(set_to_none=True)
            losses.append(float(loss))
            tokens.append(int((batch["document_ids"] >= 0).sum()))
        times[share] = sum(seconds[1:]) / max(len(seconds) - 1, 1)  # the first step warms up
        print(f"{share!s:>12} {sum(tokens) / len(tokens):>11.0f} {times[share]:>7.2f} {sum(losses) / len(losses):>11.5f}")
    print(f"shared / plain seconds per step: {times[True] / times[False]:.2f}")


if __name__ == "__main__":
    main(*(int(a) if a.isdigit() else a for a in sys.argv[1:]))
