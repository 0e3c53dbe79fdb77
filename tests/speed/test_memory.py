"""The 1B step's activation memory (``speed/memory.py``): the MLP in row blocks and the checkpointed layer inputs in
host memory train exactly as before, on the tiny 4-bit model, and the blocks shrink what a compiled, checkpointed
layer's backward holds at once. What they save on a GPU: ``tests/gpu/test_memory.py``."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lit_llama_lab.speed.compile import checkpoint_kwargs
from lit_llama_lab.speed.memory import chunk_mlp, offload_checkpoints
from tests.helpers import make_module

VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.t.default,
         torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.expand.default,
         torch.ops.aten.slice.Tensor, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default,
         torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.reshape.default}


def peak_bytes(graph_module) -> int:
    """The most bytes of tensors an FX graph holds at once, running its nodes in order and freeing each value after
    its last use (views hold nothing of their own)."""
    nodes = list(graph_module.graph.nodes)
    last = {arg: i for i, node in enumerate(nodes) for arg in node.all_input_nodes}
    live, now, peak = {}, 0, 0
    for i, node in enumerate(nodes):
        value = node.meta.get("val")
        values = value if isinstance(value, (tuple, list)) else [value]
        size = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
        if node.op in ("placeholder", "call_function") and node.target not in VIEWS:
            live[node] = size
            now += size
            peak = max(peak, now)
        for arg in node.all_input_nodes:
            if last[arg] == i and arg in live:
                now -= live.pop(arg)
    return peak


def tiny_model(compile_backend=None, chunks: int = 1, min_tokens: int = 0):
    """The tiny 4-bit model with checkpointing, its layers compiled (``compile_backend``) under our checkpoint policy,
    its MLPs in ``chunks`` row blocks from ``min_tokens`` tokens (0: any batch; training's default is 8,192)."""
    torch.manual_seed(0)
    module = make_module(gradient_checkpointing=True, compute_dtype="float32", tf32=False)
    model = module.model
    model.train()
    chunk_mlp(model, chunks, min_tokens)
    for layer in model.get_base_model().get_decoder().layers:
        layer._gradient_checkpointing_func = partial(checkpoint, **checkpoint_kwargs(compiled=True))
        if compile_backend is not None:
            layer.compile(backend=compile_backend, dynamic=False)
    return module


def step(module, ids) -> tuple[float, dict]:
    """One forward and backward: the loss and the adapters' gradients."""
    module.model.zero_grad(set_to_none=True)
    loss = module.model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 512), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def eager_reference(ids):
    return step(tiny_model(), ids)


def assert_same_training(run, reference):
    (loss, grads), (expected_loss, expected_grads) = run, reference
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_mlp_in_row_blocks_computes_the_same_loss_and_gradients(ids, eager_reference):
    module = tiny_model(chunks=3)  # 1,024 rows in blocks of 342, 341, 341
    mlp = module.model.get_base_model().get_decoder().layers[0].mlp
    assert mlp._mlp_bases is not None  # 4-bit layers with plain LoRA: the weights dequantized once for all blocks
    x = torch.randn(2, 5, mlp.gate_proj.in_features)
    torch.testing.assert_close(mlp(x), mlp._unchunked_forward(x))
    assert_same_training(step(module, ids), eager_reference)
    torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=1.0).step()  # B moves off zero
    with torch.no_grad():
        with module.model.disable_adapter():  # the distillation teacher's pass: the base alone
            torch.testing.assert_close(mlp(x), mlp._unchunked_forward(x))
            base_only = mlp(x)
        torch.testing.assert_close(mlp(x), mlp._unchunked_forward(x))
        assert not torch.allclose(mlp(x), base_only)
    assert chunk_mlp(module.model, 1) == 0
    with pytest.raises(ValueError, match="mlp_chunks=0"):
        chunk_mlp(module.model, 0)


