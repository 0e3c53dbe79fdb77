"""The ``lit-llama-lab`` command: LightningCLI's fit/validate/test, plus evaluate, export, ui and bench."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import typing

# Hub libraries must never reach for the network unless the user asks for a hub id with the network on.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":  # python -m lit_llama_lab.cli fit ...: a multi-GPU fit's other ranks start before the imports
    from lit_llama_lab.launch import start_ranks_early

    start_ranks_early()

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lit_llama_lab import launch  # noqa: E402
from lit_llama_lab.data.datamodule import ChatDataModule  # noqa: E402
from lit_llama_lab.launch import STRATEGIES  # noqa: E402  (--trainer.strategy ddp/fsdp: this project's classes)
from lit_llama_lab.train.module import QLoRAModule  # noqa: E402

STOPPED_BY_SIGTERM = 128 + signal.SIGTERM  # the exit status of a run a scheduler stopped: 143, never 0
# Subcommands that are not Trainer methods: name -> "module:function" run through jsonargparse.
TOOLS = {
    "evaluate": "lit_llama_lab.tools.evaluate:evaluate",
    "export": "lit_llama_lab.tools.export:export",
    "verify-export": "lit_llama_lab.tools.export_verify:verify_export_folder",
    "ui": "lit_llama_lab.tools.ui.app:main",
    "bench": "lit_llama_lab.tools.bench:bench",
}


class LabCLI(LightningCLI):
    """LightningCLI with the model's base linked into the data module (its tokenizer, the replay's answering
    model)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        # replay answers come from the model training starts from: base + init_adapter, or the base
        parser.link_arguments(("model.name_or_path", "model.init_adapter"), "data.replay.model",
                              compute_fn=starting_model)
        parser.link_arguments("model.quantize", "data.replay.quantize")

    def before_instantiate_classes(self) -> None:
        """``--trainer.strategy fsdp`` means :class:`lit_llama_lab.model.fsdp.QLoRAFSDPStrategy` (adapter-only
        checkpoints); ``ddp`` means :class:`lit_llama_lab.train.ddp.QLoRADDPStrategy` (each rank keeps CUDA graphs;
        Lightning's wrapper DDP stays available as ``ddp_find_unused_parameters_false`` or a DDPStrategy object)."""
        from jsonargparse import Namespace

        config = self.config.get(self.subcommand) if self.subcommand else self.config
        strategy = config.get("trainer.strategy") if config is not None else None
        if isinstance(strategy, str) and strategy in STRATEGIES:
            config["trainer.strategy"] = Namespace(class_path=STRATEGIES[strategy], init_args=Namespace())

    def before_fit(self) -> None:
        """Refuse at once, before data and model load, a fit into a folder holding another run's checkpoints."""
        from lit_llama_lab.train.callbacks.checkpoint import AdapterCheckpoint

        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, AdapterCheckpoint):
                callback.check_fit(self.trainer, ckpt_path)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; a stop by SIGTERM exits with :data:`STOPPED_BY_SIGTERM` once the checkpoint is written
        (Lightning's SIGTERMException is a SystemExit of status 0, which a scheduler would read as success)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            print(f"Stopped by SIGTERM: exit status {STOPPED_BY_SIGTERM}.", file=sys.stderr)
            raise SystemExit(STOPPED_BY_SIGTERM) from None


def bare_flags(target, args: list[str]) -> list[str]:
    """``--flag`` alone (last, or before another option) means ``--flag=true`` for a ``bool`` parameter of
    ``target``: jsonargparse wants a value. ``--flag true`` and ``--flag false`` pass unchanged."""
    flags = {f"--{name}" for name, hint in typing.get_type_hints(target).items() if hint is bool}
    return [f"{arg}=true" if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("--")) else arg
            for i, arg in enumerate(args)]


def starting_model(name_or_path: str, init_adapter: str | None) -> str:
    """The model training starts from: the init adapter's folder (its base comes with it) or the base."""
    return init_adapter or name_or_path


def run_tool(name: str, args: list[str]) -> None:
    """Run one of :data:`TOOLS` with its own jsonargparse CLI (``--help`` lists its options)."""
    from jsonargparse import auto_cli

    module, function = TOOLS[name].split(":")
    try:
        target = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as error:
        raise SystemExit(f"'{name}' is not available: {error}") from None
    from lit_llama_lab.tools.export_verify import ExportVerificationError

    try:
        auto_cli(target, args=bare_flags(target, args), as_positional=False)
    except ExportVerificationError as error:  # a verdict, not a crash: the message, exit status 1
        raise SystemExit(f"error: {error}") from None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-llama-lab`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        run_tool(argv[0], argv[1:])
        return
    launch.watch_started_ranks()  # ranks started before the imports (lit_llama_lab.launch) stop with a failing one
    try:
        LabCLI(
            QLoRAModule,
            ChatDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except BaseException as error:
        if not (isinstance(error, SystemExit) and error.code in (0, None)):
            launch.stop_started_ranks()  # rank 0 failed before the process group: they would wait for it there
        raise


if __name__ == "__main__":
    main()
