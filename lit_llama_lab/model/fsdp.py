"""FSDP for QLoRA: how the model is split into FSDP units, and how full adapter weights are gathered back.

Lightning's ``FSDPStrategy`` (torch FSDP1, ``use_orig_params=True``) wraps the LightningModule as the root unit.
:func:`wrap_for_fsdp`, called by the training setup (:func:`lit_llama_lab.train.build.build`), first makes every adapter leaf (``lora_A``,
``lora_B``…) and every decoder layer a unit of its own, as the Answer.AI / Hugging Face FSDP-QLoRA recipe does:

* FSDP1 flattens the parameters of a unit into one tensor, which needs one dtype. A decoder layer holds its 4-bit
  weights (``Params4bit`` in the ``quant_storage`` dtype) and its norms (compute dtype): hence ``quant_storage`` equal
  to the compute dtype. peft keeps adapters in float32, so they get units of their own.
* Adapters live in their own small units, so gathering them for a checkpoint moves adapter bytes only.

Checkpoint keys are the single-device ones (FSDP's ``_fsdp_wrapped_module.`` prefixes removed), so a checkpoint moves
between strategies and device counts.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_fsdp(strategy: object) -> bool:
    """True for Lightning's FSDPStrategy (``--trainer.strategy fsdp``) and its subclasses."""
    return isinstance(strategy, FSDPStrategy)


def check_strategy(strategy: object) -> None:
    """Refuse Lightning's plain FSDPStrategy: it would gather the whole 4-bit base into every checkpoint and number
    optimizer states over frozen parameters too. QLoRAFSDPStrategy (``--trainer.strategy fsdp`` in the CLI) fixes both.
    """
    if type(strategy) is FSDPStrategy:
        raise ValueError(
            "Use lit_llama_lab.model.fsdp.QLoRAFSDPStrategy() instead of Lightning's FSDPStrategy for a QLoRAModule "
            "(the CLI's --trainer.strategy fsdp picks it)."
        )


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpoint wrapper prefixes: the single-device name."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _is_adapter_leaf(module: nn.Module) -> bool:
    return not list(module.children()) and any(p.requires_grad for p in module.parameters(recurse=False))


def _is_decoder_layer(module: nn.Module) -> bool:
    return type(module).__name__.endswith("DecoderLayer")


def wrap_for_fsdp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap adapter leaves, then decoder layers, as FSDP units, bottom up; returns ``module`` (changed in place).

    Must run inside Lightning's ``model_sharded_context`` (``configure_model`` under FSDPStrategy): torch's ``wrap``
    takes the strategy's FSDP settings from there, and is a no-op outside it. ``device`` is the rank's device.
    """
    from torch.distributed.fsdp.wrap import wrap

    for name, child in list(module.named_children()):
        wrap_for_fsdp(child, device)
        if _is_adapter_leaf(child) or _is_decoder_layer(child):
            setattr(module, name, wrap(child, device_id=device))
    return module


def _adapter_units(module: nn.Module):
    """``(prefix, unit)`` for each FSDP unit around an adapter leaf, in module order (the same on all ranks)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for prefix, unit in module.named_modules():
        if isinstance(unit, FSDP) and _is_adapter_leaf(unit.module):
            yield prefix, unit


