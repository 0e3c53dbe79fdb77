"""``lit-llama-lab bench``: our QLoRA training step against the plain transformers + peft + bitsandbytes stack, on the
same 4-bit model and data, in one process: tokens/s, peak GPU memory, MFU, and the loss after the same steps on
real data (emoji chats) to show the math is unchanged.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.fast import Attention, attention_inputs, fast_label_loss, fast_peft_model
from lit_llama_lab.graphs import GraphedLoss
from lit_llama_lab.models import (
    cache_dir,
    converted_folder,
    load_base_model,
    load_tokenizer,
    resolve_compute_dtype,
    resolve_model_source,
)
from lit_llama_lab.module import LoraArgs, label_loss

Shape = Literal["auto", "llama-3.2-1b", "smollm2-135m", "tiny"]
LLAMA_32_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                   max_position_embeddings=8192, rms_norm_eps=1e-5)
GPU_PATHS = "baseline,baseline+amp,ours+graphs+compile,ours+varlen+compile+graphs"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 spec sheets


def shape_model(shape: Shape, tokenizer: str = "smollm2-135m") -> str:
    """A name :func:`load_base_model` accepts for ``shape``; the random 1B model is written once to the cache, with
    ``tokenizer``'s tokenizer (any will do: the speed batch draws random token ids from the model's vocabulary)."""
    if shape == "tiny":
        return "tiny-random"
    if shape == "smollm2-135m":
        return "smollm2-135m"
    if shape != "llama-3.2-1b":
        raise ValueError(f"Unknown shape {shape!r}; use llama-3.2-1b, smollm2-135m or tiny.")
    target = cache_dir() / "bench" / "llama-3.2-1b-random"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)
    if not target.exists():  # else another process finished first
        os.replace(tmp, target)
    return str(target)


def model_vocab(name: str) -> int:
    """The vocabulary size of a model :func:`load_base_model` accepts (read from its converted config)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(converted_folder(resolve_model_source(name))).vocab_size


