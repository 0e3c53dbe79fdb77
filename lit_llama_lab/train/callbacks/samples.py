"""SampleGenerations: greedy answers to a few fixed prompts after every validation, as a TensorBoard text table."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_llama_lab.generation import generate
from lit_llama_lab.model.fsdp import is_fsdp

# Ordinary questions beside the task's: a tuned model that answers them with the task's template (template leakage)
# shows here while it trains. None is in the general evaluation suite or the replay pool.
DEFAULT_PROMPTS = ["Who painted the Mona Lisa?", "What is 15 plus 27?", "Give me two tips for a job interview."]


def markdown_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("prompt", "answer")) -> str:
    """A Markdown table of two columns; ``|`` and line breaks inside cells are escaped."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", "<br>") or " "

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {cell(a)} | {cell(b)} |" for a, b in rows]
    return "\n".join(lines)


def task_questions(task: str | None, items: list[str] | None) -> list[str]:
    """The sample questions of ``task`` (about ``items`` when given); none without a task."""
    if task is None:
        if items:
            raise ValueError("SampleGenerations items need a task to ask about them (e.g. task: emoji).")
        return []
    from lit_llama_lab.tasks.registry import get_task

    found = get_task(task)
    if found.sample_questions is None:
        raise ValueError(f"The task {task!r} has no sample questions; leave task unset and give prompts.")
    return found.sample_questions(items)


class SampleGenerations(Callback):
    """After each validation (not the sanity check), answer the task's sample questions and each free prompt
    greedily with :func:`lit_llama_lab.generation.generate`; log the table as text ``samples`` to TensorBoard and
    print the last one when fitting ends.

    Args:
        task: a task whose sample questions are asked first (:mod:`lit_llama_lab.tasks.registry`; ``emoji`` asks
            "What is {e}?" for a few emoji); unset: none.
        items: what the task's questions are about instead of its own (``emoji``: the emoji to ask about).
        prompts: free prompts asked as they are (default: :data:`DEFAULT_PROMPTS`, ordinary questions that show
            whether the model still chats; ``[]`` for none).
        max_new_tokens: answer length cap (generation runs on the training device; keep it small).
        every_n_validations: generate after every n-th validation only (each costs seconds of eager decoding), and
            always after the last one of the run.
    """

    def __init__(self, task: str | None = None, items: list[str] | None = None, prompts: list[str] | None = None,
                 max_new_tokens: int = 24, every_n_validations: int = 1):
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}.")
        self.every_n_validations = every_n_validations
        self.validations = 0
        self.task_questions = task_questions(task, items)
        self.prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        self.max_new_tokens = max_new_tokens
        self.table: str | None = None
        self.rows: list[tuple[str, str]] = []

    def questions(self) -> list[str]:
        """The user messages asked, in table order."""
        return self.task_questions + self.prompts

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.questions():
            return
        self.validations += 1
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0) > 0 or (
            trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        if self.validations % self.every_n_validations and not last:
            return
        if is_fsdp(trainer.strategy):  # one rank cannot run a sharded model; generate from a checkpoint instead
            rank_zero_warn("SampleGenerations is skipped under FSDP: run `lit-llama-lab ui` on a checkpoint instead.")
            return
        chats = [[{"role": "user", "content": q}] for q in self.questions()]
        answers = generate(pl_module.model, pl_module.tokenizer, chats, max_new_tokens=self.max_new_tokens)
        self.rows = [(q, a.text + ("" if a.stopped else " …")) for q, a in zip(self.questions(), answers, strict=True)]
        self.table = f"step {trainer.global_step}\n\n" + markdown_table(self.rows)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("samples", self.table, global_step=trainer.global_step)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.table:
            print(f"\nSample generations (greedy, {self.max_new_tokens} new tokens at most), {self.table}\n")
