"""The 1B step's activation memory: the MLP in row blocks (``--model.speed.mlp_chunks``) and the checkpointed layer
inputs in pinned host memory (``--model.speed.offload_checkpoints``). Both are for compiled, checkpointed layers
(:mod:`lit_llama_lab.speed.compile`), whose backward recomputes each layer; ``tests/speed/test_memory.py`` checks
that they change no value, ``tests/gpu/test_memory.py`` what they save on a GPU.
"""

from __future__ import annotations

import types

import torch

from lit_llama_lab.model.adapters import unwrap_peft
from lit_llama_lab.speed.dequantize import dequantize_weight, four_bit_linear, is_four_bit

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The blocks and the offload trade speed for memory, which only large micro-batches need: they apply from this many
# tokens a micro-batch. At the 1B shape's 4 x 2,048 they take the peak from 3.33 to 1.91 GiB for 8% of the speed;
# on FineTome-like batches (16 conversations, 2 rows of <= 2,048 tokens, 2.9 GiB without them) they made the step 2.4x
# slower: 0.52 h per 100,000 conversations against 0.22 h (docs/speed.md). Smaller batches run the whole MLP and keep
# their checkpoints on the GPU.
MIN_TOKENS = 8192


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


def _four_bit_base(projection):
    """The bitsandbytes 4-bit layer that is ``projection`` or peft's LoRA layer's base under it, when the blocks can
    run it on a weight dequantized once: no bias, and any adapters plain LoRA (no DoRA). Else None."""
    base = projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection
    if not is_four_bit(base) or base.bias is not None or getattr(projection, "lora_variant", None):
        return None
    return base


def _dequantized(base) -> torch.Tensor:
    """``base``'s weight in its compute dtype: the cached copy of ``dequantize_once``, or dequantized now."""
    cached = getattr(base, "_dequantized", None)
    return cached if cached is not None else dequantize_weight(base)


