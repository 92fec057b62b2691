"""`famex data`: every input format, deterministic split, resume after SIGKILL, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, write_jsonl
from famex.data.prepare import DataConfig, is_val, prepare, token_dtype
from famex.errors import FamexError
from famex.stage import read_meta


def run_prepare(inputs, out, tokenizer_dir, **kw):
    cfg = DataConfig(input=[str(i) for i in inputs], out=str(out), tokenizer=str(tokenizer_dir), workers=kw.pop("workers", 1), **kw)
    return prepare(cfg)


def all_tokens(out: Path, split: str) -> list[list[int]]:
    """Documents of a split, read back the slow way: shard by shard, cut by the stored lengths."""
    meta = read_meta(out)
    docs = []
    for shard in meta["splits"][split]["shards"]:
        toks = np.load(out / shard["tokens_file"]).tolist()
        pos = 0
        for n in np.load(out / shard["docs_file"]).tolist():
            docs.append(toks[pos: pos + n])
            pos += n
    return docs


def test_formats_agree_and_match_the_tokenizer(tmp_path, tokenizer_dir, teacher):
    tok = teacher[1]
    docs = make_docs(40)
    jsonl = write_jsonl(tmp_path / "a.jsonl", docs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, d in enumerate(docs):
        (txt_dir / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    expected = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]
    for name, src in [("jsonl", jsonl), ("parquet", tmp_path / "a.parquet"), ("saved", tmp_path / "saved"), ("txt", txt_dir)]:
        out = run_prepare([src], tmp_path / f"out-{name}", tokenizer_dir, val_fraction=0.0)
        meta = read_meta(out)
        assert meta["status"] == "complete" and meta["stage"] == "data"
        assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 49152
        assert all_tokens(out, "train") == expected, name


def test_split_is_by_document_hash(tmp_path, tokenizer_dir, teacher):
    docs = make_docs(200)
    out = run_prepare([write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "o", tokenizer_dir, val_fraction=0.2)
    tok = teacher[1]
    enc = {tuple(tok(d)["input_ids"] + [tok.eos_token_id]): d for d in docs}
    val = all_tokens(out, "val")
    assert 15 <= len(val) <= 65
    assert all(is_val(enc[tuple(v)], 0.2) for v in val)
    assert not any(is_val(enc[tuple(t)], 0.2) for t in all_tokens(out, "train"))
    # Reordering the corpus moves no document across the split.
    out2 = run_prepare([write_jsonl(tmp_path / "b.jsonl", docs[::-1])], tmp_path / "o2", tokenizer_dir, val_fraction=0.2)
    assert sorted(map(tuple, all_tokens(out2, "val"))) == sorted(map(tuple, val))


def test_workers_do_not_change_the_output(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    a = run_prepare([src], tmp_path / "w1", tokenizer_dir, workers=1, segment_tokens=1500)
    b = run_prepare([src], tmp_path / "w2", tokenizer_dir, workers=2, segment_tokens=1500)
    files = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert len(files) > 4
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.npy"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_rerun_is_a_noop_and_other_args_are_refused(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(20))
    out = run_prepare([src], tmp_path / "o", tokenizer_dir)
    before = (out / "meta.json").read_text()
    run_prepare([src], out, tokenizer_dir, workers=2)  # workers do not change the output
    assert (out / "meta.json").read_text() == before
    with pytest.raises(FamexError, match="val_fraction"):
        run_prepare([src], out, tokenizer_dir, val_fraction=0.5)


@pytest.mark.slow  # SIGKILL + resume, ~15-75 s on 2 cores: `make test-slow`
def test_resume_after_sigkill_is_byte_identical(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(3000, seed=1))
    args = ["--input", str(src), "--tokenizer", str(tokenizer_dir), "--workers", "1", "--segment-tokens", "2000"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "famex", "data", *args, "--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "famex", "data", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        prog = out / "progress.json"
        if prog.is_file() and len(json.loads(prog.read_text())["segments"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = read_meta(out)
    assert meta["status"] == "running", "the killed run must not look complete"
    subprocess.run([sys.executable, "-m", "famex", "data", *args, "--out", str(out)], check=True, capture_output=True)
    ref_files = sorted(p.relative_to(ref) for p in ref.rglob("*.npy"))
    assert ref_files == sorted(p.relative_to(out) for p in out.rglob("*.npy"))
    assert all((ref / f).read_bytes() == (out / f).read_bytes() for f in ref_files)
    assert read_meta(out)["splits"] == read_meta(ref)["splits"]


def test_bad_inputs(tmp_path, tokenizer_dir):
    with pytest.raises(FamexError, match="input not found"):
        run_prepare([tmp_path / "nope.jsonl"], tmp_path / "o1", tokenizer_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    with pytest.raises(FamexError, match="empty corpus"):
        run_prepare([empty], tmp_path / "o2", tokenizer_dir)
    assert read_meta(tmp_path / "o2")["status"] == "failed"
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"body": "oops"}\n')
    with pytest.raises(FamexError, match=r"nofield.jsonl:2: no 'text' field \(found: body\)"):
        run_prepare([nofield], tmp_path / "o3", tokenizer_dir)
    badutf = tmp_path / "bad.jsonl"
    badutf.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(FamexError, match=r"bad.jsonl:1: invalid UTF-8"):
        run_prepare([badutf], tmp_path / "o4", tokenizer_dir)
    with pytest.raises(FamexError, match="does not fit uint16"):
        token_dtype(131072, "uint16")  # a 131k vocabulary (the real Apertus one) forced into uint16
    assert token_dtype(131072, "auto") == np.uint32 and token_dtype(49152, "auto") == np.uint16


def test_one_expansion_for_text_and_chat_inputs(tmp_path):
    """Text and chat inputs are found by one function; only the formats each kind reads differ."""
    from famex.data.chat import read_chat_records
    from famex.data.sources import expand_inputs
    from famex.posttrain.dpo import preference_paths

    root = tmp_path / "in"
    (root / "sub" / "saved").mkdir(parents=True)
    (root / "sub" / "saved" / "state.json").write_text("{}")  # a saved datasets directory
    for name in ("b.jsonl", "a.TXT", "c.json", "d.jsonl.gz", "e.parquet", "f.csv", "sub/g.jsonl"):
        (root / name).write_bytes(b"")
    expected_text = sorted([root / n for n in ("a.TXT", "b.jsonl", "c.json", "d.jsonl.gz", "e.parquet", "sub/g.jsonl")]
                           + [root / "sub" / "saved"])
    assert expand_inputs([str(root)]) == expected_text
    assert expand_inputs([str(root)], "chat") == [p for p in expected_text if p.name != "a.TXT"]
    # Named explicitly, a file its kind does not read is refused before any stage starts: .txt for chat, .csv for both.
    assert expand_inputs([str(root / "a.TXT")]) == [root / "a.TXT"]
    with pytest.raises(FamexError, match=r"a.TXT: unsupported file type for chat input; use .jsonl, .jsonl.gz, .json, .parquet or"):
        expand_inputs([str(root / "a.TXT")], "chat")
    with pytest.raises(FamexError, match=r"a.TXT: unsupported file type for chat input"):
        preference_paths([str(root / "a.TXT")])
    for kind in ("text", "chat"):
        with pytest.raises(FamexError, match=rf"f.csv: unsupported file type for {kind} input"):
            expand_inputs([str(root / "f.csv")], kind)
        with pytest.raises(FamexError, match="input not found"):
            expand_inputs([str(tmp_path / "nope")], kind)
    with pytest.raises(FamexError, match=r"no input given .* or --demo-chat"):
        expand_inputs([], "chat")
    only_txt = tmp_path / "txt-only"
    only_txt.mkdir()
    (only_txt / "x.txt").write_text("words")
    with pytest.raises(FamexError, match=r"txt-only: no .jsonl, .jsonl.gz, .json, .parquet files"):
        expand_inputs([str(only_txt)], "chat")
    with pytest.raises(FamexError, match="chat and preference records are read from"):
        list(read_chat_records([only_txt / "x.txt"]))  # the reader keeps the same rule for direct callers


def test_cli_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "famex", "data", "--input", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "input not found" in r.stderr
