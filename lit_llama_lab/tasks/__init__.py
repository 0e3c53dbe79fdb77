"""Tasks: plug-ins the generic code asks instead of special-casing them (:mod:`.registry`).

A task (:class:`.task.Task`) may bring a data format (rows → chats), a built-in data source, sample questions for
training, an evaluation and an export-verification suite. Built in: :mod:`.emoji` (name the emoji) and
:mod:`.general_eval` (the general-ability suite of :mod:`.general`: does the tuned model still chat).
"""
