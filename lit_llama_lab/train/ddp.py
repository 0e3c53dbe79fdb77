"""Data parallel QLoRA that keeps the one-GPU speed: every rank replays its own CUDA graphs, then the adapters'
gradients are averaged in one all-reduce.

Lightning's ``DDPStrategy`` wraps the module in torch's ``DistributedDataParallel``, whose backward hooks launch
bucketed all-reduces while the backward runs. Those hooks cannot live inside a captured CUDA graph, so under it
training ran eagerly: on two H200 the emoji fit took 190 s against 83 s on one GPU. For QLoRA only the adapters
train (a few MB of gradients), so overlapping their all-reduce with the backward buys little; what matters is that
each rank keeps its graphed forward and backward. :class:`QLoRADDPStrategy` therefore does not wrap the module:

* at setup the trainable parameters are broadcast from rank 0 (what DDP's constructor does), so every rank starts
  from the same adapters;
* after each optimizer step's closure (forward and backward of the step's last micro-batch, under accumulation
  after all of them) the gradients of all trainable parameters are combined over the ranks in one flat all-reduce
  (:meth:`GradientBucket.all_reduce`), before clipping and the optimizer see them, each rank weighted by its share of the
  step's labelled tokens: the gradient of one process holding every rank's batch (torch's DDP takes the plain mean
  of the ranks' mean losses, which weighs a token of a short batch more than one of a long batch).

Everything else is Lightning's DDP: launching, process groups, samplers, checkpointing by rank 0, metric reduction.
The CLI's ``--trainer.strategy ddp`` picks this strategy; the plan then keeps CUDA graphs and compiled layers
(:func:`lit_llama_lab.train.plan.resolve`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train, in module order (the same order on every rank)."""
    return [p for p in module.parameters() if p.requires_grad]


def _in_flat_buffers(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """Run ``collective`` on one flat buffer per dtype holding ``tensors`` back to back, then copy the buffer back
    into them: one collective call per dtype instead of one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        views, offset = [], 0
        for t in group:
            views.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        torch._foreach_copy_(group, views)  # one multi-tensor copy, not one kernel launch per tensor


class GradientBucket:
    """One fp32 buffer for the gradients of ``params`` back to back, plus one slot for this rank's weight, with
    its views made once: each step copies the gradients in (one multi-tensor copy), all-reduces the buffer in one
    call and copies back. Made per step, the buffer and its views cost a Python slice per parameter (420 for the
    emoji adapters): milliseconds of host time in a step of tens of milliseconds.

    fp32 whatever the parameters' dtype, so the token weighting of :meth:`all_reduce` is exact for bf16 adapters
    too."""

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.flat = torch.zeros(total + 1, dtype=torch.float32, device=device)
        self.body, self.weight = self.flat[:total], self.flat[total:]
        self.views, offset = [], 0
        for p, n in zip(self.params, sizes, strict=True):
            self.views.append(self.flat[offset:offset + n].view(p.shape))
            offset += n

    def all_reduce(self, group=None, weight: float | None = None) -> None:
        """Combine the parameters' ``.grad`` over the ranks of ``group`` in one all-reduce (a parameter without a
        gradient contributes zeros, so every rank makes the same collective calls).

        Without ``weight``: the mean over the ranks, as DDP. With ``weight`` (this rank's labelled tokens in the
        step): each rank's gradient of its mean loss counts by its share of all ranks' tokens,
        ``sum_r w_r g_r / sum_r w_r``: the gradient of the mean over every token of the step, what one process with
        the combined batch computes (the weight rides in the same all-reduce; no host sync)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        if world == 1 or not self.params:
            return
        grads = []
        for p in self.params:
            if p.grad is None:  # a parameter the step did not reach: zeros, so every rank makes the same call
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        torch._foreach_copy_(self.views, grads)
        if weight is None:
            dist.all_reduce(self.body, group=group)
            self.body.div_(world)
        else:
            # this rank's tokens times its gradient, the tokens in the last slot, summed over the ranks in one call.
            # The weight reaches the GPU only as a kernel argument (a multiply, a fill): copying a host value to the
            # GPU would wait for every queued kernel, a host sync in every step.
            w = float(weight)
            self.body.mul_(w)
            self.weight.fill_(w)
            dist.all_reduce(self.flat, group=group)
            self.body.div_(self.weight.clamp(min=1.0))
        torch._foreach_copy_(grads, self.views)


