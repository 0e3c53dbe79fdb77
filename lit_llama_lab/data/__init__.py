"""Data: rows (:mod:`.formats`) → chats → assistant-only labels (:mod:`.masking`, :mod:`.tokenize`) → seeded splits
(:mod:`.splits`) → packed batches in one neutral form (:mod:`.packing`), with replay chats (:mod:`.replay`) and a
resumable sampler (:mod:`.sampler`), assembled by :class:`.datamodule.ChatDataModule`. No attention kernel and no task
is named here: tasks plug in through :mod:`lit_llama_lab.tasks.registry`."""
