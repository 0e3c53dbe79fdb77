"""Evaluation tasks beyond the emoji splits: the offline general-ability suite (:mod:`lit_llama_lab.tasks.general`)."""
