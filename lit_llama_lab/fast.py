"""Speed-path pieces for QLoRA training: a chunked linear cross-entropy, packed-sequence attention inputs, and the
optional extras (torch.compile of decoder layers, Liger kernels, FlashAttention varlen) the benchmark measures.

Every piece computes the same math as the plain path; ``tests/test_bench.py`` checks the losses agree.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Literal

import torch

from lit_llama_lab.data.masking import IGNORE_INDEX

Attention = Literal["sdpa", "flex", "varlen"]
DECODER_KEYS = ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk over rows.

    Rows whose target is ``IGNORE_INDEX`` count for nothing; the mean is over the other rows. Shapes never depend
    on the data (no row selection, no host sync), so the function can be captured in a CUDA graph.
    The gradient is computed in the forward pass (softmax minus one-hot, then one matmul per chunk), so neither the
    full ``[rows, vocab]`` logits nor their fp32 copy ever exist at once and nothing is recomputed in backward.
    Each chunk's logits are upcast to fp32 before the softmax, as Hugging Face's loss does.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        rows = hidden.shape[0]
        ctx.weight_dtype = weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1).float()  # a tensor: no host sync
        w = weight.to(hidden.dtype)
        for start in range(0, rows, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            keep = (t != IGNORE_INDEX).float()
            t = t.clamp(min=0)
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * keep).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, t[:, None], -torch.ones_like(lse)[:, None])
                g = probs.mul_((keep / count)[:, None]).to(hidden.dtype)
                if need_h:
                    grad_h[start:start + chunk] = g @ w
                if need_w:
                    grad_w += g.T.float() @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden [rows, d] @ weight [vocab, d].T`` against ``targets [rows]``, over
    the rows whose target is not ``IGNORE_INDEX`` (-100).

    ``chunk`` rows per step (0: about 2**25 logits per chunk, 128 MiB in fp32: with a 128k vocabulary a chunk is
    256 rows, still one large matmul, and the loss's transient memory stays a small part of a 1B model's step).
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}: select labelled rows "
                         "or pass one target per row.")
    chunk = chunk or max(1, 2**25 // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def unwrap_peft(model):
    """The causal LM under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(model, batch: dict, decoder_keys: tuple[str, ...] = DECODER_KEYS) -> tuple:
    """Run the decoder (no vocabulary projection) on ``batch``: ``(causal_lm, hidden [batch, seq, d])``.

    ``decoder_keys`` present in ``batch`` go to the decoder; ``causal_lm`` is the model under any peft wrapper (its
    ``get_output_embeddings`` is the vocabulary projection).
    """
    causal_lm = unwrap_peft(model)
    extra = {k: batch[k] for k in decoder_keys if k in batch}
    return causal_lm, causal_lm.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **extra).last_hidden_state


