"""The stage contract: what identifies a finished stage, and inputs recorded by older famex versions."""

from __future__ import annotations

import json

import pytest

from famex.errors import FamexError
from famex.integrity import with_digest
from famex.stage import Stage, content_hash, same_content
from famex.utils import sha256_file


def finished(out, config, when: str):
    st = Stage(out, "data", config)
    st.begin()
    st.finish({"tokens": 10})
    meta = json.loads((out / "meta.json").read_text())
    meta["started"] = meta["finished"] = when  # as if it had run at another time
    (out / "meta.json").write_text(json.dumps(with_digest(meta)))
    return out


def test_when_a_stage_ran_is_no_part_of_its_identity(tmp_path):
    a = finished(tmp_path / "a", {"seq_len": 64}, "2026-01-01T00:00:00+0000")
    b = finished(tmp_path / "b", {"seq_len": 64}, "2026-06-01T12:00:00+0000")
    c = finished(tmp_path / "c", {"seq_len": 128}, "2026-01-01T00:00:00+0000")
    assert content_hash(a) == content_hash(b) != content_hash(c)


def test_inputs_recorded_as_the_whole_meta_file_still_match(tmp_path):
    data = finished(tmp_path / "data", {"seq_len": 64}, "2026-01-01T00:00:00+0000")
    out = tmp_path / "logits"
    st = Stage(out, "logits", {"top_k": 8}, {"data": data})
    st.begin()
    meta = json.loads((out / "meta.json").read_text())
    legacy = "meta:" + sha256_file(data / "meta.json")  # how famex 0.1 before this change hashed it
    meta["inputs"]["data"]["hash"] = legacy
    (out / "meta.json").write_text(json.dumps(with_digest(meta)))
    assert same_content(legacy, data) and not same_content("meta:" + "0" * 64, data)
    assert Stage(out, "logits", {"top_k": 8}, {"data": data}).begin() is False  # resumes, no refusal
    # A real change is still refused.
    meta_d = json.loads((data / "meta.json").read_text())
    meta_d["config"]["seq_len"] = 32
    (data / "meta.json").write_text(json.dumps(with_digest(meta_d)))  # as a rerun would write it
    with pytest.raises(FamexError, match="input data changed"):
        Stage(out, "logits", {"top_k": 8}, {"data": data}).begin()


def test_a_path_spelled_another_way_is_the_same_argument(tmp_path, monkeypatch):
    """A run planned with relative paths is the same run when planned again with absolute ones (or through a
    link); another directory, or a relative path that does not exist from here, is still a difference."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "teacher")
    out = finished(tmp_path / "data", {"tokenizer": "teacher"}, "2026-01-01T00:00:00+0000")
    for same in (str(tmp_path / "teacher"), str(tmp_path / "link"), "./teacher"):
        assert Stage(out, "data", {"tokenizer": same}).begin() is True
    for other in (str(tmp_path / "other"), "gone"):
        with pytest.raises(FamexError, match="tokenizer: 'teacher' -> "):
            Stage(out, "data", {"tokenizer": other}).begin()
    monkeypatch.chdir(tmp_path / "other")  # the recorded relative path no longer names the directory from here
    with pytest.raises(FamexError, match="tokenizer"):
        Stage(out, "data", {"tokenizer": str(tmp_path / "teacher")}).begin()
