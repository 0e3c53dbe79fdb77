"""Answer the general-ability suite with a model (the base, or an adapter folder) and score it: accuracy overall and
per category, and template leakage. Greedy through the shared generate(), batches of 16 in file order.

    OMP_NUM_THREADS=2 python scripts/general_suite_probe.py --out base_general.jsonl     # smollm2-135m on the CPU
    python scripts/general_suite_probe.py --rescore base_general.jsonl                  # saved answers, current checks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lit_llama_lab.tasks.general import general_records, load_suite, score_general


def answer(rows: list[dict], model_name: str, device: str, max_new_tokens: int) -> list[str]:
    """The model's greedy answers to the suite's prompts, printing progress per batch of 16."""
    from lit_llama_lab.generation import generate
    from lit_llama_lab.model.load import load_for_inference

    model, tokenizer = load_for_inference(model_name, device=device)
    chats = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    answers: list[str] = []
    start = time.time()
    for first in range(0, len(chats), 16):
        answers += [g.text for g in generate(model, tokenizer, chats[first:first + 16], max_new_tokens, batch_size=16)]
        print(f"{len(answers)}/{len(chats)} answered, {time.time() - start:.0f} s", flush=True)
    return answers


def table(metrics: dict) -> str:
    """A markdown table of the scores: overall, leakage, then each category."""
    lines = ["| | accuracy |", "|---|---|", f"| **overall** ({metrics['answers']} items) | {metrics['accuracy']:.1%} |",
             f"| leakage (mentions emoji) | {metrics['leakage']:.1%} |"]
    lines += [f"| {key.split('/', 1)[1]} | {value:.1%} |" for key, value in metrics.items() if key.startswith("accuracy/")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model name/path or adapter folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, help="write the records (answers, correct, leaks) here as JSON lines")
    parser.add_argument("--rescore", type=Path, help="score the answers in this records file instead of generating")
    args = parser.parse_args()
    rows = load_suite()
    if args.rescore:
        saved = {r["id"]: r["answer"] for r in map(json.loads, args.rescore.read_text().splitlines())}
        answers = [saved[row["id"]] for row in rows]
    else:
        answers = answer(rows, args.model, args.device, args.max_new_tokens)
    records = general_records(rows, answers)
    if args.out:
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(table(score_general(records)))


if __name__ == "__main__":
    main()