def fast_label_loss(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """:func:`lit_llama_lab.module.label_loss`'s math (mean CE over labelled positions) with fixed shapes: the
    decoder runs on the whole batch and :func:`linear_cross_entropy` weighs unlabelled positions by zero, so no
    step depends on the data and the whole loss (forward and backward) can be captured in a CUDA graph.

    The keys of :data:`DECODER_KEYS` present in ``batch`` (e.g. varlen's ``cu_seq_lens_q``) go to the decoder.
    Costs vocabulary logits at unlabelled positions too (chunked, never all at once).
    """
    causal_lm, hidden = final_hidden(model, batch)
    targets = batch["labels"][:, 1:].reshape(-1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return linear_cross_entropy(hidden, causal_lm.get_output_embeddings().weight, targets, chunk)


def _cast_in(module, args):
    """Forward pre-hook of an unquantized layer: remember the input's dtype, compute in the weight's."""
    module._input_dtype = args[0].dtype
    return (args[0].to(module.weight.dtype), *args[1:])


def keep_fp32_activations(model) -> bool:
    """Keep the hidden states between matmuls in fp32 while every matmul (4-bit base, adapters' inputs, attention)
    still runs in the model's bf16/fp16 compute dtype: the numerics of the plain stack, whose
    ``prepare_model_for_kbit_training`` gets them by upcasting embeddings, norms and lm_head to fp32 under bf16
    autocast, without upcasting any weight.

    With a bf16 model every projection's output is rounded to bf16, and with it the sum of the frozen output and
    the adapter's small update, so much of the update is lost in the forward pass while its gradient is not:
    50 steps of SmolLM2 on emoji chats ended 1.6% above the plain stack's held-out loss (+0.4% with this). Here:

    - the embedding output is cast to fp32, so the residual stream, the norms, the MLP's gate, up and activation
      and each adapter's sum with its frozen projection stay fp32 (bitsandbytes casts each 4-bit layer's input to
      the compute dtype for its matmul and returns the input's dtype; unquantized layers get hooks that do the
      same);
    - query, key and value are cast to the compute dtype (one rounding, as autocast does before attention) and so
      are the rotary cos/sin, so rotary and attention run in it as before;
    - the final norm's output is cast to the compute dtype for the vocabulary projection.

    The cost is memory for the fp32 stream (checkpointed block boundaries, MLP intermediates) and bandwidth.
    Returns False (nothing to do) when the model computes in fp32. Hooks only: weights are untouched, so the model
    saves, merges and exports as before. Works before or after peft wraps the projections.
    """
    causal_lm = unwrap_peft(model)
    decoder = causal_lm.get_decoder()
    compute = decoder.embed_tokens.weight.dtype
    if compute == torch.float32 or getattr(decoder, "_fp32_activations", False):
        return False
    attention = [layer.self_attn for layer in decoder.layers if hasattr(layer, "self_attn")]
    if not attention or not all(hasattr(a, name) for a in attention for name in ("q_proj", "k_proj", "v_proj")):
        raise ValueError(f"fp32_activations needs Llama-style attention (q_proj, k_proj, v_proj) in "
                         f"{type(decoder).__name__}; pass fp32_activations=False.")
    to_compute = lambda module, args, out: out.to(compute)  # noqa: E731
    decoder.embed_tokens.register_forward_hook(lambda module, args, out: out.float())
    decoder.rotary_emb.register_forward_hook(lambda module, args, out: tuple(t.to(compute) for t in out))
    decoder.norm.register_forward_hook(to_compute)
    for attn in attention:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attn, name).register_forward_hook(to_compute)
    # plain (unquantized) layers: bitsandbytes' cast-in, input-dtype-out, which fp32 inputs need
    for name, linear in decoder.layers.named_modules():
        if type(linear) is torch.nn.Linear and linear.weight.dtype == compute and "lora_" not in name:
            linear.register_forward_pre_hook(_cast_in)
            linear.register_forward_hook(lambda module, args, out: out.to(module._input_dtype))
    decoder._fp32_activations = True
    return True


def varlen_keys(document_ids: torch.Tensor, max_documents: int) -> dict:
    """FlashAttention varlen's inputs for a packed batch, in tensors whose sizes do not depend on the data.

    ``document_ids``: ``[rows, width]`` long, as :func:`lit_llama_lab.data.packing.document_ids` builds it: each row
    holds its documents ``0, 1, ..., k-1`` back to back from position 0, then padding (-1) to the end of the row.
    ``max_documents``: at most this many documents in the whole batch (the data module's ``batch_size``: one
    document per example); a batch with more is refused on the CPU (:meth:`ChatDataModule.on_before_batch_transfer
    <lit_llama_lab.data.datamodule.ChatDataModule.on_before_batch_transfer>` checks, and so does this function for a
    CPU tensor), and on a GPU scatter's bounds check fails.

    The flattened batch is split into ``max_documents + rows`` segments: each row's documents, then one segment for
    the row's trailing padding (empty when there is none; its tokens attend each other causally, never a real token,
    and carry no label), then empty segments for the documents the batch does not have. Returns
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (the same int32 tensor of ``max_documents + rows + 1`` offsets, starting at 0
    and ending at ``rows * width``) and ``max_length_q``/``max_length_k`` = ``width`` (a Python int: a bound, the
    kernel's grid size, fixed for a batch shape). No host sync (no ``.item()``, ``nonzero`` or branch on values), so
    it can run before a CUDA graph replay whose inputs it fills.

    The empty segments are not free: FlashAttention's varlen backward allocates ``128 * segments`` extra rows of fp32
    ``dQ`` accumulator (``heads * head_dim * 4`` bytes each), so the segment count follows the batch's documents,
    not ``rows * max_documents``.
    """
    rows, width = document_ids.shape
    if document_ids.device.type == "cpu":  # checked where it costs no sync
        check_documents(document_ids, max_documents)
    per_row = document_ids.amax(dim=1) + 1  # documents in each row (ids 0..k-1, then -1)
    first = torch.cumsum(per_row + 1, 0) - (per_row + 1)  # each row's first segment
    segment = first[:, None] + torch.where(document_ids < 0, per_row[:, None], document_ids)
    lengths = torch.zeros(max_documents + rows, dtype=torch.long, device=document_ids.device)
    lengths.scatter_add_(0, segment.flatten(), torch.ones_like(segment).flatten())
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}


