"""What the KL term costs a training step, and what computing its targets once saves: the emoji config's step
(SmolLM2-135M in 4-bit, rsLoRA r32, 32 emoji chats packed, a fifth of them flagged as replay chats) timed three ways
in one process: no KL, KL with the base run in the step, KL with cached targets (TeacherCache).

    python scripts/kl_step_cost.py [STEPS]    # on this machine's device; prints seconds per step and the ratios

The replay chats here are emoji chats flagged as replay (the step's cost depends on shapes, not on which chats).
"""

from __future__ import annotations

import sys
import time

import torch

from lit_llama_lab.data.packing import collate_packed
from lit_llama_lab.train.args import LoraArgs
from lit_llama_lab.train.module import QLoRAModule
from lit_llama_lab.train.step import TrainStep


def emoji_examples(tokenizer, n: int) -> list[dict]:
    from lit_llama_lab.data.masking import assistant_labels
    from lit_llama_lab.tasks.emoji.rows import build_emoji_rows, emoji_messages

    rows = build_emoji_rows()[:n]
    out = []
    for i, row in enumerate(rows):
        chat = assistant_labels(tokenizer, emoji_messages(row))
        replay = i % 5 == 0
        out.append({"input_ids": chat.input_ids, "labels": chat.labels, "distill": int(replay),
                    "replay_id": i // 5 if replay else -1})
    return out


def main(steps: int = 3) -> None:
    module = QLoRAModule(name_or_path="smollm2-135m", lora=LoraArgs(r=32, alpha=32, use_rslora=True),
                         distill_weight=3.0)
    module.configure_model()
    tok = module.tokenizer
    examples = emoji_examples(tok, 32)
    from lit_llama_lab.data.packing import pack_balanced

    bins = pack_balanced([len(e["input_ids"]) for e in examples], 512)
    batch = collate_packed([[examples[i] for i in b] for b in bins], tok.pad_token_id)
    batch["max_documents"] = len(examples)
    device = next(module.model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    replay = [e["input_ids"] for e in examples if e["distill"]]
    optimizer = module.configure_optimizers()
    ways = {"no KL": TrainStep(module.model, module.plan, tok.pad_token_id, 0.0),
            "KL, base run in the step": TrainStep(module.model, module.plan, tok.pad_token_id, 3.0),
            "KL, targets computed once": TrainStep(module.model, module.plan, tok.pad_token_id, 3.0)}
    start = time.perf_counter()
    ways["KL, targets computed once"].cache_teacher(replay)
    print(f"cache of {len(replay)} replay chats: {time.perf_counter() - start:.2f} s")
    seconds = {}
    for name, step in ways.items():
        for i in range(steps + 1):  # the first step is a warm-up
            if i == 1:
                start = time.perf_counter()
            step(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - start) / steps
    base = seconds["no KL"]
    print(f"device {device}, {torch.get_num_threads()} threads, batch of {len(examples)} chats in "
          f"{batch['input_ids'].shape[0]} rows of {batch['input_ids'].shape[1]} tokens, {steps} timed steps each")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} s/step | {s / base:.2f}x no KL |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
