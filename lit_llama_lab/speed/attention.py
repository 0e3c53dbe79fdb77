"""The one conversion of a neutral batch into what an attention kernel takes, and FlashAttention varlen.

Data batches are neutral (:mod:`lit_llama_lab.data.packing`): packed rows carry ``document_ids`` (each token's
example within its row, -1 on padding) and restarting ``position_ids``, padded rows a 2-D ``attention_mask``.
Restarting positions alone do not isolate packed examples in transformers 5, so :func:`attention_inputs` adds, for
the attention the model runs:

* ``sdpa``: a boolean ``[rows, 1, width, width]`` block-diagonal causal mask (True = may attend),
* ``eager``: the same as an additive mask (0 / dtype min) in the model's compute dtype,
* ``flex_attention``: an equal flex ``BlockMask`` (blocks outside a document are skipped),
* ``varlen``: no mask but FlashAttention varlen's per-document offsets (:func:`varlen_keys`), fixed in size so a
  CUDA graph can replay them.

Training (:class:`lit_llama_lab.train.step.TrainStep`), validation (:class:`lit_llama_lab.train.module.QLoRAModule`)
and the bench call it; ``tests/speed/test_attention.py`` checks each form against examples run alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from lit_llama_lab.data.packing import check_documents, count_documents, document_ids

ATTENTIONS = ("sdpa", "eager", "flex_attention", "varlen")
BOOL_MASK_ATTENTIONS = ("sdpa", "varlen")  # varlen validates through sdpa with the boolean mask
VARLEN = "lit_varlen"  # the name varlen_attention_forward is registered under in transformers' AttentionInterface


def document_mask(doc_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[batch, 1, width, width]`` mask from document ids: True where a query may attend a key.

    Each example attends causally within itself only, and also to its row's shared prefix (the first
    ``prefix_lengths[r]`` tokens, :func:`lit_llama_lab.data.packing.collate_packed`'s ``share_prefix``) when given.
    Padding positions attend to themselves alone (a fully masked row would give NaN in sdpa); their outputs carry no
    label.
    """
    width = doc_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc_ids.device).tril()
    real = doc_ids[:, :, None] >= 0
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & real
    if prefix_lengths is not None:
        keys = torch.arange(width, device=doc_ids.device)
        allowed = allowed | ((keys[None, None, :] < prefix_lengths.to(doc_ids.device)[:, None, None]) & real)
    eye = torch.eye(width, dtype=torch.bool, device=doc_ids.device)
    return ((allowed & causal) | eye).unsqueeze(1)


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Boolean ``[batch, 1, width, width]`` mask for rows holding examples of the given lengths back to back
    (see :func:`document_mask`)."""
    return document_mask(document_ids(seq_lengths, width))


def flex_block_mask(doc_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None):
    """A flex-attention ``BlockMask`` equal to :func:`document_mask`, built on ``doc_ids``' device (it neither
    pickles nor moves devices: build it where it is used)."""
    from torch.nn.attention.flex_attention import create_block_mask

    prefix = (torch.zeros(doc_ids.shape[0], dtype=torch.long, device=doc_ids.device) if prefix_lengths is None
              else prefix_lengths.to(doc_ids.device))

    def mask_mod(b, h, q, kv):
        seen = (doc_ids[b, q] == doc_ids[b, kv]) | ((kv < prefix[b]) & (doc_ids[b, q] >= 0))
        return (seen & (q >= kv)) | (q == kv)

    batch, width = doc_ids.shape
    return create_block_mask(mask_mod, batch, None, width, width, device=doc_ids.device, _compile=False)


def packed_attention_mask(doc_ids: torch.Tensor, attention: str = "sdpa", dtype: torch.dtype = torch.float32,
                          prefix_lengths: torch.Tensor | None = None):
    """The block-diagonal causal mask in the form ``attention`` takes (see the module docstring), each row's shared
    prefix visible to its examples when ``prefix_lengths`` is given.

    ``dtype`` matters for eager only: the additive mask must be in the model's compute dtype. ``varlen`` gets
    sdpa's boolean mask (its validation runs through sdpa).
    """
    if attention == "flex_attention":
        return flex_block_mask(doc_ids, prefix_lengths)
    mask = document_mask(doc_ids, prefix_lengths)
    if attention == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if attention in BOOL_MASK_ATTENTIONS:
        return mask
    raise ValueError(f"Unknown attention {attention!r}; use one of {', '.join(ATTENTIONS)}.")


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` holds packed rows: it has ``document_ids``, or restarting ``position_ids`` and no 2-D
    padding mask."""
    mask = batch.get("attention_mask")
    return "document_ids" in batch or ("position_ids" in batch and not (isinstance(mask, torch.Tensor) and mask.dim() == 2))