def count_documents(document_ids: torch.Tensor) -> int:
    """Documents in a ``[rows, width]`` :func:`varlen_keys` input, over all rows (a host sync on a GPU tensor)."""
    return int((document_ids.amax(dim=1) + 1).clamp(min=0).sum())


def check_documents(document_ids: torch.Tensor, max_documents: int) -> None:
    """Raise unless ``document_ids`` (on the CPU) holds at most ``max_documents`` documents in all (see
    :func:`varlen_keys`)."""
    found = count_documents(document_ids)
    if found > max_documents:
        raise ValueError(f"The batch holds {found} documents, more than max_documents={max_documents}: varlen's "
                         "offsets would merge documents. Pass the largest number of examples in a batch.")


def attention_inputs(batch: dict, attention: Attention) -> dict:
    """Adapt a packed batch (restarting ``position_ids`` + our 4-D mask) to an attention implementation.

    ``sdpa`` keeps our block-diagonal mask; ``flex`` replaces it by an equal flex ``BlockMask`` (blocks outside
    a document are skipped); ``varlen`` drops it and adds :func:`varlen_keys`, as training does. Documents are the
    batch's ``document_ids`` when it has them (padding, -1, one segment per row), else found from ``position_ids``
    restarting at 0, so a padding token (position 0) is a document of its own in all three, as in
    :func:`lit_llama_lab.data.packing.block_causal_mask`. ``varlen`` reads the number of documents from the batch
    (one host sync: prepare batches before timing them).
    """
    out = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    starts = batch["position_ids"] == 0
    if attention == "sdpa":
        out["attention_mask"] = batch["attention_mask"]
    elif attention == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        docs = starts.long().cumsum(-1)
        rows, width = docs.shape

        def same_document_causal(b, h, q, kv):
            return (docs[b, q] == docs[b, kv]) & (q >= kv)

        out["attention_mask"] = create_block_mask(same_document_causal, rows, None, width, width, device=docs.device)
    elif attention == "varlen":
        ids = batch.get("document_ids")
        if ids is None:
            ids = starts.long().cumsum(-1) - 1
        out.update(varlen_keys(ids, count_documents(ids)))
    else:
        raise ValueError(f"Unknown attention {attention!r}; use sdpa, flex or varlen.")
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function over torch's FlashAttention varlen kernel (``torch.nn.attention.varlen``).

    ``query``: ``[batch, heads, seq, dim]``; the batch is flattened into one token stream split by
    ``cu_seq_lens_q`` (:func:`varlen_keys`). Returns ``([batch, seq, heads, dim], None)`` like transformers' sdpa
    function. Without ``cu_seq_lens_q`` (validation with our 4-D mask, anything else) it is transformers' sdpa
    function with the same arguments. transformers builds no mask for this implementation: a 4-D mask passes as
    given, a 2-D padding mask becomes None, which only right padding survives (real tokens come before the padding
    and attention is causal); :func:`lit_llama_lab.generation.generate` (left padding, KV cache) switches to sdpa.
    """
    if kwargs.get("cu_seq_lens_q") is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    b, hq, s, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d) for x in (query, key, value))
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    params = inspect.signature(varlen_attn).parameters  # torch 2.9-2.10: is_causal; later: window_size
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if hq != key.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(hq // key.shape[1], dim=1) for x in (k, v))
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **options)
    return out.reshape(b, s, hq, d), None


VARLEN = "lit_varlen"  # the name varlen_attention_forward is registered under in transformers' AttentionInterface


def register_varlen_attention() -> str:
    """Register :func:`varlen_attention_forward` in transformers' ``AttentionInterface`` as :data:`VARLEN` (works
    without CUDA: the sdpa fallback runs anywhere). Returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def varlen_unsupported(model) -> str | None:
    """Why FlashAttention varlen cannot train ``model`` here, or None when it can: it needs torch's
    ``torch.nn.attention.varlen``, the model on a CUDA GPU of compute capability 8.0 or newer (Ampere+) and a bf16 or
    fp16 compute dtype."""
    import importlib.util

    parameter = next(unwrap_peft(model).parameters())
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if not parameter.is_cuda:
        return "the model is not on a CUDA GPU"
    if torch.cuda.get_device_capability(parameter.device) < (8, 0):
        return f"{torch.cuda.get_device_name(parameter.device)} is older than Ampere (FlashAttention needs sm80+)"
    compute = unwrap_peft(model).get_input_embeddings().weight.dtype
    if compute not in (torch.bfloat16, torch.float16):
        return f"the compute dtype is {compute}, FlashAttention needs bfloat16 or float16"
    return None


