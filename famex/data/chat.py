"""Chat records → token ids + a per-token assistant mask, and reading chat and preference files.

A chat record is a ``messages`` list of ``{"role", "content"}`` turns: an optional ``system`` turn
first, then ``user`` and ``assistant`` turns alternating, starting with ``user`` and ending with
``assistant``. It is rendered with the tokenizer's own chat template (students inherit the
teacher's tokenizer, template included), and every token is marked as the assistant's or not.

How the assistant tokens are found: SmolLM2's template (like most) has no ``{% generation %}``
markers, so `return_assistant_tokens_mask` cannot be used. Instead, for each assistant turn i the
template renders the conversation before it with the generation prompt (``messages[:i]`` +
``add_generation_prompt``) and the conversation including it (``messages[:i+1]``); the characters
between the two are the assistant's, minus trailing whitespace (the template's separator between
turns, not something the model should learn to emit). The text is cut at those character spans and
each piece is tokenized on its own, so a token never straddles the prompt/answer boundary and the
prompt tokens are exactly what generation sees (prompt tokenized alone, answer produced by the
model). Every assistant span ends in a special token (``<|im_end|>`` for SmolLM2/ChatML); where a
template ends a turn with ordinary text, EOS is appended to the span so the model learns to stop.

Preference records (DPO) hold ``prompt`` (a string = one user turn, or a messages list ending with a
user turn), ``chosen`` and ``rejected`` (a string, one assistant message, or a list ending with one).

What this module does not do: find the input files (`famex.data.sources.expand_inputs`, which
also says which suffixes hold records), write shards or split train/val (`famex.data.prepare`),
pack chunks (`famex.data.packing`), or build the demo chat set (`famex.posttrain.demo`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from famex.data.sources import INPUT_KINDS, file_format, suffixes
from famex.errors import FamexError

ROLES = ("system", "user", "assistant")

Messages = list[dict[str, Any]]


# ---------------------------------------------------------------- checking records


def check_messages(messages: Any, where: str, *, ends_with: str = "assistant") -> Messages:
    """Validate one conversation; returns it as a list of dicts. Errors name ``where`` (file:line).

    Rules: a non-empty list of ``{"role", "content"}``; roles system / user / assistant; ``system``
    only first; then user and assistant alternating, starting with user; no empty content; the last
    turn is ``ends_with`` (``assistant`` for SFT records, ``user`` for preference prompts).
    """
    if not isinstance(messages, list) or not messages:
        raise FamexError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FamexError(f"{where}: turn {i} is not a {{\"role\": ..., \"content\": ...}} object")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise FamexError(f"{where}: turn {i} has role {role!r}; famex renders only {', '.join(ROLES)} turns")
        if not isinstance(content, str):
            raise FamexError(f"{where}: turn {i} ({role}) has {type(content).__name__} content; content must be text")
        if not content.strip():
            raise FamexError(f"{where}: turn {i} ({role}) has empty content — drop the record or fill the turn")
        if role == "system":
            if i != 0:
                raise FamexError(f"{where}: roles out of order: a system turn at position {i}; it may only come first")
            continue
        if role != expected:
            raise FamexError(
                f"{where}: roles out of order: turn {i} is {role!r} where {expected!r} was expected "
                "(after an optional system turn, user and assistant turns alternate, starting with user)"
            )
        expected = "assistant" if role == "user" else "user"
    last = messages[-1]["role"]
    if ends_with == "assistant":
        if not any(m["role"] == "assistant" for m in messages):
            raise FamexError(f"{where}: the record has no assistant turn, so nothing to train on — drop it")
        if last != "assistant":
            raise FamexError(f"{where}: the conversation ends with a {last} turn that has no assistant answer — drop that turn")
    elif last != ends_with:
        raise FamexError(f"{where}: the prompt must end with a {ends_with} turn, not {last!r}")
    return messages


# ---------------------------------------------------------------- rendering and tokenizing


def assistant_spans(render: Callable[[Messages, bool], str], messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    ``render(messages, add_generation_prompt)`` is the chat template. A template that does not render
    conversations prefix-consistently (a turn's rendering changes once later turns exist) is refused:
    the training text would then differ from what the model sees when it generates.
    """
    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise FamexError(
                "the chat template does not render conversations prefix-consistently (the prompt with the "
                "generation prompt is not a prefix of the conversation with the answer), so assistant tokens "
                "cannot be located — pass --chat-template FILE with a template that does"
            )
        end = len(upto.rstrip())
        if m["content"].strip() not in full[len(before): end]:
            raise FamexError(
                "the chat template does not place the assistant's text right after the generation prompt — "
                "pass --chat-template FILE with a template that does"
            )
        spans.append((len(before), end))
    return full, spans


