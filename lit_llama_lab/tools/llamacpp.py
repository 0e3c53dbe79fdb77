"""Run an exported GGUF in llama.cpp itself (through llama-cpp-python): its tokenizer, its chat template, its kernels.

:class:`LlamaCppModel` answers chats the way a llama.cpp user's program does: the chat template stored in the GGUF
is rendered by llama-cpp-python's own Jinja formatter, the prompt is tokenized by llama.cpp, and greedy decoding
stops at a token llama.cpp counts as end-of-generation. Handed to :func:`lit_llama_lab.generation.generate` in place
of a transformers model, it runs any scoring built on ``generate`` (the emoji evaluation, other suites) in llama.cpp.

llama-cpp-python is optional: ``make test-llamacpp`` builds it from source (CPU) into the virtualenv.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lit_llama_lab.generation import Chat, Generation

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "llama-cpp-python is not installed: run `make test-llamacpp` (builds llama-cpp-python 0.3.36 from source into "
    "the virtualenv, about 10 minutes on 2 cores, then runs the llama.cpp proofs)"
)


def llama_cpp_available() -> bool:
    """True when ``llama_cpp`` (llama-cpp-python) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_usable() -> bool:
    """True when llama-cpp-python is installed and built so that it can run quantized files (see
    :func:`check_build`); logs why not otherwise."""
    if not llama_cpp_available():
        return False
    try:
        check_build(require_llama_cpp())
    except RuntimeError as error:
        log.warning("%s", error)
        return False
    return True


def require_llama_cpp():
    """Import and return ``llama_cpp``, or raise ``ModuleNotFoundError`` naming ``make test-llamacpp``."""
    if not llama_cpp_available():
        raise ModuleNotFoundError(INSTALL_HINT)
    # llama.cpp's OpenMP threads spin-wait by default; beside torch's own thread pool on a small CPU that made prompt
    # evaluation about 40x slower (13.7 s against 0.3 s for one prompt on 2 cores). Passive waiting costs nothing
    # measurable here. Read when llama.cpp's OpenMP runtime starts, so set before the import; a user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    return llama_cpp