def use_attention(model, attention: Attention) -> None:
    """Switch a loaded model's attention: ``sdpa``, ``flex`` (transformers' flex_attention) or ``varlen``
    (:func:`varlen_attention_forward`; refused without CUDA)."""
    if attention == "sdpa":
        model.set_attn_implementation("sdpa")
    elif attention == "flex":
        model.set_attn_implementation("flex_attention")
    elif attention == "varlen":
        if not torch.cuda.is_available():
            raise ValueError("attention='varlen' needs a CUDA GPU (FlashAttention); use 'sdpa' or 'flex' on a CPU.")
        model.set_attn_implementation(register_varlen_attention())
    else:
        raise ValueError(f"Unknown attention {attention!r}; use sdpa, flex or varlen.")


def apply_liger(model) -> None:
    """Liger-Kernel's fused RMSNorm, RoPE and SwiGLU on a Llama model (before adapters are attached).

    Optional: needs ``liger-kernel`` and triton (a CUDA GPU). The loss stays ours (:func:`linear_cross_entropy`).
    """
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as error:
        raise ValueError(f"liger=True needs liger-kernel on a CUDA GPU: pip install liger-kernel==0.8.5 ({error}).") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


def _recompute_everything(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_RECOMPUTE


def checkpoint_kwargs(compiled: bool = False, preserve_rng_state: bool = True) -> dict:
    """``gradient_checkpointing_kwargs`` for our training: non-reentrant checkpointing; under ``torch.compile``
    a selective-checkpoint policy that marks every op must-recompute.

    Without that policy torch.compile (2.11) keeps what it considers costly to recompute in a checkpointed layer,
    bitsandbytes' 4-bit matmul outputs (a custom op) among them, for every layer until the backward pass: measured
    at the 1B shape (micro-batch 4 x 2048), 7.5 GiB held after the forward instead of 2.3, an 8.8 GiB peak instead
    of 3.9. With the policy the compiled layer is recomputed whole, as the eager checkpoint does (``make bench``).
    In eager mode the policy would only add a dispatch hook to every op, so it is set for compiled layers only.
    """
    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    if compiled:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _recompute_everything)
    return kwargs


