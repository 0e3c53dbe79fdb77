"""One emoji experiment in one process: train with LightningCLI arguments, then measure name accuracy.

    python scripts/emoji_experiment.py OUT.json fit --config configs/emoji.yaml [overrides...]

Used for GPU sweeps; `lit-llama-lab evaluate` is the tool for reports.
"""

import json
import sys
import time

import torch

from lit_llama_lab.cli import LabCLI
from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.data.emoji import HELDOUT_WORDINGS, TRAIN_WORDINGS
from lit_llama_lab.generation import generate
from lit_llama_lab.module import QLoRAModule


def accuracy(model, tok, rows, wordings, batch_size=128):
    chats = [[{"role": "user", "content": wordings[i % len(wordings)].format(e=r["character"])}] for i, r in enumerate(rows)]
    answers = generate(model, tok, chats, max_new_tokens=40, batch_size=batch_size)
    hits = [r["short description"].lower() in a.text.lower() for r, a in zip(rows, answers)]
    shown = {r["character"]: a.text for r, a in zip(rows, answers) if r["character"] in "🐼🇺🇸🎂🤌"}
    return {"n": len(rows), "name_acc": sum(hits) / len(rows), "eos": sum(a.stopped for a in answers) / len(rows),
            "mean_tokens": sum(len(a.token_ids) for a in answers) / len(rows), "examples": shown}


def main():
    out, args = sys.argv[1], sys.argv[2:]
    cli = LabCLI(QLoRAModule, ChatDataModule, args=args[1:], run=False)
    data, module = cli.datamodule, cli.model
    data.setup("fit")
    epoch_tokens = sum(len(e["input_ids"]) for e in data.splits["train"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli.trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    tokens = epoch_tokens * max(1, cli.trainer.current_epoch)
    result = {"args": args, "epochs": cli.trainer.current_epoch, "steps": cli.trainer.global_step, "train_seconds": seconds, "train_tokens": tokens, "tokens_per_s": tokens / seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
              "val_loss": float(cli.trainer.callback_metrics.get("val_loss", float("nan")))}
    model, tok = module.model, module.tokenizer
    limit = int(__import__("os").environ.get("EVAL_LIMIT", "100000"))
    train, test = (list(data.rows[s])[:limit] for s in ("train", "test"))
    result["train"] = accuracy(model, tok, train, TRAIN_WORDINGS[:1])
    result["test"] = accuracy(model, tok, test, TRAIN_WORDINGS[:1])
    result["train_heldout_wording"] = accuracy(model, tok, train, HELDOUT_WORDINGS)
    print(json.dumps(result, ensure_ascii=False, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
