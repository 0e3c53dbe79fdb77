"""The ``lit-llama-lab`` console script: a multi-GPU fit's other ranks start (:mod:`lit_llama_lab.launch`) before
:mod:`lit_llama_lab.cli` imports torch and Lightning."""

from lit_llama_lab.launch import start_ranks_early


def main() -> None:
    """Entry point of the ``lit-llama-lab`` console script: the other ranks first, then the CLI."""
    start_ranks_early()
    from lit_llama_lab.cli import main as cli_main

    cli_main()