def synthetic_batch(vocab: int, micro_batch: int, seq_len: int, doc_len: int, device: torch.device) -> dict:
    """Random tokens, every position labelled, documents of ``doc_len`` tokens packed into each row."""
    from lit_llama_lab.data.packing import block_causal_mask

    if seq_len % doc_len:
        raise ValueError(f"seq_len {seq_len} must be a multiple of doc_len {doc_len}.")
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": (torch.arange(seq_len) % doc_len).expand(micro_batch, -1).contiguous(),
             "attention_mask": block_causal_mask([[doc_len] * (seq_len // doc_len)] * micro_batch, seq_len)}
    return {k: v.to(device) for k, v in batch.items()}


def emoji_batches(model_name: str, steps: int, device: torch.device, per_batch: int = 32) -> tuple[list[dict], dict]:
    """``steps`` packed batches of ``per_batch`` emoji chats from the seeded train split (shuffled, cycled) and
    one held-out batch from the test split. Only the rows used are tokenized."""
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
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    batches = [data.collate(train[i:i + per_batch]) for i in range(0, len(train), per_batch)]
    return [move(b) for b in batches], move(held_out)


def build_baseline(name: str, rank: int, checkpointing: bool, device: torch.device, seed: int, **_) -> tuple:
    """The plain stack: 4-bit base, ``prepare_model_for_kbit_training`` (fp32 upcast), peft LoRA, HF's full loss.

    Run without autocast it is the issue's recipe as written; ``baseline+amp`` adds bf16 autocast, as Hugging Face's
    Trainer does with ``bf16=True``."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    torch.set_float32_matmul_precision("highest")  # the plain stack as it comes (ours turns TF32 on, as training)

    base, _ = load_base_model(name, "nf4", resolve_compute_dtype("auto"), device, "sdpa")
    base.config.use_cache = False
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraArgs(r=rank, alpha=rank).peft_config())

    def loss_fn(batch: dict) -> torch.Tensor:  # HF packs by restarting position_ids; it builds its own mask
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss

    return model, loss_fn, lambda batch: batch


def build_ours(name: str, rank: int, checkpointing: bool, device: torch.device, seed: int, attention: Attention = "sdpa",
               compile: bool = False, liger: bool = False, chunked_ce: bool = True, graphs: bool = False,
               fp32_activations: bool = True, ce_chunk: int = 0) -> tuple:
    """Our path: no fp32 weight upcast (hidden states between matmuls in fp32 unless ``fp32_activations`` is off),
    chunked loss (``ce_chunk`` rows a chunk, 0: auto), our packing mask or flex/varlen attention; ``graphs``: the forward
    and backward replayed from CUDA graphs (rows padded to multiples of 128 tokens), as training does on a GPU."""
    base, tokenizer = load_base_model(name, "nf4", resolve_compute_dtype("auto"), device, "sdpa")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 adapter matmuls, as QLoRAModule(tf32=True)
    torch.manual_seed(seed)
    model = fast_peft_model(base, LoraArgs(r=rank, alpha=rank).peft_config(), checkpointing, attention, compile, liger,
                            preserve_rng_state=not graphs,  # no dropout here: nothing random to replay
                            fp32_activations=fp32_activations)
    chunked = partial(fast_label_loss, chunk=ce_chunk)
    if graphs and device.type == "cuda":
        graphed = GraphedLoss(model, chunked)
        # padded first, as training pads before it builds varlen's offsets (padding: one segment a row)
        return model, graphed, lambda b: attention_inputs(pad_packed_batch(b, 128, tokenizer.pad_token_id), attention)
    loss = (lambda batch: chunked(model, batch)) if chunked_ce else (lambda b: label_loss(model, b)[0])
    return model, loss, lambda batch: attention_inputs(batch, attention)


def train_steps(model, loss_fn: Callable, batches: list[dict], device: torch.device, amp: bool = True) -> list[float]:
    """One AdamW step (lr 2e-4, fused on GPU) per batch, under bf16 autocast on GPU when ``amp`` (without its weight
    cache, which CUDA graphs cannot hold). Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = getattr(model, "_bench_optimizer", None) or torch.optim.AdamW(params, lr=2e-4,
                                                                              fused=device.type == "cuda")
    model._bench_optimizer = optimizer
    model.train()
    losses = []
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda",
                            cache_enabled=not isinstance(loss_fn, GraphedLoss)):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(x) for x in losses]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


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


def path_options(path: str, defaults: dict) -> tuple[Callable, dict]:
    """``baseline`` (``+amp``) or ``ours`` plus ``+modifiers`` (sdpa, flex, varlen, compile, liger, graphs, fullce,
    bf16act: hidden states in bf16) -> builder, options. ``amp`` (bf16 autocast on a GPU) is on for ``ours`` and
    off for ``baseline``, the issue's recipe as written."""
    name, *mods = path.strip().split("+")
    if name == "baseline" and mods in ([], ["amp"]):
        return build_baseline, {"amp": mods == ["amp"]}
    if name != "ours":
        raise ValueError(f"Unknown path {path!r}: use baseline, baseline+amp, ours, or ours+modifiers like "
                         "ours+compile+flex.")
    options = {"amp": True, **defaults}
    for mod in mods:
        if mod in ("sdpa", "flex", "varlen"):
            options["attention"] = mod
        elif mod in ("compile", "liger", "graphs"):
            options[mod] = True
        elif mod == "fullce":
            options["chunked_ce"] = False
        elif mod == "bf16act":
            options["fp32_activations"] = False
        else:
            raise ValueError(f"Unknown modifier {mod!r} in {path!r}: use sdpa, flex, varlen, compile, liger, graphs, "
                             "fullce, bf16act.")
    return build_ours, options


def split_amp(options: dict) -> tuple[bool, dict]:
    """``(autocast on?, the rest of the options)``: autocast is the training loop's, the rest go to the builder."""
    return options.get("amp", True), {k: v for k, v in options.items() if k != "amp"}


def measure_speed(builder: Callable, options: dict, setup: dict, batch: dict, steps: int, warmup: int) -> dict:
    """Warm-up steps, then ``steps`` timed steps on one batch: tokens/s, seconds/step, peak GPU memory, MFU."""
    device = setup["device"]
    _free(device)
    amp, options = split_amp(options)
    model, loss_fn, prepare = builder(setup["name"], setup["rank"], setup["checkpointing"], device, setup["seed"],
                                      **options)
    prepared = prepare(batch)
    train_steps(model, loss_fn, [prepared] * warmup, device, amp)
    _sync(device)
    warm_peak = None
    if device.type == "cuda":  # warm-up holds compilation and graph capture: the timed steps' own peak is kept apart
        warm_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = train_steps(model, loss_fn, [prepared] * steps, device, amp)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch["input_ids"].numel()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = step_flops(model.get_base_model().config, tokens, setup["doc_len"], lora)
    result = {"tokens_per_s": tokens / seconds, "step_s": seconds, "last_step_loss": losses[-1],
              # peak_gib: the whole run's peak. steady_peak_gib: the timed steps' alone; for graphed paths it
              # misses the graph's private pool (replays allocate nothing), so it is only meaningful without graphs
              "peak_gib": max(warm_peak, torch.cuda.max_memory_allocated() / 2**30) if warm_peak is not None else None,
              "steady_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "tflops_per_s": flops / seconds / 1e12, "flops_per_step": flops, "trainable_params": lora}
    if setup["peak_tflops"]:
        result["mfu"] = result["tflops_per_s"] / setup["peak_tflops"]
    del model, loss_fn
    _free(device)
    return result


def measure_loss(builder: Callable, options: dict, setup: dict, batches: list[dict], held_out: dict) -> dict:
    """Train a fresh model on real batches, then the loss on a held-out batch (the path's own loss function)."""
    device = setup["device"]
    amp, options = split_amp(options)
    model, loss_fn, prepare = builder(setup["loss_model"], setup["rank"], setup["checkpointing"], device,
                                      setup["seed"], **options)
    losses = train_steps(model, loss_fn, [prepare(b) for b in batches], device, amp)
    model.eval()
    held_fn = loss_fn.eager if isinstance(loss_fn, GraphedLoss) else loss_fn
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        held = float(held_fn(prepare(held_out)))
    del model, loss_fn
    _free(device)
    return {"held_out_loss": held, "train_loss_first": losses[0], "train_loss_last": losses[-1]}


def format_table(results: dict) -> str:
    """A Markdown table of the measured paths, ratios and loss differences against ``baseline``."""
    base = results["paths"].get("baseline", {})
    amp = results["paths"].get("baseline+amp", {})
    rows = ["| path | tokens/s | × baseline | × baseline+amp | peak GiB | timed-steps peak GiB | TFLOP/s | MFU | held-out loss "
            "| Δ loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for path, r in results["paths"].items():
        if "error" in r:
            rows.append(f"| {path} | failed: {r['error'][:80]} |||||||||")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else None
        amp_ratio = r["tokens_per_s"] / amp["tokens_per_s"] if "tokens_per_s" in amp else None
        loss, base_loss = r.get("held_out_loss"), base.get("held_out_loss")
        delta = (loss - base_loss) / abs(base_loss) if loss is not None and base_loss else None
        rows.append(f"| {path} | {r['tokens_per_s']:,.0f} | {fmt(ratio, '.2f')} | {fmt(amp_ratio, '.2f')} | "
                    f"{fmt(r['peak_gib'], '.2f')} | {fmt(r.get('steady_peak_gib'), '.2f')} | "
                    f"{r['tflops_per_s']:.1f} | {fmt(r.get('mfu'), '.1%')} | {fmt(loss, '.4f')} | {fmt(delta, '+.3%')} |")
    return "\n".join(rows)


def write_json(data: dict, output: str) -> None:
    """Write ``data`` to ``output`` atomically (temporary file, then rename)."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=2)
    os.replace(tmp.name, path)


def bench(
    shape: Shape = "auto",
    seq_len: int = 2048,
    micro_batch: int = 4,
    rank: int = 16,
    steps: int = 20,
    warmup: int = 3,
    doc_len: int = 512,
    gradient_checkpointing: bool = True,
    device: str = "auto",
    paths: str = "auto",
    loss_steps: int = 50,
    real_data: bool = True,
    loss_model: str = "auto",
    loss_batch: int = 32,
    attention: Attention = "sdpa",
    compile: bool = False,
    liger: bool = False,
    chunked_ce: bool = True,
    graphs: bool = False,
    fp32_activations: bool = True,
    ce_chunk: int = 0,
    peak_tflops: float = 0.0,
    seed: int = 0,
    isolate: bool | None = None,
    output: str | None = None,
) -> dict:
    """Benchmark QLoRA training steps: the plain transformers+peft+bitsandbytes stack against ours, in one process.

    Args:
        shape: model shape with random (1B) or real weights: llama-3.2-1b, smollm2-135m, or tiny (CPU tests);
            ``auto``: llama-3.2-1b on a GPU, tiny on a CPU (a 1B step in fp32 on a CPU takes minutes).
        seq_len: tokens per row of the speed batch.
        micro_batch: rows per step.
        rank: LoRA rank (alpha = rank) on all seven projections.
        steps: timed steps after ``warmup`` untimed ones.
        warmup: untimed steps first (compilation, allocator warm-up).
        doc_len: length of the packed documents in the speed batch (position_ids restart every doc_len tokens).
        gradient_checkpointing: recompute activations in backward (both paths).
        device: ``auto`` (CUDA when present), ``cuda`` or ``cpu``. bf16 compute on GPU, fp32 on CPU.
        paths: comma-separated: baseline (the issue's recipe: no autocast), baseline+amp (bf16 autocast), ours, or
            ours+modifiers (sdpa|flex|varlen, compile, liger, graphs, fullce, bf16act). ``auto``: on a GPU
            baseline, baseline+amp, ours+graphs+compile (the sdpa mask, training's previous default) and
            ours+varlen+compile+graphs (what training runs for a 1B model on a GPU); on a CPU baseline and ours.
        loss_steps: steps on real emoji chats before the held-out loss is compared (0 or real_data=False: skip).
        loss_model: model for the loss check; ``auto``: tiny-random for the tiny shape, else smollm2-135m.
        loss_batch: emoji chats per real-data step (packed into rows of 512 tokens).
        attention: our attention for packed rows: sdpa (our 4-D mask), flex (BlockMask) or varlen (FlashAttention).
        compile: torch.compile our decoder layers.
        liger: Liger-Kernel RMSNorm/RoPE/SwiGLU in our path (needs liger-kernel and a GPU).
        chunked_ce: our chunked linear cross-entropy; false uses module.label_loss (fp32 logits at labels).
        graphs: replay our forward and backward from CUDA graphs (GPU only), as training does.
        fp32_activations: our hidden states between matmuls in fp32 (matmuls stay bf16), as training does;
            ``+bf16act`` turns it off.
        ce_chunk: rows per chunk of our cross-entropy (0: about 2**25 logits a chunk).
        peak_tflops: the device's bf16 peak for MFU; 0 guesses from the GPU name (H100/H200: 989), none on CPU.
        seed: seeds the adapter initialisation (the same for every path).
        isolate: run each path in its own Python process (this command spawns them), so no path inherits another's
            compiled code, CUDA graph pools or allocator state: measured in one process, the fourth path's peak read
            0.23 GiB above its own process's. Default: on a GPU when more than one path runs.
        output: write the results as JSON here (atomically).

    Returns the results dict; prints a Markdown table. The one surprising thing: MFU counts no recomputation.
    """
    arguments = dict(locals())  # the parameters, for the child processes of isolate
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if shape == "auto":
        shape = "llama-3.2-1b" if dev.type == "cuda" else "tiny"
    if dev.type == "cuda" and not peak_tflops:
        name = torch.cuda.get_device_name(dev)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    setup = {"name": shape_model(shape), "rank": rank, "checkpointing": gradient_checkpointing, "device": dev,
             "seed": seed, "doc_len": doc_len, "peak_tflops": peak_tflops,
             "loss_model": ("tiny-random" if shape == "tiny" else "smollm2-135m") if loss_model == "auto" else loss_model}
    defaults = {"attention": attention, "compile": compile, "liger": liger, "chunked_ce": chunked_ce, "graphs": graphs,
                "fp32_activations": fp32_activations, "ce_chunk": ce_chunk}
    if paths == "auto":
        paths = GPU_PATHS if dev.type == "cuda" else "baseline,ours"
    plans = {p.strip(): path_options(p, defaults) for p in paths.split(",") if p.strip()}
    if isolate is None:
        isolate = dev.type == "cuda" and len(plans) > 1
    if isolate:
        return _bench_isolated(arguments, list(plans), output)
    batch = synthetic_batch(model_vocab(setup["name"]), micro_batch, seq_len, doc_len, dev)
    real = emoji_batches(setup["loss_model"], loss_steps, dev, loss_batch) if real_data and loss_steps > 0 else None
    results = {"settings": {k: str(v) for k, v in {**setup, "shape": shape, "seq_len": seq_len, "micro_batch": micro_batch,
               "steps": steps, "warmup": warmup, "loss_steps": loss_steps if real else 0}.items()},
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "versions": _versions(), "paths": {}}
    for path, (builder, options) in plans.items():
        try:
            entry = {"options": options, **measure_speed(builder, options, setup, batch, steps, warmup)}
            if real:
                entry.update(measure_loss(builder, options, setup, *real))
        except Exception as error:  # one failing variant must not lose the others
            entry = {"options": options, "error": f"{type(error).__name__}: {error}"}
            _free(dev)
        results["paths"][path] = entry
        print(f"{path}: {entry}", flush=True)
    print(format_table(results), flush=True)
    if output:
        write_json(results, output)
    return results


def _bench_isolated(arguments: dict, paths: list[str], output: str | None) -> dict:
    """:func:`bench` with each path in a child process (same arguments, one path, ``isolate=False``, this process's
    CPU thread count, which decides how CPU matmuls sum); the results are merged in order. A child that fails or dies
    becomes that path's ``error`` entry."""
    import subprocess
    import sys

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="lit-bench-") as tmp:
        for i, path in enumerate(paths):
            child = {**arguments, "paths": path, "isolate": False, "output": str(Path(tmp) / f"{i}.json")}
            code = (f"import json, sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
                    "from lit_llama_lab.bench import bench; bench(**json.loads(sys.argv[1]))")
            last = "no output"
            with subprocess.Popen([sys.executable, "-c", code, json.dumps(child)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) as run:
                for line in run.stdout:  # the child's progress, as it comes
                    print(line, end="", flush=True)
                    last = line.strip() or last
            if run.returncode == 0 and Path(child["output"]).is_file():
                part = json.loads(Path(child["output"]).read_text())
                results = results or {k: v for k, v in part.items() if k != "paths"} | {"paths": {}}
                results["paths"].update(part["paths"])
            else:
                results.setdefault("paths", {})[path] = {"error": f"process exited {run.returncode}: {last}"}
    results["settings"] = {**results.get("settings", {}), "isolated": "True"}
    print(format_table(results), flush=True)
    if output:
        write_json(results, output)
    return results


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
