"""The ``lit-llama-lab`` command: LightningCLI's fit/validate/test, plus evaluate, export, ui and bench."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import typing

# Hub libraries must never reach for the network unless the user asks for a hub id with the network on.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lit_llama_lab.data.datamodule import ChatDataModule  # noqa: E402
from lit_llama_lab.train.module import QLoRAModule  # noqa: E402

FSDP_STRATEGY = "lit_llama_lab.model.fsdp.QLoRAFSDPStrategy"
DDP_STRATEGY = "lit_llama_lab.train.ddp.QLoRADDPStrategy"
STRATEGIES = {"fsdp": FSDP_STRATEGY, "ddp": DDP_STRATEGY}  # names the CLI maps to this project's strategies
EARLY_LAUNCHERS: list = []  # launchers of ranks started before trainer.fit (launch_ranks_early), to stop on failure
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
        if self.subcommand == "fit" and config is not None:
            self.early_launcher = launch_ranks_early(config)

    def before_fit(self) -> None:
        """Refuse at once, before data and model load, a fit into a folder holding another run's checkpoints."""
        from lit_llama_lab.train.callbacks.checkpoint import AdapterCheckpoint

        launcher = getattr(self, "early_launcher", None)
        if launcher is not None:  # the ranks started already; Lightning's launcher would have started them only now
            self.trainer.strategy._launcher = launcher
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


def launched_devices(devices) -> int:
    """How many processes ``--trainer.devices`` asks for on one node when that is clear from the value alone (an
    int, a count as a string, a list or a comma list of device ids); 0 for ``auto``, ``-1`` and anything else."""
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text)
        ids = [part for part in text.split(",") if part.strip()]
        return len(ids) if len(ids) > 1 and all(part.strip().isdigit() for part in ids) else 0
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return devices if isinstance(devices, int) and devices > 0 else 0


def launch_ranks_early(config):
    """Start ranks 1..N-1 of a one-node ``--trainer.strategy ddp`` or ``fsdp`` fit now, before this process builds
    its trainer, data and model; return the launcher, which then goes to the strategy (:meth:`LabCLI.before_fit`).

    Lightning's subprocess launcher starts them only when rank 0 reaches ``trainer.fit``, after its imports, parsing and
    instantiation; rank 0 then waits at the process group while rank 1 does all of that again (16 s of a 121 s emoji
    fit on 2 H200). This is the same launcher, called earlier: the same command line, the same environment variables
    (``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``NODE_RANK``), its watcher that stops every rank
    when one fails. Nothing happens inside a launched rank, under torchrun, SLURM or another cluster environment, on
    several nodes, or when the device count is ``auto`` (Lightning's launcher then starts the ranks as usual)."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    strategy = config.get("trainer.strategy")
    class_path = getattr(strategy, "class_path", None)
    count = launched_devices(config.get("trainer.devices"))
    nodes = config.get("trainer.num_nodes") or 1
    external = ("LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect() or SLURMEnvironment.detect()
                or LSFEnvironment.detect() or MPIEnvironment.detect())
    if class_path not in STRATEGIES.values() or count < 2 or nodes != 1 or external:
        return None
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=count, num_nodes=1)
    launcher.launch(lambda: None)
    EARLY_LAUNCHERS.append(launcher)
    print(f"Started ranks 1-{count - 1} of {count} before building the trainer, data and model "
          f"(pids {' '.join(str(p.pid) for p in launcher.procs)}).", file=sys.stderr)
    return launcher


def stop_early_ranks() -> None:
    """Stop the ranks :func:`launch_ranks_early` started (rank 0 failed before ``trainer.fit``, where Lightning's
    own handler would have stopped them): otherwise they would wait for it at the process group until its timeout."""
    for launcher in EARLY_LAUNCHERS:
        for proc in launcher.procs:
            if proc.poll() is None:
                proc.kill()


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
    try:
        LabCLI(
            QLoRAModule,
            ChatDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except BaseException as error:
        if not (isinstance(error, SystemExit) and error.code in (0, None)):
            stop_early_ranks()
        raise


if __name__ == "__main__":
    main()
