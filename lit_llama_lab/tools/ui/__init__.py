"""The inference UI: Gradio chat (app.py), speech to text (asr.py), model discovery and LRU (registry.py)."""
