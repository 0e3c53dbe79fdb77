"""The tools of the ``lit-llama-lab`` command besides training: ``evaluate``, ``export`` (+ ``verify-export``, the
GGUF writer and tokenizer, Ollama Modelfiles, the llama.cpp runtime), ``ui`` and ``bench``."""
