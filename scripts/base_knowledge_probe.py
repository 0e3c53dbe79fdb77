"""Does the base model already know the held-out emoji's names? Few-shot completion, no chat template, greedy, on
the emoji config's test split (seed 42, 20% test): the non-flag, non-skin-tone emoji (what the fine-tune cannot
work out from trained parts) and the two-letter flags by their letters.

    OMP_NUM_THREADS=2 python scripts/base_knowledge_probe.py   # about a minute on a CPU
"""

import torch

from lit_llama_lab.data.splits import split_indices
from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.tasks.emoji.rows import build_emoji_rows, flag_letters

EMOJI_SHOTS = "🐼 is the panda emoji.\n🎂 is the birthday cake emoji.\n🚀 is the rocket emoji.\n😀 is the grinning face emoji.\n"
CODE_SHOTS = ("Country code: FR means France\nCountry code: DE means Germany\nCountry code: JP means Japan\n"
              "Country code: KE means Kenya\n")


def complete(model, tok, prompts: list[str], new_tokens: int = 8) -> list[str]:
    tok.padding_side = "left"
    out = []
    for start in range(0, len(prompts), 32):
        batch = tok(prompts[start:start + 32], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0] for row in ids]
    return out


def main():
    model, tok = load_base_model("smollm2-135m", quantize="none", compute_dtype=torch.float32, device="cpu")
    rows = build_emoji_rows()
    test = [rows[i] for i in split_indices(len(rows), 0.2, 0.02, 42)["test"]]
    flags = [r for r in test if flag_letters(r["character"])]
    others = [r for r in test if not r["short description"].startswith("flag:") and "skin tone" not in r["short description"]]
    answers = complete(model, tok, [f"{EMOJI_SHOTS}{r['character']} is the" for r in others])
    named = sum(r["short description"].lower() in a.lower() for r, a in zip(others, answers, strict=True))
    print(f"emoji (not flags, not skin tones): {named} of {len(others)} named; e.g. "
          + "; ".join(f"{r['character']} -> {a.strip()}" for r, a in list(zip(others, answers, strict=True))[:4]))
    answers = complete(model, tok, [f"{CODE_SHOTS}Country code: {flag_letters(r['character'])} means" for r in flags])
    named = sum(r["short description"][len("flag: "):].lower() in a.lower() for r, a in zip(flags, answers, strict=True))
    print(f"two-letter flags by their letters: {named} of {len(flags)} named; e.g. "
          + "; ".join(f"{flag_letters(r['character'])} -> {a.strip()}" for r, a in list(zip(flags, answers, strict=True))[:4]))


if __name__ == "__main__":
    main()