def cut_segments(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
    """``text`` as consecutive (piece, is_assistant) segments along ``spans`` (sorted, disjoint)."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for start, end in spans:
        if start > pos:
            out.append((text[pos:start], False))
        out.append((text[start:end], True))
        pos = end
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def tokenize_segments(segments: Sequence[tuple[str, bool]], encode: Callable[[list[str]], list[list[int]]],
                      eos_id: int, stop_ids: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (uint32) and assistant mask (uint8, 1 = the assistant's token) of the segments.

    Each segment is tokenized on its own (no special tokens added: the template writes its own).
    An assistant segment that does not end in a special token gets ``eos_id`` appended.
    """
    pieces = encode([s for s, _ in segments])
    ids: list[int] = []
    mask: list[int] = []
    for (_, is_assistant), toks in zip(segments, pieces):
        toks = list(toks)
        if is_assistant and (not toks or toks[-1] not in stop_ids):
            toks.append(eos_id)
        ids.extend(toks)
        mask.extend([int(is_assistant)] * len(toks))
    return np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and tokenizes them with the assistant mask."""

    def __init__(self, tokenizer, encode: Callable[[list[str]], list[list[int]]] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise FamexError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template — pass "
                "--chat-template FILE (a Jinja template; students inherit the teacher's template)"
            )
        if tokenizer.eos_token_id is None:
            raise FamexError("the tokenizer has no EOS token; chat training needs one to end assistant turns")
        self.tokenizer = tokenizer
        self.encode = encode or (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
        self.eos_id = int(tokenizer.eos_token_id)
        self.stop_ids = {int(i) for i in tokenizer.all_special_ids} | {self.eos_id}

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, messages: Messages, only_last: bool = False) -> list[tuple[str, bool]]:
        """(text, is_assistant) pieces; ``only_last`` marks only the final assistant turn (DPO completions)."""
        text, spans = assistant_spans(self.render, messages)
        if only_last:
            # Earlier assistant turns are part of the prompt: merge them into the surrounding text.
            return cut_segments(text, spans[-1:])
        return cut_segments(text, spans)

    def __call__(self, messages: Messages, only_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and assistant mask of one conversation."""
        return tokenize_segments(self.segments(messages, only_last), self.encode, self.eos_id, self.stop_ids)


def json_key(obj: Any) -> str:
    """A canonical text of a record, hashed to put it in the train or the val split."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def truncate(ids: np.ndarray, mask: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The rule for over-long records: keep the first ``max_len`` tokens; returns the tokens dropped."""
    if len(ids) <= max_len:
        return ids, mask, 0
    return ids[:max_len], mask[:max_len], len(ids) - max_len


# ---------------------------------------------------------------- reading files


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a JSONL / Parquet file or saved datasets directory."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        parts = [(name, ds[name]) for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [("", ds)]
        for name, part in parts:
            for i, row in enumerate(part):
                yield f"{path}{'/' + name if name else ''}[{i}]", row
        return
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise FamexError(f"{path}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}[{i}]", row
        return
    if fmt not in INPUT_KINDS["chat"]:
        raise FamexError(f"{path}: chat and preference records are read from {', '.join(suffixes('chat'))} files")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise FamexError(f"{where}: invalid UTF-8 at byte {e.start} — re-encode the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise FamexError(f"{where}: not valid JSON ({e.msg}) — each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise FamexError(f"{where}: expected a JSON object, found {type(record).__name__}")
            yield where, record


def read_chat_records(paths: Sequence[Path], field: str = "messages") -> Iterator[tuple[str, Messages]]:
    """(where, messages) for every chat record, checked with `check_messages`."""
    for path in paths:
        for where, record in _records(path):
            if field not in record:
                raise FamexError(f"{where}: no {field!r} field (found: {', '.join(record)}) — pass --messages-field NAME")
            yield where, check_messages(record[field], where)


@dataclass(frozen=True)
class PreferencePair:
    """One preference record: a prompt (messages ending with a user turn) and two answers."""

    where: str
    prompt: Messages
    chosen: str
    rejected: str

    def conversation(self, which: str) -> Messages:
        """The prompt followed by the chosen or the rejected answer as an assistant turn."""
        return [*self.prompt, {"role": "assistant", "content": self.chosen if which == "chosen" else self.rejected}]


def _answer(value: Any, key: str, where: str) -> str:
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise FamexError(f"{where}: {key!r} must be an assistant message, not role {value.get('role')!r}")
        value = value.get("content")
    if not isinstance(value, str):
        raise FamexError(f"{where}: {key!r} must be a string or an assistant message, not {type(value).__name__}")
    if not value.strip():
        raise FamexError(f"{where}: {key!r} is empty — drop the record")
    return value


def preference_pair(record: dict, where: str) -> PreferencePair:
    """Check one preference record and normalise it."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise FamexError(f"{where}: missing {', '.join(missing)} (found: {', '.join(record)}) — "
                         "preference records hold prompt, chosen and rejected")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise FamexError(f"{where}: 'prompt' is empty — drop the record")
        prompt = [{"role": "user", "content": prompt}]
    prompt = check_messages(prompt, where, ends_with="user")
    chosen, rejected = _answer(record["chosen"], "chosen", where), _answer(record["rejected"], "rejected", where)
    if chosen.strip() == rejected.strip():
        raise FamexError(f"{where}: 'chosen' equals 'rejected', so the pair states no preference — drop the record")
    return PreferencePair(where, prompt, chosen, rejected)


def read_preferences(paths: Sequence[Path]) -> Iterator[PreferencePair]:
    """Every preference record of the files, checked."""
    for path in paths:
        for where, record in _records(path):
            yield preference_pair(record, where)