def compile_decoder_layers(model) -> int:
    """``torch.compile`` each decoder layer in place (its checkpoint, if any, inside the compiled region: set it
    up with :func:`checkpoint_kwargs` ``(compiled=True)`` so the compiled layer is recomputed in backward).

    Returns the number of layers compiled. The compiled loss must be checked against eager: see the benchmark.
    """
    causal_lm = unwrap_peft(model)
    layers = causal_lm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


def fast_peft_model(base, lora_config, gradient_checkpointing: bool = True, attention: Attention = "sdpa",
                    compile: bool = False, liger: bool = False, preserve_rng_state: bool = True,
                    fp32_activations: bool = True):
    """Our training setup of a loaded (4-bit) base: adapters from ``lora_config`` without peft's
    ``prepare_model_for_kbit_training`` (its fp32 upcast of embeddings, lm_head and norms costs time and memory;
    ``fp32_activations`` keeps the hidden states between matmuls in fp32 without it, see
    :func:`keep_fp32_activations`), non-reentrant checkpointing, the chosen attention, optional Liger kernels and
    compiled decoder layers. Seed torch before calling for a reproducible adapter init.
    ``preserve_rng_state=False`` lets checkpointing run inside a CUDA graph capture (safe without dropout).
    """
    from peft import get_peft_model

    base.config.use_cache = False
    if liger:
        apply_liger(base)
    if fp32_activations:
        keep_fp32_activations(base)
    use_attention(base, attention)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(compile, preserve_rng_state))
    model = get_peft_model(base, lora_config)
    if compile:
        compile_decoder_layers(model)
    return model


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A 4-bit layer's forward over its cached dequantized weight: bitsandbytes' math (input cast to the compute
    dtype, one matmul with the NF4 weight dequantized, output in the input's dtype) without dequantizing again."""
    weight = self._dequantized
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def four_bit_layers(model) -> list:
    """bitsandbytes' 4-bit linear layers of ``model`` (not the peft wrappers around them, whose ``weight`` is
    theirs)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit) and getattr(m.weight, "quant_state", None)]


def dequantized_bytes(model) -> int:
    """Bytes that :func:`cache_dequantized_weights` would add: every 4-bit layer's weight in its compute dtype."""
    return sum(m.weight.quant_state.shape.numel() * (m.compute_dtype or m.weight.quant_state.dtype).itemsize
               for m in four_bit_layers(model))


def cache_dequantized_weights(model) -> int:
    """Dequantize each frozen 4-bit layer once and run its forward and backward on that copy.

    bitsandbytes dequantizes a 4-bit weight at every use: in the forward matmul and again for the input gradient
    in backward (a few kernels each, for each of a Llama layer's seven projections). The base is frozen, so every
    step dequantizes the same NF4 values to the same weights; keeping them costs the weights' size in the compute
    dtype (SmolLM2-135M: 0.2 GB) and changes no value the layer computes with. For a small model, whose step is
    thousands of tiny kernels, it removes the dequantizing ones: 1,250 of a SmolLM2 emoji step's 8,900 (46.1 to
    44.0 ms a step on an H200, ``scripts/gpu_profile.py``). The 4-bit weight stays the parameter: state
    dicts, checkpoints, merging and export see the quantized model. Returns the number of layers cached.

    The copy is a non-persistent buffer: it moves with the module and stays out of state dicts. A weight changed
    later (a merge) must not be trained through the cache.
    """
    import bitsandbytes.functional as bnbf

    count = 0
    for module in four_bit_layers(model):
        if getattr(module, "_dequantized", None) is not None:
            continue
        state = module.weight.quant_state
        with torch.no_grad():
            dequantized = bnbf.dequantize_4bit(module.weight.data, state).to(module.compute_dtype or state.dtype)
        # a buffer moves with the module (``.cuda()``); non-persistent: never in a state dict or checkpoint
        module.register_buffer("_dequantized", dequantized, persistent=False)
        module.forward = _dequantized_forward.__get__(module)
        count += 1
    return count
