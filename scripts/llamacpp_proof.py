"""The GGUF writer proven in llama.cpp: a model is written to GGUF by our writer, loaded by llama.cpp (llama-cpp-python),
and compared with transformers: the pre-tokenizer llama.cpp picked, tokenization of a set of texts, and the logits of
chat prompts (float32 transformers vs each GGUF type in llama.cpp). Prints a Markdown table (docs/export.md).

    python scripts/llamacpp_proof.py --model tiny --types f16,q8_0,q4_0      # random Llama 3, real 3.2 tokenizer
    python scripts/llamacpp_proof.py --model 1b --types f16,q8_0              # Llama-3.2-1B shape, random weights
    python scripts/llamacpp_proof.py --model smollm2-135m --types f16,q8_0    # the real SmolLM2 weights

Needs llama-cpp-python (``make test-llamacpp`` builds it). The 1B run needs ~12 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lit_llama_lab.export import FIDELITY_PROMPTS
from lit_llama_lab.gguf_tokenizer import pre_tokenizer_name
from lit_llama_lab.gguf_writer import write_gguf
from lit_llama_lab.llamacpp import LlamaCppModel
from lit_llama_lab.models import fix_special_tokens, load_base_model

TEXTS = ["Hello world", "  two spaces\n\n\ttab and newlines  ", "naïve café 🐍🎉🇺🇸 123456 3.14159",
         "I've 'RE you'll DON'T", "我想在apple工作1314151天～", "------======= нещо на Български",
         "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>", "<|im_start|>user\nhi<|im_end|>",
         "def f(x):\n    return x ** 2  # square", "https://example.org/a?b=c&d=e"]
PROMPTS = (*FIDELITY_PROMPTS, "Translate to French: the cat sleeps on the warm windowsill.",
           "List three prime numbers greater than 100.")


def load(name: str):
    """(float32 model, tokenizer) for ``tiny``/``1b`` (random Llama 3) or a base model name."""
    if name in ("tiny", "1b"):
        from lit_llama_lab.random_llama3 import random_llama3

        model, tokenizer = random_llama3(name)
    else:
        model, tokenizer = load_base_model(name, quantize="none", compute_dtype=torch.float32, device="cpu")
    fix_special_tokens(tokenizer, model)
    return model.eval(), tokenizer


@torch.no_grad()
def measure(runtime: LlamaCppModel, model, tokenizer, reference: dict) -> dict:
    """Tokenization matches and logit gaps of one GGUF in llama.cpp against transformers' float32 logits."""
    same = sum(runtime.tokenize(t) == tokenizer(t).input_ids for t in TEXTS)
    gaps, agree = [], []
    for ids, logits in reference.values():
        ours = runtime.logits(ids)
        gaps.append(np.abs(ours - logits))
        agree.append(ours.argmax(-1) == logits.argmax(-1))
    gap = np.concatenate([g.ravel() for g in gaps])
    return {"pre": runtime.pre_tokenizer, "tokenized_equal": f"{same}/{len(TEXTS)}", "max_abs": float(gap.max()),
            "mean_abs": float(gap.mean()), "top1": float(np.concatenate(agree).mean()),
            "logit_scale": float(max(np.abs(v[1]).max() for v in reference.values()))}


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, 1b, or a base model name (smollm2-135m)")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model, tokenizer = load(args.model)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    reference = {}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        reference[prompt] = (ids, model(torch.tensor([ids])).logits[0].float().numpy())
    state, pre, rows = model.state_dict(), pre_tokenizer_name(tokenizer), []
    with tempfile.TemporaryDirectory() as folder:
        for qtype in args.types.split(","):
            start = time.perf_counter()
            path = write_gguf(Path(folder) / f"{qtype}.gguf", state, model.config, tokenizer, qtype, args.model, pre)
            written = time.perf_counter() - start
            runtime = LlamaCppModel(path, n_ctx=256)
            rows.append({"model": args.model, "type": qtype, "MB": round(path.stat().st_size / 1e6, 1),
                         "write_s": round(written, 1), **measure(runtime, model, tokenizer, reference)})
            runtime.close()
            path.unlink()
            print(json.dumps(rows[-1]), file=sys.stderr)
    print("| model | type | size (MB) | write (s) | pre-tokenizer | texts tokenized as transformers | max \\|Δlogit\\| "
          "| mean \\|Δlogit\\| | top-1 agreement | largest \\|logit\\| |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['MB']} | {r['write_s']} | {r['pre']} | {r['tokenized_equal']} | "
              f"{r['max_abs']:.4f} | {r['mean_abs']:.5f} | {100 * r['top1']:.1f}% | {r['logit_scale']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
