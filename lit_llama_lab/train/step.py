"""The loss of one training batch, as training computes it: the one step Lightning training and the bench run."""

from __future__ import annotations

from functools import partial

import torch

from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.speed.attention import attention_inputs
from lit_llama_lab.speed.distill import TeacherCache, distilled_label_loss
from lit_llama_lab.speed.graphs import GraphedLoss
from lit_llama_lab.speed.loss import chunked_label_loss, fast_label_loss, label_loss
from lit_llama_lab.train.plan import Plan


class TrainStep:
    """``step(batch) -> loss``: mean next-token cross-entropy over the labelled tokens of a neutral batch (plus
    ``distill_weight`` × KL to the frozen base on replay tokens when the batch has a ``distill_mask``).

    With the plan's CUDA graphs the batch's rows are padded to a multiple of ``graph_pad_multiple`` tokens, the loss
    has fixed shapes (:func:`lit_llama_lab.speed.loss.fast_label_loss`) and its forward and backward replay from
    a graph per batch shape (:class:`lit_llama_lab.speed.graphs.GraphedLoss`). Otherwise logits are computed at
    labelled positions only, in chunks (:func:`lit_llama_lab.speed.loss.chunked_label_loss`). Both compute the same
    loss, its chunks compiled when the plan compiles the layers. The batch gets the plan's attention inputs
    (:func:`lit_llama_lab.speed.attention.attention_inputs`); a packed batch without the data module's
    ``max_documents`` bound, or with shared prefixes (``--data.share_prefix``), trains a varlen plan through the sdpa
    mask (the varlen function's fallback), as validation does.
    """

    def __init__(self, model, plan: Plan, pad_id: int, distill_weight: float = 0.0) -> None:
        self.model, self.plan, self.pad_id, self.distill_weight = model, plan, pad_id, distill_weight
        self.graphed: GraphedLoss | None = None
        self.teacher: TeacherCache | None = None  # the base's states on the replay chats, once (set by the module)

    def cache_teacher(self, examples: list[list[int]]) -> TeacherCache:
        """Run the base over the replay chats ``examples`` once (:class:`TeacherCache`); later steps read the KL
        targets from it instead of running the base."""
        self.teacher = TeacherCache.build(self.model, examples, self.pad_id, self.plan.eval_attention,
                                          self.plan.compute_dtype)
        return self.teacher

    def inputs(self, batch: dict) -> dict:
        """``batch`` with the attention inputs the plan's training attention takes."""
        attention = self.plan.attention
        if attention == "varlen" and ("max_documents" not in batch or "prefix_lengths" in batch):
            attention = self.plan.eval_attention
        return attention_inputs(batch, attention, self.plan.compute_dtype)

    def __call__(self, batch: dict) -> torch.Tensor:
        distill = self.distill_weight > 0 and "distill_mask" in batch
        cached = distill and self.teacher is not None and "replay_ids" in batch
        teacher = self.teacher.table if cached else None
        if distill:
            loss_fn = partial(distilled_label_loss, weight=self.distill_weight, teacher=teacher,
                              fixed_shapes=self.plan.cuda_graphs, compiled=self.plan.compile)
        else:
            loss_fn = partial(fast_label_loss, compiled=self.plan.compile)
        if self.plan.cuda_graphs:
            if "prefix_lengths" in batch:
                raise ValueError("--data.share_prefix batches are not trained under CUDA graphs (their shared "
                                 "prefixes need a mask attention, a GPU trains faster with varlen and no sharing): "
                                 "set --data.share_prefix false, or --model.speed.cuda_graphs false.")
            if self.graphed is None:
                self.graphed = GraphedLoss(self.model, loss_fn)
            batch = pad_packed_batch(batch, self.plan.graph_pad_multiple, self.pad_id)
            return self.graphed(self.with_teacher_index(self.inputs(batch), cached))
        inputs = self.with_teacher_index(self.inputs(batch), cached)
        if distill:
            return loss_fn(self.model, inputs)
        return chunked_label_loss(self.model, inputs, compiled=self.plan.compile)

    def with_teacher_index(self, batch: dict, cached: bool) -> dict:
        """``batch`` plus ``teacher_index`` (:meth:`TeacherCache.index`) when the KL targets come from the cache."""
        return {**batch, "teacher_index": self.teacher.index(batch)} if cached else batch

    def evaluate(self, batch: dict) -> torch.Tensor:
        """The loss as validation computes it (no graphs, the plan's validation attention; the caller sets eval mode
        and ``no_grad``)."""
        inputs = attention_inputs(batch, self.plan.eval_attention, self.plan.compute_dtype)
        return label_loss(self.model, inputs)[0]
