"""Chat records → tokens + assistant mask (`famex.data.chat`), `famex data --chat`, and the demo chat sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from famex.data.chat import ChatEncoder, check_messages, preference_pair, read_chat_records, read_preferences
from famex.data.packing import IGNORE_INDEX, PackedChunks
from famex.data.prepare import DataConfig, is_val, prepare
from famex.errors import FamexError
from famex.stage import read_meta

MULTI_TURN = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "I am a small assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4, of course."},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of ones."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_assistant_mask_multi_turn_matches_rendered_text(tok):
    ids, mask = ChatEncoder(tok)(MULTI_TURN)
    rendered = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    # The tokens are the rendered conversation, and for this template its plain tokenization.
    assert tok.decode(ids.tolist()) == rendered
    assert ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    # Written out from the rendered text: each assistant turn is its content followed by <|im_end|>
    # (the model must learn to stop), and nothing else is the assistant's.
    eos = tok.eos_token
    assert eos == "<|im_end|>"
    answers = [m["content"] + eos for m in MULTI_TURN if m["role"] == "assistant"]
    got = [tok.decode(ids[s:e].tolist()) for s, e in runs(mask)]
    assert got == answers
    # The text around the answers is the template's, untouched: system, both user turns, headers.
    rest = rendered
    for a in answers:
        rest = rest.replace(a, "", 1)
    assert tok.decode(ids[mask == 0].tolist()) == rest
    assert "You answer in one sentence." in rest and "What is 2+2?" in rest and rest.count("<|im_start|>assistant\n") == 2


def test_only_last_marks_the_final_answer(tok):
    ids, mask = ChatEncoder(tok)(MULTI_TURN, only_last=True)
    assert [tok.decode(ids[s:e].tolist()) for s, e in runs(mask)] == ["It is 4, of course.<|im_end|>"]
    full_ids, _ = ChatEncoder(tok)(MULTI_TURN)
    assert ids.tolist() == full_ids.tolist()


def test_template_without_special_end_token_gets_eos(tok, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
                           "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    msgs = MULTI_TURN[1:3]
    ids, mask = ChatEncoder(plain)(msgs)
    assert [tok.decode(ids[s:e].tolist()) for s, e in runs(mask)] == ["I am a small assistant.<|im_end|>"]
    # The trailing separator belongs to the template, not to the answer.
    assert tok.decode(ids[mask == 0].tolist()) == "USER: Hi there, who are you?\n\nASSISTANT: \n\n"


def test_tokenizer_without_template_is_refused(tok):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(FamexError, match="no chat template .* --chat-template FILE"):
        ChatEncoder(bare)


def test_template_that_rewrites_history_is_refused(tok):
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(tok.name_or_path)
    # Renders how many turns follow each message: earlier turns change when later ones are added.
    odd.chat_template = "{% for m in messages %}[{{ messages|length - loop.index }}]{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(FamexError, match="prefix-consistently"):
        ChatEncoder(odd)(MULTI_TURN[1:3])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "assistant", "content": "hi"}], "roles out of order: turn 0 is 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "roles out of order: turn 1 is 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     "system turn at position 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], r"turn 1 \(assistant\) has empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "ends with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "role 'tool'"),
    ([{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}], "list content"),
    ([], "non-empty list"),
])
def test_bad_chat_records_name_the_record(tmp_path, messages, match):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(FamexError, match=rf"chat.jsonl:2: .*{match}"):
        list(read_chat_records([path]))


def test_bad_preference_records_name_the_record(tmp_path):
    cases = [
        ({"prompt": "q", "chosen": "same", "rejected": " same "}, "'chosen' equals 'rejected'"),
        ({"prompt": "q", "chosen": "a"}, "missing rejected"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
         "must end with a user turn"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must be an assistant message"),
    ]
    for i, (record, match) in enumerate(cases):
        path = tmp_path / f"p{i}.jsonl"
        path.write_text(json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(FamexError, match=rf"p{i}.jsonl:2: .*{match}"):
            list(read_preferences([path]))
    # The accepted shapes: a string prompt, and answers as strings or assistant messages.
    p = preference_pair({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": {"role": "assistant",
                                                                                                     "content": "b"}}, "x")
    assert p.prompt == [{"role": "user", "content": "q"}] and (p.chosen, p.rejected) == ("a", "b")
    assert check_messages(p.conversation("chosen"), "x")[-1] == {"role": "assistant", "content": "a"}


def chat_records(n: int, long_every: int = 0) -> list[dict]:
    records = []
    for i in range(n):
        answer = f"The answer to question {i} is {i * 7 % 13}."
        if long_every and i % long_every == 0:
            answer = " ".join(["very long answer"] * 30)
        turns = [{"role": "user", "content": f"Question {i}: what is the number?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            turns = [{"role": "system", "content": "Be exact."}] + turns
        records.append({"messages": turns})
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_famex_data_chat_masks_aligns_and_truncates(tmp_path, tokenizer_dir, tok):
    T = 64
    records = chat_records(60, long_every=20)  # 3 records far longer than T
    src = write_records(tmp_path / "chat.jsonl", records)
    out = prepare(DataConfig(input=[str(src)], out=str(tmp_path / "data"), tokenizer=str(tokenizer_dir), chat=True,
                             seq_len=T, val_fraction=0.2, workers=1))
    meta = read_meta(out)
    metrics = json.loads((out / "metrics.json").read_text())
    long_ids = [ChatEncoder(tok)(r["messages"])[0] for r in records[::20]]
    assert metrics["chat_records_truncated"] == 3
    assert metrics["chat_tokens_truncated"] == sum(len(x) - T for x in long_ids)
    assert meta["chat"]["template_sha256"] and metrics["chat_pad_tokens"] > 0

    for split in ("train", "val"):
        chunks = PackedChunks(out, split)
        in_split = [r for r in records if is_val(json.dumps(r["messages"], sort_keys=True, ensure_ascii=False), 0.2) == (split == "val")]
        assert chunks.data.n_docs >= len(in_split)
        # No conversation straddles a chunk: each starts and ends inside one chunk's inputs.
        lengths = np.diff(np.append(chunks.data.doc_starts, chunks.data.n_tokens))
        for start, n in zip(chunks.data.doc_starts, lengths):
            assert start // T == (start + n - 1) // T
        # The labelled tokens, chunk after chunk, are the assistant answers (content + <|im_end|>) in
        # record order — written out from the records, not from the mask files.
        expected: list[int] = []
        for r in in_split:
            a = r["messages"][-1]["content"]
            ids = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
            prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
            expected += ids[: max(0, T - prompt_len)]  # over-long records keep their first T tokens
        got = [int(t) for i in range(len(chunks)) for t in chunks[i]["labels"] if t != IGNORE_INDEX]
        assert len(got) > 0.6 * len(expected)
        assert got == expected[: len(got)]
        # Without the mask every in-document position is labelled.
        plain = PackedChunks(out, split, loss_mask=False)
        assert sum(int((plain[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(plain))) > 2 * len(got)


def test_famex_data_chat_template_file_and_errors(tmp_path, tokenizer_dir):
    src = write_records(tmp_path / "chat.jsonl", chat_records(12))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    out = prepare(DataConfig(input=[str(src)], out=str(tmp_path / "d"), tokenizer=str(tokenizer_dir), chat=True,
                             chat_template=str(template), seq_len=64, val_fraction=0.0, workers=1))
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert saved.chat_template == template.read_text()  # students trained on this data inherit it
    assert "inputs" in read_meta(out) and "chat_template" in read_meta(out)["inputs"]
    with pytest.raises(FamexError, match="add --chat"):
        DataConfig(input=[str(src)], out="x", chat_template=str(template)).validate()
    bad = write_records(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(FamexError, match=r"bad.jsonl:1: the record has no assistant turn"):
        prepare(DataConfig(input=[str(bad)], out=str(tmp_path / "d2"), tokenizer=str(tokenizer_dir), chat=True, workers=1))


class CannedModel:
    """Stands in for the teacher's `generate`: greedy rows answer "Answer <question index>.", sampled
    rows "Maybe"; the row of question 1 never reaches EOS and has no full sentence (so it is dropped)."""

    def __init__(self, tok, questions):
        self.tok, self.questions, self.calls = tok, questions, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, do_sample, **kw):
        self.calls += 1
        rows = []
        for r in range(input_ids.shape[0]):
            prompt = self.tok.decode(input_ids[r][attention_mask[r] > 0].tolist())
            q = next(i for i, text in enumerate(self.questions) if text in prompt)
            ids = self.tok("Maybe" if do_sample else f"Answer {q}.", add_special_tokens=False)["input_ids"] + [eos_token_id]
            if q == 1:  # runs to max_new_tokens, as a real unfinished row does
                ids = (self.tok(" an unfinished thought", add_special_tokens=False)["input_ids"] * max_new_tokens)
            rows.append(ids[:max_new_tokens])
        width = max(map(len, rows))
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], 1)


def test_demo_chat_sets_with_canned_answers(tmp_path, tok):
    from famex.posttrain.demo import DemoChatConfig, build_demo_chat, demo_questions, tidy_answer

    qs = demo_questions(5)
    assert len(set(qs)) == 5 and all(q.endswith("?") and q[0].isupper() for q in qs)
    assert tidy_answer("One sentence. And a cut", finished=False) == "One sentence."
    assert tidy_answer("no sentence end", finished=False) is None
    assert tidy_answer(" done ", finished=True) == "done"
    model = CannedModel(tok, qs)
    cfg = DemoChatConfig(n_chat=3, n_pairs=2, max_new_tokens=16, batch_size=2)
    sets = build_demo_chat(tmp_path / "sources", cfg=cfg, teacher=(model, tok))
    assert model.calls == 4  # greedy: 5 questions in batches of 2; sampled: the 2 pair questions
    chat = list(read_chat_records([sets.chat]))
    assert [m[1]["content"] for _, m in chat] == [qs[0], qs[2]]  # question 1's answer had no full sentence
    assert [m[2]["content"] for _, m in chat] == ["Answer 0.", "Answer 2."]
    assert all([m["role"] for m in msgs] == ["system", "user", "assistant"] for _, msgs in chat)
    prefs = list(read_preferences([sets.prefs]))
    assert [(p.prompt[1]["content"], p.chosen, p.rejected) for p in prefs] == [(qs[3], "Answer 3.", "Maybe"),
                                                                               (qs[4], "Answer 4.", "Maybe")]
    manifest = json.loads((tmp_path / "sources" / "manifest.json").read_text())
    assert manifest["chat_dropped"] == 1 and manifest["pairs"] == 2
    # A finished build is reused as it is; an interrupted one generates only what its cache lacks.
    assert build_demo_chat(tmp_path / "sources", cfg=cfg, teacher=(model, tok)) == sets and model.calls == 4
    cache = (tmp_path / "sources" / "answers.jsonl").read_text().splitlines()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "answers.jsonl").write_text(cache[0] + "\n" + cache[1][:20])  # the second line cut by a crash
    model.calls = 0
    again = build_demo_chat(resumed, cfg=cfg, teacher=(model, tok))
    assert model.calls == 3 and again.chat.read_bytes() == sets.chat.read_bytes()
    assert again.prefs.read_bytes() == sets.prefs.read_bytes()
    with pytest.raises(FamexError, match="other settings"):
        build_demo_chat(tmp_path / "sources", cfg=DemoChatConfig(n_chat=4, n_pairs=2), teacher=(model, tok))


@pytest.mark.slow
def test_demo_chat_sets_with_the_teacher(tmp_path, teacher):
    """The real thing, small: the teacher answers 3 chat and 2 preference questions."""
    from famex.posttrain.demo import DemoChatConfig, build_demo_chat, demo_questions

    qs = demo_questions(5)
    sets = build_demo_chat(tmp_path / "sources", cfg=DemoChatConfig(n_chat=3, n_pairs=2, max_new_tokens=32, batch_size=5),
                           teacher=teacher)
    chat = list(read_chat_records([sets.chat]))
    prefs = list(read_preferences([sets.prefs]))
    assert 1 <= len(chat) <= 3 and len(prefs) <= 2
    chat_questions = {m[1]["content"] for _, m in chat}
    assert chat_questions <= set(qs[:3]) and not {p.prompt[1]["content"] for p in prefs} & chat_questions


def test_famex_data_demo_chat_sizes_reach_the_generator(tmp_path, tokenizer_dir, monkeypatch):
    """--demo-chat-answers / --demo-chat-pairs are the sizes the demo sets are built with (the generator is
    replaced by one that writes that many canned records), and sizes below 1 are refused before any work."""
    import famex.posttrain.demo as demo
    from famex.posttrain.demo import DemoSets

    seen = []

    def fake_build(out, model_spec="default", cfg=None, teacher=None):
        seen.append(cfg)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_records(out / "chat.jsonl", chat_records(cfg.n_chat))
        write_records(out / "prefs.jsonl", [])
        return DemoSets(out / "chat.jsonl", out / "prefs.jsonl")

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(demo, "build_demo_chat", fake_build)
    answering = tmp_path / "model"  # --demo-chat names the answering model (with its tokenizer)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(answering)
    tok.save_pretrained(answering)
    out = tmp_path / "chat"
    prepare(DataConfig(demo_chat=True, demo_chat_answers=12, demo_chat_pairs=5, tokenizer=str(answering), seq_len=64,
                       val_fraction=0.2, workers=1, out=str(out)))
    assert [(c.n_chat, c.n_pairs) for c in seen] == [(12, 5)]
    assert len(list(read_chat_records([out / "sources" / "chat.jsonl"]))) == 12
    with pytest.raises(FamexError, match="--demo-chat-answers and --demo-chat-pairs must be at least 1"):
        DataConfig(demo_chat=True, demo_chat_pairs=0, tokenizer=str(tokenizer_dir), out=str(tmp_path / "x")).validate()


def test_famex_data_chat_resumes_byte_identical(tmp_path, tokenizer_dir, monkeypatch):
    import famex.data.prepare as prep

    src = write_records(tmp_path / "chat.jsonl", chat_records(120, long_every=25))
    kw = dict(input=[str(src)], tokenizer=str(tokenizer_dir), chat=True, seq_len=64, val_fraction=0.2, workers=1,
              segment_tokens=500)
    ref = prepare(DataConfig(out=str(tmp_path / "ref"), **kw))
    real, calls = prep._add_chat_record, {"n": 0}

    def crash_after_70(*a, **k):
        calls["n"] += 1
        if calls["n"] > 70:
            raise KeyboardInterrupt  # stands for a kill: the stage is left unfinished
        return real(*a, **k)

    monkeypatch.setattr(prep, "_add_chat_record", crash_after_70)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        prepare(DataConfig(out=str(out), **kw))
    assert read_meta(out)["status"] == "failed" and json.loads((out / "progress.json").read_text())["segments"]
    monkeypatch.setattr(prep, "_add_chat_record", real)
    prepare(DataConfig(out=str(out), **kw))
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.npy"))
    assert any("mask-" in str(f) for f in files) and files == sorted(p.relative_to(out) for p in out.rglob("*.npy"))
    assert all((ref / f).read_bytes() == (out / f).read_bytes() for f in files)
    assert json.loads((ref / "metrics.json").read_text())["chat_pad_tokens"] == \
        json.loads((out / "metrics.json").read_text())["chat_pad_tokens"]
