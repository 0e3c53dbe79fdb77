"""``export --verify``: every artefact of an export answers each verification suite (a task's: the emoji test split,
the general-ability suite) as the adapter did.

Each artefact (the merged folder; each GGUF through transformers and, when llama-cpp-python is installed, through
llama.cpp itself) runs every suite; the adapter on its 4-bit base, as trained, is the reference. An artefact fails
when a suite score falls more than ``max_drop`` points below the adapter's, or when fewer than ``min_agreement`` of
its emoji answers are word for word the adapter's (a broken file of an untrained model scores 0 like the adapter,
but answers differently). The table goes into ``export.json``.

A suite is a function ``suite(model, tokenizer, limit, seed) -> {"scores": {name: fraction}, "answers": [...]}``
that answers through :func:`lit_llama_lab.generation.generate` (so every runtime runs it): a task's ``verify``
(:mod:`lit_llama_lab.tasks.registry`, by the task's name), or any function named ``module:function``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Suite = Callable[..., dict]


class ExportVerificationError(RuntimeError):
    """An export whose artefacts answered worse than the adapter; its files are kept, marked unverified."""


def load_suite(name: str) -> Suite:
    """A suite function: a task's ``verify`` by the task's name (``emoji``, ``general``), else ``module:function``."""
    from lit_llama_lab.tasks.registry import get_task, task_names

    if name in task_names("verify"):
        return get_task(name).verify
    module, _, function = name.partition(":")
    if not function:
        raise ValueError(f"Suite {name!r} is neither a task ({', '.join(task_names('verify'))}) nor 'module:function' "
                         "(e.g. lit_llama_lab.tasks.general_eval:general_suite).")
    return getattr(importlib.import_module(module), function)


def exact_answers(suite: str) -> bool:
    """Whether the suite (a task's name) requires answers word for word the adapter's (the task says so)."""
    from lit_llama_lab.tasks.registry import get_task, task_names

    return suite in task_names() and get_task(suite).exact_answers


def artefacts(folder: Path, checkpoint: Path, gguf_files: Sequence[str]) -> list[tuple[str, str, Callable]]:
    """``(name, runtime, loader)`` for the adapter (first: the reference), the merged folder and every GGUF."""
    from lit_llama_lab.model.load import load_for_inference
    from lit_llama_lab.tools.llamacpp import llama_cpp_usable, load_llamacpp

    found = [("adapter", "transformers", lambda: load_for_inference(str(checkpoint), compute_dtype="float32")),
             ("merged", "transformers",
              lambda: load_for_inference(str(folder), quantize="none", compute_dtype="float32"))]
    in_llama_cpp = llama_cpp_usable()
    for name in gguf_files:
        found.append((name, "transformers", lambda name=name: load_gguf_in_transformers(folder, name)))
        if in_llama_cpp:
            found.append((name, "llamacpp", lambda name=name: load_llamacpp(folder / name)))
    return found


def load_gguf_in_transformers(folder: Path, gguf_name: str):
    """The GGUF's weights (dequantized) in transformers, with the export's config and tokenizer: transformers'
    GGUF reader drops Llama 3's rope scaling (``rope_freqs``), so its own config would change the model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lit_llama_lab.model.tokens import fix_special_tokens

    path = folder / gguf_name
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_special_tokens(tokenizer, model)
    tokenizer.padding_side = "left"
    return model, tokenizer


def agreement(answers: Sequence[str], reference: Sequence[str]) -> float:
    """Fraction of ``answers`` identical to ``reference``'s, position by position."""
    return sum(a == b for a, b in zip(answers, reference, strict=True)) / max(len(reference), 1)


def verify_artefacts(folder: Path, checkpoint: Path, gguf_files: Sequence[str], limit: int | None = 200,
                     suites: Sequence[str] = ("emoji",), max_drop: float = 2.0, min_agreement: float = 0.5,
                     seed: int = 42) -> dict:
    """Run ``suites`` on every artefact of the export in ``folder``; return export.json's ``verification`` record.

    Rows: ``artefact``, ``runtime``, ``suite``, the suite's scores (fractions), ``drop_points`` (worst fall below
    the adapter, in points), ``agreement`` (identical answers) and ``ok``. ``verified`` is True when every row is ok.
    """
    loaded_suites = {name: load_suite(name) for name in suites}
    rows, reference = [], {}
    for name, runtime, load in artefacts(folder, checkpoint, gguf_files):
        model, tokenizer = load()
        for suite_name, suite in loaded_suites.items():
            torch.manual_seed(seed)
            result = suite(model, tokenizer, limit, seed)
            reference.setdefault(suite_name, result)
            rows.append(_row(name, runtime, suite_name, result, reference[suite_name], max_drop, min_agreement))
            log.info("verify %s (%s) %s: %s", name, runtime, suite_name, rows[-1])
        if hasattr(model, "close"):
            model.close()
        del model
    return {"sample": limit, "seed": seed, "max_drop_points": max_drop, "min_agreement": min_agreement,
            "rows": rows, "verified": all(r["ok"] for r in rows)}


def _row(name: str, runtime: str, suite: str, result: dict, reference: dict, max_drop: float,
         min_agreement: float) -> dict:
    drops = [100 * (reference["scores"][k] - v) for k, v in result["scores"].items()]
    drop = max([0.0, *drops])
    agree = agreement(result["answers"], reference["answers"])
    ok = drop <= max_drop and (not exact_answers(suite) or agree >= min_agreement)
    return {"artefact": name, "runtime": runtime, "suite": suite, **result["scores"], "drop_points": round(drop, 2),
            "agreement": round(agree, 4), "ok": ok}


def verification_table(record: dict) -> str:
    """The verification rows as a Markdown table (scores in %)."""
    rows = record["rows"]
    score_keys = [k for k in rows[0] if k not in ("artefact", "runtime", "suite", "drop_points", "agreement", "ok")]
    head = ["artefact", "runtime", "suite", *score_keys, "drop (points)", "answers as adapter", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scores = [f"{100 * r[k]:.1f}%" if r.get(k) is not None else "—" for k in score_keys]
        lines.append("| " + " | ".join([r["artefact"], r["runtime"], r["suite"], *scores, f"{r['drop_points']:.1f}",
                                         f"{100 * r['agreement']:.0f}%", "yes" if r["ok"] else "**no**"]) + " |")
    return "\n".join(lines) + "\n"


def record_verification(folder: Path, record: dict) -> None:
    """Add ``record`` to ``folder``'s export.json (``verified`` at the top level too), atomically."""
    from lit_llama_lab.io import write_json

    path = folder / "export.json"
    data = json.loads(path.read_text())
    data["verification"], data["verified"] = record, record["verified"]
    write_json(path, data)


def check_export(folder: Path, checkpoint: Path, gguf_files: Sequence[str], limit: int | None = 200,
                 suites: Sequence[str] | None = None, max_drop: float = 2.0, min_agreement: float = 0.5) -> dict:
    """:func:`verify_artefacts` with the emoji suite first, then ``suites`` (None: the general-ability suite),
    recorded in ``folder``'s export.json and printed."""
    record = verify_artefacts(folder, checkpoint, gguf_files, limit, ["emoji", *(["general"] if suites is None else suites)],
                              max_drop, min_agreement)
    record_verification(folder, record)
    print(f"Verification of {folder.name} ({limit} test emoji each; the adapter is the reference):\n"
          f"{verification_table(record)}")
    return record


def failure_message(folder: Path, record: dict) -> str:
    """What failed and what to do, for :class:`ExportVerificationError`."""
    bad = [f"{r['artefact']} ({r['runtime']}, {r['suite']}: {r['drop_points']:.1f} points down, "
           f"{r['agreement']:.0%} answers as the adapter)" for r in record["rows"] if not r["ok"]]
    return (f"Export {folder} failed verification: {'; '.join(bad)}. Its files are kept and export.json says "
            f"\"verified\": false. Allowed: {record['max_drop_points']} points below the adapter and at least "
            f"{record['min_agreement']:.0%} identical answers (--max_drop, --min_agreement). Re-export (another "
            "--gguf type, or check the base model), or pass a larger --verify_limit if the sample was small.")


def verify_export_folder(output: str, limit: int = 200, suites: list[str] | None = None, max_drop: float = 2.0,
                         min_agreement: float = 0.5) -> dict:
    """Verify an existing export folder again (``lit-llama-lab verify-export --output exports/emoji``).

    Reads the checkpoint and GGUF files from its export.json; raises :class:`ExportVerificationError` (exit 1)
    when an artefact fails. Returns the verification record.

    Args:
        output: the export folder (holding export.json).
        limit: emoji of the test split each artefact answers (a seeded sample).
        suites: extra suites, ``module:function``, besides the emoji one.
        max_drop: largest allowed fall below the adapter on any suite score, in points.
        min_agreement: smallest allowed fraction of emoji answers identical to the adapter's.
    """
    folder = Path(output).expanduser()
    meta_file = folder / "export.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no export.json: pass a folder `lit-llama-lab export` wrote.")
    meta = json.loads(meta_file.read_text())
    record = check_export(folder, Path(meta["checkpoint"]), meta.get("gguf", []), limit, suites, max_drop,
                          min_agreement)
    if not record["verified"]:
        raise ExportVerificationError(failure_message(folder, record))
    return record