def broadcast_parameters(params: Iterable[torch.nn.Parameter], src: int = 0, group=None) -> None:
    """Copy ``params`` from rank ``src`` to every rank (one flat broadcast per dtype)."""
    import torch.distributed as dist

    with torch.no_grad():
        _in_flat_buffers(list(params), lambda flat: dist.broadcast(flat, src, group=group))


class QLoRADDPStrategy(DDPStrategy):
    """Lightning's DDP without the ``DistributedDataParallel`` wrapper: each rank runs the single-process step
    (CUDA graphs, compiled layers), and the trainable parameters' gradients are averaged once per optimizer step.

    Args:
        token_weighted: weigh each rank's gradient by its share of the step's labelled tokens
            (:meth:`GradientBucket.all_reduce`), so N processes compute the gradient of one process holding all N
            batches, whatever their lengths; ``False``: the plain mean over the ranks, as torch's DDP. Exact for the
            cross-entropy of one micro-batch a step; the KL term's own token count and gradient accumulation (a mean
            of micro-batch means, as on one GPU) are weighted by the same labelled tokens.

    Also takes :class:`~lightning.pytorch.strategies.DDPStrategy`'s arguments; DDP-wrapper options (``static_graph``,
    ``find_unused_parameters``, communication hooks) do not apply and are refused.
    """

    strategy_name = "qlora_ddp"

    def __init__(self, *args: Any, token_weighted: bool = True, **kwargs: Any) -> None:
        wrapper_only = {"ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period",
                        "static_graph", "find_unused_parameters", "gradient_as_bucket_view"}
        refused = sorted(k for k in set(kwargs) & wrapper_only if kwargs[k] not in (None, False))  # set, not defaulted
        if refused:
            raise ValueError(f"QLoRADDPStrategy does not wrap the model in DistributedDataParallel, so {refused} "
                             "do not apply: drop them, or pass Lightning's DDPStrategy object to train eagerly with "
                             "the wrapper.")
        super().__init__(*args, **kwargs)
        self.token_weighted = token_weighted
        self._bucket: GradientBucket | None = None  # the trainable parameters and their gradient buffer

    def configure_ddp(self) -> None:
        """No wrapper: find the trainable parameters (once a fit: a resume copies into them) and start every rank
        from rank 0's."""
        self._bucket = GradientBucket(trainable(self.model))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            broadcast_parameters(self._bucket.params)

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """The step, with the gradients averaged over the ranks right after ``closure``'s backward."""

        def closure_then_average() -> Any:
            loss = closure()
            tokens = getattr(self.lightning_module, "labelled_since_step", None)  # QLoRAModule counts them on the CPU
            self._bucket.all_reduce(weight=tokens if self.token_weighted else None)
            return loss

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)


def is_wrapping(strategy: object) -> bool:
    """True when ``strategy`` trains several processes through a module wrapper whose backward hooks synchronize
    (Lightning's own DDP, DeepSpeed, ...): CUDA graphs and compiled layers are then off. False for one process,
    for :class:`QLoRADDPStrategy` and for FSDP (which the plan handles on its own)."""
    from lightning.pytorch.strategies import ParallelStrategy

    from lit_llama_lab.model.fsdp import is_fsdp

    if strategy is None or isinstance(strategy, QLoRADDPStrategy) or is_fsdp(strategy):
        return False
    return isinstance(strategy, ParallelStrategy) and getattr(strategy, "world_size", 1) > 1