def test_mlps_outside_the_fast_path_run_their_own_forward_per_block():
    """DoRA reads its weights' norms, so its MLP runs peft's forward on each block: the same values."""
    from lit_llama_lab.train.args import LoraArgs
    from lit_llama_lab.train.module import QLoRAModule
    from tests.helpers import module_args

    dora = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, alpha=16, use_dora=True), **module_args())
    dora.configure_model()
    assert chunk_mlp(dora.model, 4) == 2
    mlp = dora.model.get_base_model().get_decoder().layers[0].mlp
    assert mlp._mlp_bases is None
    x = torch.randn(2, 5, mlp.gate_proj.in_features)
    torch.testing.assert_close(mlp(x), mlp._unchunked_forward(x))


def test_row_blocks_shrink_what_a_compiled_checkpointed_layers_backward_holds(ids, eager_reference):
    """torch's partitioner recomputes a checkpointed layer in the order its backward consumes it, so with the MLP in
    blocks each block's activations are recomputed just before its gradient and freed after: the backward graph's
    peak falls. The graphs are AOT autograd's, as inductor receives them."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    peaks, backward = {}, []

    def keep_backward(graph_module, _):
        backward.append(graph_module)
        return make_boxed_func(graph_module)

    backend = aot_autograd(fw_compiler=lambda graph_module, _: make_boxed_func(graph_module), bw_compiler=keep_backward,
                           partition_fn=min_cut_rematerialization_partition)
    for chunks in (1, 4):
        torch._dynamo.reset()
        backward.clear()
        assert_same_training(step(tiny_model(backend, chunks), ids), eager_reference)
        peaks[chunks] = max(peak_bytes(graph) for graph in backward)
    config = make_module().model.get_base_model().config
    mlp_tensor = ids.numel() * config.intermediate_size * 4  # one fp32 activation of the whole MLP
    assert peaks[4] <= peaks[1] - 2 * mlp_tensor, peaks


def test_offloaded_checkpoints_train_the_same_and_reuse_their_host_slots(ids, eager_reference):
    module = tiny_model("aot_eager")
    offload = offload_checkpoints(module.model, min_tokens=ids.numel())  # this batch is just big enough
    layers = module.model.get_base_model().get_decoder().layers
    for _ in range(2):
        assert_same_training(step(module, ids), eager_reference)
    assert offload.offloaded == 2 * len(layers)  # each layer's input, in each step
    assert len(offload.host) == len(layers) and offload.free == set(range(len(layers)))  # the slots came back
    hidden = module.model.get_base_model().config.hidden_size
    assert all(buffer.numel() == ids.numel() * hidden * 4 for buffer in offload.host)


def test_small_micro_batches_keep_the_whole_mlp_and_their_checkpoints_on_the_device(ids, eager_reference):
    """Below ``min_tokens`` (training's default: 8,192) the blocks and the offload cost speed for memory a small batch
    does not need: the MLP runs whole and nothing goes to the host. The same training either way."""
    tokens = ids.numel()
    whole = []
    for min_tokens in (tokens + 1, tokens):  # just too small, just big enough
        module = tiny_model(chunks=3, min_tokens=min_tokens)
        calls = []
        for layer in module.model.get_base_model().get_decoder().layers:
            unchunked = layer.mlp._unchunked_forward
            layer.mlp._unchunked_forward = lambda x, f=unchunked, c=calls: c.append(x.numel() // x.shape[-1]) or f(x)
        assert_same_training(step(module, ids), eager_reference)
        whole.append(calls)
    assert whole[0] and set(whole[0]) == {tokens} and whole[1] == []  # whole MLPs only below the threshold
    module = tiny_model("aot_eager")
    offload = offload_checkpoints(module.model, min_tokens=tokens + 1)
    assert_same_training(step(module, ids), eager_reference)
    assert offload.offloaded == 0 and offload.host == []


def test_offload_needs_compiled_layers():
    module = make_module(gradient_checkpointing=True)
    with pytest.raises(ValueError, match="needs compiled decoder layers"):
        offload_checkpoints(module.model)