def batch_document_ids(batch: dict) -> torch.Tensor:
    """The batch's ``document_ids``, or (a batch without them) documents found where ``position_ids`` restart at 0, so
    a padding token (position 0) is a document of its own."""
    if "document_ids" in batch:
        return batch["document_ids"]
    return (batch["position_ids"] == 0).long().cumsum(-1) - 1


def attention_inputs(batch: dict, attention: str, dtype: torch.dtype = torch.float32) -> dict:
    """``batch`` with the attention inputs ``attention`` needs (see the module docstring), built on the batch's device.

    Padded (not packed) batches are returned as they are: their 2-D mask is what every implementation takes (varlen
    falls back to sdpa for them). For packed rows any mask the batch held is replaced. ``varlen`` sizes its offsets
    by ``batch["max_documents"]`` (the data module's bound, a host int); without it the documents are counted (a
    host sync on a GPU tensor: convert batches before timing them).
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"Unknown attention {attention!r}; use one of {', '.join(ATTENTIONS)}.")
    if not is_packed(batch):
        return batch
    ids = batch_document_ids(batch)
    out = {k: v for k, v in batch.items() if k not in ("attention_mask", "prefix_lengths")}
    prefix = batch.get("prefix_lengths")
    if attention == "varlen" and prefix is not None:
        raise ValueError("This batch holds shared prefixes (--data.share_prefix), which FlashAttention varlen cannot "
                         "attend across; train it with sdpa, eager or flex_attention, or without --data.share_prefix.")
    if attention == "varlen":
        bound = batch.get("max_documents")
        out.update(varlen_keys(ids, count_documents(ids) if bound is None else bound))
    else:
        out["attention_mask"] = packed_attention_mask(ids, attention, dtype, prefix)
    return out


def varlen_keys(document_ids: torch.Tensor, max_documents: int) -> dict:
    """FlashAttention varlen's inputs for a packed batch, in tensors whose sizes do not depend on the data.

    ``document_ids``: ``[rows, width]`` long, as :func:`lit_llama_lab.data.packing.document_ids` builds it: each row
    holds its documents ``0, 1, ..., k-1`` back to back from position 0, then padding (-1) to the end of the row.
    ``max_documents``: at most this many documents in the whole batch (the data module's ``batch_size``: one
    document per example); a batch with more is refused on the CPU (here, and by the data module before the batch
    moves), and on a GPU scatter's bounds check fails.

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



def register_varlen_attention() -> str:
    """Register :func:`varlen_attention_forward` in transformers' ``AttentionInterface`` as :data:`VARLEN` (works
    without CUDA: the sdpa fallback runs anywhere). Returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def varlen_unsupported(device: str | torch.device, compute_dtype: torch.dtype) -> str | None:
    """Why FlashAttention varlen cannot train a model on ``device`` computing in ``compute_dtype``, or None when it
    can: it needs torch's ``torch.nn.attention.varlen``, a CUDA GPU of compute capability 8.0 or newer (Ampere+) and a
    bf16 or fp16 compute dtype."""
    import importlib.util

    device = torch.device(device)
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if device.type != "cuda":
        return "the model is not on a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{torch.cuda.get_device_name(device)} is older than Ampere (FlashAttention needs sm80+)"
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return f"the compute dtype is {compute_dtype}, FlashAttention needs bfloat16 or float16"
    return None


def loading_attention(attention: str) -> str:
    """The ``attn_implementation`` a model that trains with ``attention`` is loaded with (varlen: sdpa, then
    :func:`use_attention` switches it)."""
    return "sdpa" if attention == "varlen" else attention


def use_attention(model, attention: str) -> None:
    """Switch a loaded model's attention: ``sdpa``, ``eager``, ``flex_attention`` or ``varlen``
    (:func:`varlen_attention_forward`; refused without CUDA)."""
    if attention == "varlen":
        if not torch.cuda.is_available():
            raise ValueError("attention='varlen' needs a CUDA GPU (FlashAttention); use sdpa or flex_attention on a CPU.")
        model.set_attn_implementation(register_varlen_attention())
    elif attention in ATTENTIONS:
        model.set_attn_implementation(attention)
    else:
        raise ValueError(f"Unknown attention {attention!r}; use one of {', '.join(ATTENTIONS)}.")
