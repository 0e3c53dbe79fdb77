"""The base model: which form a name is (:mod:`.source`), the HF folder it loads from (:mod:`.folders`, :mod:`.hub`),
its special tokens (:mod:`.tokens`), its numerics (:mod:`.precision`), loading it in 4-bit (:mod:`.load`), adapter
folders (:mod:`.adapters`), its FSDP units (:mod:`.fsdp`) and random Llama 3 models for the GGUF proofs
(:mod:`.random_llama3`)."""