def gather_adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable weights on CPU, keyed as on a single device. Collective under FSDP: every rank calls it.

    Without FSDP these are the parameters themselves. Under FSDP each adapter unit is gathered on its own, so the
    frozen 4-bit base never moves. Raises if a trainable parameter is not in an adapter unit (e.g. the model was
    wrapped by another policy), since its gathered value would be missing.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    trainable = {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}
    if not any(isinstance(m, FSDP) for m in module.modules()):
        return {clean_name(n): p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    gathered = {}
    for prefix, unit in _adapter_units(module):
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for name, param in unit.module.named_parameters():
                gathered[clean_name(f"{prefix}.{name}")] = param.detach().cpu().clone()
    if set(gathered) != trainable:
        missing = sorted(trainable - set(gathered))
        raise RuntimeError(f"{len(missing)} trainable parameters are outside FSDP adapter units, e.g. {missing[:1]}")
    return gathered


class QLoRAFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1, ``use_orig_params=True``) for a QLoRAModule; ``--trainer.strategy fsdp``.

    Differences from FSDPStrategy:

    * Checkpoints hold the adapter weights only, gathered unit by unit (:func:`gather_adapter_state_dict`) and keyed
      as on one device. FSDPStrategy would gather the whole 4-bit base into every checkpoint and drop it again.
    * The root unit gets ``device_id=root_device``, so it also runs on CPU processes over gloo (tests, debugging).
      FSDPStrategy passes ``device_id=None`` on CPU, which torch's FSDP reads as "no accelerator".
    * The module keeps the plan's dtypes (no cast to float32 under ``32-true``), and ``gradient_clip_val`` clips the
      global norm over the shards.
    """

    strategy_name = "qlora_fsdp"

    def setup(self, trainer) -> None:
        """FSDPStrategy's setup without its precision plugin's ``convert_module``: under ``32-true`` it casts the whole
        module to float32, which on a GPU turns the bf16 embeddings, norms and vocabulary projection of the plan into
        float32 weights that the bf16 hidden states then meet (measured on 2 H200: "expected mat1 and mat2 to have the
        same dtype"). The model's dtypes are the plan's (:func:`lit_llama_lab.train.build.build`)."""
        plugin = self.precision_plugin
        plugin.convert_module = lambda module: module  # this instance only
        try:
            super().setup(trainer)
        finally:
            del plugin.convert_module

    @property
    def mixed_precision_config(self):
        """FSDP's MixedPrecision only when given explicitly (``mixed_precision=``). Lightning derives one from its
        precision plugin, under ``32-true`` float32 for parameters, so every unit would gather the plan's bf16 weights
        as float32 (the vocabulary projection among them); the plan already decides each weight's dtype."""
        return self.mixed_precision

    def clip_gradients_by_norm(self, max_norm: float) -> None:
        """Clip the global gradient norm over all shards (FSDP's ``clip_grad_norm_`` of the root unit, collective):
        what one process clipping the whole gradient does. Lightning's FSDP precision plugin refuses norm clipping;
        :meth:`lit_llama_lab.train.module.QLoRAModule.configure_gradient_clipping` calls this instead."""
        self.model.clip_grad_norm_(max_norm)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(model, FSDP):
            kwargs = {k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"}
            model = FSDP(model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                         sharding_strategy=self.sharding_strategy, device_id=self.root_device, **kwargs)
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights, full, on every rank (collective)."""
        return gather_adapter_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer) -> dict:
        """The full optimizer state on rank 0 (empty elsewhere), keyed 0, 1, … over the trainable parameters as a
        single-device optimizer is (FSDPStrategy would number all parameters, frozen ones included)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap LightningOptimizer
        with _full_state_dict_type(self.model, rank0_only=True):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank != 0:
            return state
        return key_optimizer_state(state, {name: i for i, name in enumerate(self.trainable_names())})

    def load_optimizer_state_dict(self, checkpoint: dict) -> None:
        """Load each optimizer's state from a checkpoint of any strategy or device count (collective)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            named = key_optimizer_state(state, dict(enumerate(self.trainable_names())))
            with _full_state_dict_type(self.model, rank0_only=False):
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, named))

    def load_model_state_dict(self, checkpoint: dict, strict: bool = True) -> None:
        """Load the adapter weights of a checkpoint into the sharded model (collective)."""
        with _full_state_dict_type(self.model, rank0_only=False):
            self.model.load_state_dict(checkpoint["state_dict"], strict=False)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Read a single-file checkpoint on every rank (adapter checkpoints are small)."""
        return self.checkpoint_io.load_checkpoint(self.broadcast(checkpoint_path), weights_only=weights_only)

    def trainable_names(self) -> list[str]:
        """The trainable parameters' single-device names, in the optimizer's order."""
        return [clean_name(n) for n, p in self.lightning_module.named_parameters() if p.requires_grad]


def key_optimizer_state(state: dict, mapping: dict) -> dict:
    """``state`` (a torch optimizer state dict) with each parameter key ``k`` replaced by ``mapping[k]``, keys that
    are already values of ``mapping`` kept, and each group's parameters in key order.

    Single-device checkpoints number the trainable parameters 0, 1, … in the optimizer's order; FSDP names them.
    """
    rekey = {**{v: v for v in mapping.values()}, **mapping}
    order = {key: i for i, key in enumerate(mapping.values())}
    groups = [{**group, "params": sorted((rekey[k] for k in group["params"]), key=order.__getitem__)}
              for group in state["param_groups"]]
    return {"state": {rekey[key]: value for key, value in state["state"].items()}, "param_groups": groups}


def _full_state_dict_type(model: nn.Module, rank0_only: bool):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # on CPU, "offloading" a gathered optimizer state is a no-op .cpu() of torch's reused all-gather buffer: every
    # state of a unit would come back as the last one gathered (exp_avg as exp_avg_sq); CPU ranks keep the gather
    offload = next(model.parameters()).device.type != "cpu"
    return FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))