def _project(projection, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What ``projection`` (a 4-bit layer, or peft's LoRA over one) computes for ``x``, its 4-bit weight given as
    ``weight``: bitsandbytes' math (:func:`~lit_llama_lab.speed.dequantize.four_bit_linear`) plus, as peft's
    ``Linear4bit.forward`` adds them, the active adapters' updates."""
    result = four_bit_linear(x, weight)
    if not hasattr(projection, "lora_A"):  # a 4-bit layer without adapters
        return result
    for name in projection.active_adapters:
        if name not in projection.lora_A:
            continue
        lora_a, lora_b = projection.lora_A[name], projection.lora_B[name]
        converted = not torch.is_autocast_enabled()
        x_in = projection._cast_input_dtype(x, lora_a.weight.dtype) if converted else x
        update = lora_b(lora_a(projection.lora_dropout[name](x_in))) * projection.scaling[name]
        result = result + (update.to(result.dtype) if converted else update)
    return result


def _chunked_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The MLP of each of ``self._mlp_chunks`` row blocks of ``x`` (tokens are independent in an MLP). A Llama MLP of
    4-bit layers with plain LoRA has each weight dequantized once for all blocks; any other MLP, or adapters switched
    off (a distillation teacher) or merged, runs its own forward on each block."""
    if _tokens(x) < self._mlp_min_tokens:
        return self._unchunked_forward(x)
    rows = x.reshape(-1, x.shape[-1]).tensor_split(self._mlp_chunks)
    projections = [getattr(self, name, None) for name in PROJECTIONS]
    if self._mlp_bases is None or any(getattr(p, "disable_adapters", False) or getattr(p, "merged", False)
                                      for p in projections):
        out = torch.cat([self._unchunked_forward(part) for part in rows])
    else:
        gate, up, down = ((p, _dequantized(base)) for p, base in zip(projections, self._mlp_bases, strict=True))
        out = torch.cat([_project(*down, self.act_fn(_project(*gate, part)) * _project(*up, part)) for part in rows])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def chunk_mlp(model, chunks: int, min_tokens: int = MIN_TOKENS) -> int:
    """Run each decoder layer's MLP in ``chunks`` row blocks (the same values: each token's MLP is its own) for inputs
    of at least ``min_tokens`` tokens (:data:`MIN_TOKENS`); smaller inputs run the MLP whole.

    What it saves is the backward's memory of a compiled, checkpointed layer: its backward graph recomputes the layer
    in the order autograd consumes it (torch's partitioner), so each block's gate, up and activation
    (tokens × intermediate size each, 128 MiB at the 1B shape's 8,192 tokens) are recomputed just before that block's
    gradient and freed after it, instead of all 8,192 rows' at once. An eager checkpoint recomputes the whole layer
    before its backward, so there the blocks save nothing. In a Llama MLP of 4-bit layers with plain LoRA the three
    weights are dequantized once per pass for all blocks (through bitsandbytes' layers each block would dequantize
    them again: at the 1B shape that cost 7% of the step); other MLPs (unquantized, DoRA) run their own forward on
    each block. Returns the number of MLPs chunked (0 for ``chunks`` 1).
    """
    if chunks < 1:
        raise ValueError(f"mlp_chunks={chunks}: use 1 (whole MLPs) or more row blocks.")
    if chunks == 1:
        return 0
    layers = unwrap_peft(model).get_decoder().layers
    if not all(isinstance(getattr(layer, "mlp", None), torch.nn.Module) for layer in layers):
        raise ValueError(f"mlp_chunks={chunks} needs decoder layers with an ``mlp`` module, which "
                         f"{type(layers[0]).__name__} lacks: use --model.speed.mlp_chunks 1.")
    for layer in layers:
        mlp = layer.mlp
        bases = [_four_bit_base(getattr(mlp, name, None)) for name in PROJECTIONS]
        bases = None if None in bases or not hasattr(mlp, "act_fn") else bases
        if not hasattr(mlp, "_unchunked_forward"):
            mlp._unchunked_forward = mlp.forward
            mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)
        mlp._mlp_chunks, mlp._mlp_bases, mlp._mlp_min_tokens = chunks, bases, min_tokens
    return len(layers)


class _Offloaded:
    """A saved input in host slot ``slot``: what the pack hook gives autograd instead of the GPU tensor. Dropped by
    autograd (after its backward, or with a graph that never runs backward), it hands the slot back."""

    def __init__(self, owner: CheckpointOffload, slot: int, like: torch.Tensor, before: _Offloaded | None) -> None:
        self.owner, self.slot, self.before = owner, slot, before  # before: the input packed just before this one
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.fetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def __del__(self) -> None:
        self.owner.free.add(self.slot)


class CheckpointOffload:
    """``saved_tensors_hooks`` that keep compiled, checkpointed layers' inputs in pinned host memory between the
    forward and the backward pass.

    A compiled layer with checkpointing saves its input (the residual stream, tokens × hidden size) for the backward
    pass to recompute from. The pack hook copies it to a pinned host buffer on a side stream, and its GPU memory is
    let go when the next layer's input is packed (that copy has long finished by then). In backward, unpacking a
    layer's input starts copying the input of the layer before it back on the side stream, so the transfer overlaps
    this layer's recomputation and gradients.

    A step's CUDA graph can capture it: host buffers are made in the eager warm-up pass and kept (a slot per saved
    input, shared by every graph: graphs replay one at a time), and every side-stream copy is joined before the
    forward (:meth:`end`, after the decoder's forward) and the backward end. Parameters and tensors without
    gradients (rotary tables, the LoRA scaling) stay where they are. Off CUDA the copies are plain host copies
    (how the CPU tests check the bookkeeping).
    """

    def __init__(self) -> None:
        self.host: list[torch.Tensor] = []  # a pinned buffer per slot
        self.retired: list[torch.Tensor] = []  # outgrown buffers: a captured graph may still copy into them
        self.free: set[int] = set()  # slots whose saved input autograd has dropped
        self.last: _Offloaded | None = None  # the input packed last in this forward pass
        self.sent: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # GPU inputs whose copy is not joined yet
        self.stream: torch.cuda.Stream | None = None
        self.offloaded = 0  # inputs packed to the host so far (the tests read it)

    def start(self) -> None:
        """A forward pass of the decoder begins (its layers' inputs are packed in order)."""
        self.last = None

    def end(self) -> None:
        """A forward pass of the decoder ends: every copy to the host is joined, and only autograd holds the saved
        inputs (they give their slots back when it drops them)."""
        self.join()
        self.last = None

    def side(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def view(self, slot: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return self.host[slot][:shape.numel() * dtype.itemsize].view(dtype).view(shape)

    def take_slot(self, tensor: torch.Tensor) -> int:
        """A free slot whose buffer holds ``tensor`` (grown when too small, never shrunk)."""
        slot = min(self.free) if self.free else len(self.host)
        self.free.discard(slot)
        if slot == len(self.host):
            self.host.append(torch.empty(0, dtype=torch.uint8))
        size = tensor.numel() * tensor.element_size()
        if self.host[slot].numel() < size:
            self.retired.append(self.host[slot])
            self.host[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=tensor.is_cuda)
        return slot

    def pack(self, tensor: torch.Tensor):
        if not tensor.requires_grad or isinstance(tensor, torch.nn.Parameter):
            return tensor
        saved = self.last = _Offloaded(self, self.take_slot(tensor), tensor, self.last)
        host = self.view(saved.slot, tensor.shape, tensor.dtype)
        self.offloaded += 1
        self.join()  # the previous input's copy: finished during this layer's forward; its GPU memory can go
        if not tensor.is_cuda:
            host.copy_(tensor)
            return saved
        side = self.side(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is complete
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
        self.sent.append((tensor, side.record_event()))  # the GPU input stays alive until its copy is joined
        return saved

    def join(self) -> None:
        """The current stream waits for every copy to the host so far, and their GPU inputs are let go."""
        for tensor, event in self.sent:
            torch.cuda.current_stream(tensor.device).wait_event(event)
        self.sent.clear()

    def fetch(self, saved: _Offloaded) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying ``saved`` back to its device: the tensor and the event that says it has arrived."""
        host = self.view(saved.slot, saved.shape, saved.dtype)
        tensor = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
        if saved.device.type != "cuda":
            return tensor.copy_(host), None
        side = self.side(saved.device)
        side.wait_stream(torch.cuda.current_stream(saved.device))  # the new tensor's memory may be in use until now
        with torch.cuda.stream(side):
            tensor.copy_(host, non_blocking=True)
        return tensor, side.record_event()

    def unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        tensor, event = saved.fetched or self.fetch(saved)
        saved.fetched = None
        if event is not None:
            torch.cuda.current_stream(tensor.device).wait_event(event)
        before = saved.before
        if before is not None and before.fetched is None:
            before.fetched = self.fetch(before)  # the layer before this one: its backward comes next
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offload_checkpoints(model, min_tokens: int = MIN_TOKENS) -> CheckpointOffload:
    """Keep the inputs that compiled, checkpointed decoder layers save for backward in pinned host memory
    (:class:`CheckpointOffload`): 16 × 32 MiB at the 1B shape. Only for inputs of at least ``min_tokens`` tokens
    (:data:`MIN_TOKENS`): a smaller batch's layers run without the hooks. Layers must be compiled first
    (:func:`lit_llama_lab.speed.compile.compile_decoder_layers`): an eager checkpoint keeps its input by reference,
    out of any hook's reach."""
    decoder = unwrap_peft(model).get_decoder()
    offload = CheckpointOffload()
    for layer in decoder.layers:
        compiled = layer._compiled_call_impl
        if compiled is None:
            raise ValueError("offload_checkpoints needs compiled decoder layers: set --model.speed.compile true "
                             "(or auto on a GPU), or --model.speed.offload_checkpoints false.")

        def call(*args, _compiled=compiled, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if _tokens(hidden) < min_tokens:  # a small batch: the layer runs as without offload, no hooks at all
                return _compiled(*args, **kwargs)
            with offload.hooks():
                return _compiled(*args, **kwargs)

        layer._compiled_call_impl = call
    decoder.register_forward_pre_hook(lambda *_: offload.start())
    decoder.register_forward_hook(lambda *_: offload.end())
    return offload