def check_build(llama_cpp) -> None:
    """Refuse a llama.cpp built with AMX kernels: on this project's CPUs (AMX-INT8) its weight repacking crashes the
    process (segfault) on the first Q8_0/Q4_x matmul, even for GGUF files llama.cpp made itself."""
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        raise RuntimeError(
            "This llama-cpp-python was built with AMX (GGML_NATIVE=ON on an AMX CPU); its AMX weight repacking "
            "segfaults on quantized GGUF files. Rebuild it without AMX: `rm -f .venv/.llamacpp && make test-llamacpp` "
            "(CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON')."
        )


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, on the CPU.

    Args:
        path: the ``.gguf`` file.
        n_ctx: context window in tokens (prompt + answer).
        logits: keep every position's logits (needed by :meth:`logits` and :meth:`reference_nll`).
        n_threads: CPU threads; default: torch's thread count.
    """

    def __init__(self, path: str | Path, n_ctx: int = 1024, logits: bool = True, n_threads: int | None = None):
        llama_cpp = require_llama_cpp()
        check_build(llama_cpp)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {str(self.path)!r} does not exist.")
        threads = n_threads or torch.get_num_threads()
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   logits_all=logits, verbose=False, seed=0)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._lib = llama_cpp
        self.metadata = dict(self.llm.metadata)
        self.training = False

    @property
    def pre_tokenizer(self) -> str | None:
        """The ``tokenizer.ggml.pre`` llama.cpp loaded (``llama-bpe``, ``smollm``…)."""
        return self.metadata.get("tokenizer.ggml.pre")

    def token_text(self, token_id: int) -> str:
        """A token's text as llama.cpp's vocabulary holds it (special tokens included)."""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's ids for ``text``, special tokens in the text parsed; bos added as the GGUF says when
        ``add_special`` (the counterpart of ``tokenizer(text).input_ids``)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def is_end_of_generation(self, token_id: int) -> bool:
        """Whether llama.cpp stops at ``token_id`` (eos, eot and the other end-of-generation tokens it knows)."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token_id))

    def chat_prompt(self, chat: Chat) -> str:
        """``chat`` rendered with the GGUF's own chat template by llama-cpp-python's formatter, assistant prompt on."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path.name} holds no chat template (tokenizer.chat_template): it cannot chat.")
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        formatter = Jinja2ChatFormatter(template=template, eos_token=self.token_text(eos) if eos >= 0 else "",
                                        bos_token=self.token_text(bos) if bos >= 0 else "")
        return formatter(messages=list(chat)).prompt

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits ``[len(ids), vocab]`` of every position of ``ids``, from an empty context."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def answer(self, chat: Chat, max_new_tokens: int) -> Generation:
        """Greedy answer to ``chat``: tokens until an end-of-generation token or ``max_new_tokens``."""
        prompt = self.tokenize(self.chat_prompt(chat), add_special=False)  # the template writes bos itself
        self.llm.reset()
        new: list[int] = []
        stopped = False
        for token in self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            if self.is_end_of_generation(token):
                stopped = True
                break
            new.append(token)
            if len(new) >= max_new_tokens:
                break
        text = self.llm.detokenize(new, special=False).decode("utf-8", errors="replace").strip()
        return Generation(text, new, stopped)

    def answer_chats(self, chats: Sequence[Chat], max_new_tokens: int = 64, temperature: float = 0.0,
                     **_: object) -> list[Generation]:
        """:func:`lit_llama_lab.generation.generate`'s contract, greedy only (``temperature`` must be 0)."""
        if temperature > 0:
            raise ValueError("LlamaCppModel answers greedily only (temperature 0).")
        return [self.answer(chat, max_new_tokens) for chat in chats]

    def reference_nll(self, ids: Sequence[int], labels: Sequence[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of the labelled next tokens of ``ids`` (label -100 = unscored)."""
        scores = self.logits(ids).astype(np.float64)
        total, count = 0.0, 0
        for position in range(1, len(ids)):
            if labels[position] != -100:
                row = scores[position - 1]
                log_z = row.max() + math.log(np.exp(row - row.max()).sum())
                total += log_z - row[labels[position]]
                count += 1
        return total, count

    def parameters(self):
        """One empty CPU tensor, for code that asks a model which device it is on."""
        yield torch.zeros(0)

    def eval(self) -> LlamaCppModel:
        """No-op (llama.cpp has no training mode); returns self."""
        return self

    def train(self, mode: bool = True) -> LlamaCppModel:
        """No-op; returns self."""
        return self

    def close(self) -> None:
        """Free llama.cpp's model and context."""
        self.llm.close()


def load_gguf_tokenizer(path: str | Path):
    """The transformers tokenizer of a GGUF (for the reference answers' perplexity), special tokens fixed: the export's
    own when the GGUF lies in an export folder, else the one transformers builds from the GGUF."""
    from transformers import AutoTokenizer

    from lit_llama_lab.model.tokens import fix_special_tokens

    path = Path(path)
    export_folder = path.parent.parent  # an export's gguf/ subfolder: its HF tokenizer is the one trained with
    if (export_folder / "export.json").is_file() and (export_folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(export_folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    fix_special_tokens(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def load_llamacpp(path: str | Path, n_ctx: int = 1024):
    """``(LlamaCppModel, transformers tokenizer)`` for a .gguf path, as evaluation's loaders return pairs."""
    if Path(path).suffix.lower() != ".gguf":
        raise ValueError(f"The llama.cpp runtime runs GGUF files; {str(path)!r} is none: pass a path to a .gguf file.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return LlamaCppModel(path, n_ctx=n_ctx), load_gguf_tokenizer(path)


RUNTIMES = ("transformers", "llamacpp")


def check_runtime(models: Sequence[str], runtime: str) -> None:
    """Fail before any loading: an unknown runtime, llama.cpp without llama-cpp-python, or a non-GGUF model for it."""
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}: use {' or '.join(RUNTIMES)}.")
    if runtime == "llamacpp":
        require_llama_cpp()
        bad = [m for m in models if Path(m).suffix.lower() != ".gguf"]
        if bad:
            raise ValueError(f"The llama.cpp runtime runs .gguf files only, not {bad}: pass exported GGUF paths "
                             "(<export>/gguf/<name>-<type>.gguf) or use --runtime transformers.")


def load_for_runtime(name: str, runtime: str = "transformers", quantize: str | None = None):
    """``(model, tokenizer)`` ready for :func:`~lit_llama_lab.generation.generate`: transformers'
    :func:`~lit_llama_lab.model.load.load_for_inference`, or a :class:`LlamaCppModel` for a .gguf."""
    if runtime == "llamacpp":
        return load_llamacpp(name)
    from lit_llama_lab.model.load import load_for_inference

    return load_for_inference(name, quantize=quantize)
