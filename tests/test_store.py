"""The logit store on disk (`famex.teacher.store`): shards, manifest, reader, verification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from famex.errors import FamexError
from famex.teacher import codec, store

V, K, T = 700, 16, 24


def make_chunk(data_index: int, seed: int) -> store.ChunkLogits:
    """A chunk of random top-k distributions over a small vocabulary (exact mass kept).

    Sharpness varies per position, so that adaptive k drops ids from some of them.
    """
    g = torch.Generator().manual_seed(seed)
    sharp = 3 + 4 * torch.rand(T, 1, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(sharp * torch.randn(T, V, generator=g, dtype=torch.float64), -1)
    top, ids = logp.topk(K, -1)
    mass = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1).exp()
    tokens = torch.randint(0, V, (T,), generator=g)
    return store.ChunkLogits(data_index, tokens.numpy(), ids.numpy(), top.exp().float().numpy(), mass.numpy())


def build(tmp_path, encoding="compact", n_chunks=11, per_shard=4, seed=0):
    """A store of ``n_chunks`` chunks in seeded store order; returns (dir, chunks by data index, perm)."""
    out = tmp_path / f"store-{encoding}"
    out.mkdir()
    perm = np.random.default_rng(seed).permutation(n_chunks)
    chunks = {i: make_chunk(i, 100 + i) for i in range(n_chunks)}
    params = {"encoding": encoding, "k": K, "vocab_size": V, "seq_len": T, "teacher": "synthetic"}
    entries = []
    for si, (a, b) in enumerate(store.shard_plan(n_chunks, per_shard)):
        data = store.encode_shard(
            [chunks[int(j)] for j in perm[a:b]], shard=si, position_start=a, encoding=encoding, vocab_size=V, k=K, seq_len=T
        )
        entries.append(store.write_shard(out, data, si))
    store.write_manifest(out, params, perm, entries)
    return out, chunks, perm


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
def test_sequential_equals_random_access_equals_input(tmp_path, encoding):
    out, chunks, perm = build(tmp_path, encoding)
    s = store.LogitStore(out)
    assert len(s) == 11 and s.tokens == 11 * T and (s.k, s.vocab_size, s.seq_len) == (K, V, T)
    assert np.array_equal(s.permutation, perm)
    seq = list(s.stream())
    assert [c.position for c in seq] == list(range(11))
    for c in seq:
        ref = chunks[int(perm[c.position])]
        assert c.data_index == perm[c.position] == s.data_index(c.position)
        assert torch.equal(c.token_ids, torch.as_tensor(ref.token_ids, dtype=torch.int64))
        assert c.ids.dtype == torch.int64 and c.probs.dtype == torch.float32 and c.probs.shape == (T, K)
        ri = s[c.position]
        for a, b in ((c.ids, ri.ids), (c.probs, ri.probs), (c.mass_left, ri.mass_left), (c.token_ids, ri.token_ids)):
            assert torch.equal(a, b)
        if encoding == "paper":
            assert np.array_equal(c.ids.numpy(), ref.ids) and np.array_equal(c.probs.numpy(), ref.probs)
        else:
            # adaptive k: the listed ids are a subset of the exact ones, padding is (-1, 0)
            listed = c.probs.numpy() > 0
            assert (c.ids.numpy()[~listed] == -1).all()
            for t in range(T):
                assert set(c.ids.numpy()[t][listed[t]].tolist()) <= set(ref.ids[t].tolist())
            kl = codec.kl_decoded_vs_exact(ref.ids, ref.probs, ref.mass_left, c.ids.numpy(), c.probs.numpy(), c.mass_left.numpy())
            assert kl.mean() < 1e-3


def test_partial_stream_and_early_stop(tmp_path):
    out, _, _ = build(tmp_path)
    s = store.LogitStore(out, prefetch=2)
    assert [c.position for c in s.stream(3, 9)] == list(range(3, 9))
    it = s.stream()
    first = next(it)
    it.close()  # the prefetch thread must stop, not hang
    assert first.position == 0
    assert [c.position for c in s.stream(10)] == [10]


def test_manifest_and_shard_headers_describe_the_store(tmp_path):
    out, chunks, perm = build(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    assert m["chunks"] == 11 and m["tokens"] == 11 * T and m["teacher"] == "synthetic"
    assert [s["positions"] for s in m["shards"]] == [[0, 4], [4, 8], [8, 11]]
    assert m["bytes"] == sum((out / s["file"]).stat().st_size for s in m["shards"])
    perm_bytes = (out / "permutation.bin").read_bytes()
    assert np.array_equal(np.frombuffer(perm_bytes, "<u8"), perm)
    h = store.read_header(out / "shard-00001.fxl")
    assert (h["encoding"], h["k"], h["vocab_size"], h["seq_len"], h["positions"]) == ("compact", K, V, T, [4, 8])
    # the header's token hash is over the chunk's tokens as int64 LE, computed here independently
    import hashlib

    ref = hashlib.sha256(b"".join(np.asarray(chunks[int(j)].token_ids, "<i8").tobytes() for j in perm[4:8])).hexdigest()
    assert h["token_ids_sha256"] == ref == m["shards"][1]["token_ids_sha256"]
    assert store.verify(out) == {"shards": 3, "chunks": 11, "tokens": 11 * T, "bytes": m["bytes"]}


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["record", "header", "table", "prefix"])
def test_corruption_is_detected_and_names_the_shard(tmp_path, where):
    out, _, _ = build(tmp_path)
    path = out / "shard-00001.fxl"
    h = store.read_header(path)
    payload = len(path.read_bytes()) - h["payload_bytes"]
    offset = {
        "record": payload + h["chunks"][2]["offset"] + h["chunks"][2]["tokens_bytes"] + 30,
        "header": 60,
        "table": payload + 3,
        "prefix": 2,
    }[where]
    flip(path, offset)
    s = store.LogitStore(out)
    with pytest.raises(FamexError, match="shard-00001.fxl"):
        list(s.stream())
    with pytest.raises(FamexError, match="shard-00001.fxl"):
        s[6]
    assert s[1].position == 1 and s[9].position == 9  # other shards still read
    with pytest.raises(FamexError, match=r"shard-00001\.fxl.*sha256"):
        store.verify(out)


def test_verify_reports_missing_truncated_and_stray_shards(tmp_path):
    out, _, _ = build(tmp_path)
    (out / "shard-00002.fxl").unlink()
    data = (out / "shard-00000.fxl").read_bytes()
    (out / "shard-00000.fxl").write_bytes(data[:-5])
    (out / "shard-00099.fxl").write_bytes(b"junk")
    with pytest.raises(FamexError) as e:
        store.verify(out)
    msg = str(e.value)
    assert "shard-00002.fxl: missing" in msg and "shard-00000.fxl: sha256" in msg and "shard-00099.fxl" in msg
    with pytest.raises(FamexError, match="shard-00002.fxl is missing"):
        list(store.LogitStore(out).stream(8))


def test_a_shard_of_another_store_is_refused(tmp_path):
    out, _, _ = build(tmp_path, n_chunks=8, seed=0)
    (tmp_path / "other").mkdir()
    other, _, _ = build(tmp_path / "other", n_chunks=8, seed=1)
    (out / "shard-00000.fxl").write_bytes((other / "shard-00000.fxl").read_bytes())
    with pytest.raises(FamexError, match="shard-00000.fxl"):
        list(store.LogitStore(out).stream())


def test_shard_is_complete_only_for_the_same_positions_and_params(tmp_path):
    out, _, _ = build(tmp_path)
    params = {"encoding": "compact", "k": K, "vocab_size": V, "seq_len": T}
    assert store.shard_is_complete(out, 1, (4, 8), params)
    assert not store.shard_is_complete(out, 1, (4, 9), params)
    assert not store.shard_is_complete(out, 1, (4, 8), {**params, "k": K + 1})
    assert not store.shard_is_complete(out, 7, (28, 32), params)
    data = (out / "shard-00001.fxl").read_bytes()
    (out / "shard-00001.fxl").write_bytes(data[:-1])
    assert not store.shard_is_complete(out, 1, (4, 8), params)


def test_no_manifest_means_no_store(tmp_path):
    out, _, _ = build(tmp_path)
    (out / "manifest.json").unlink()
    with pytest.raises(FamexError, match="not a finished logit store"):
        store.LogitStore(out)


def test_manifest_refuses_gaps(tmp_path):
    out = tmp_path / "s"
    data = store.encode_shard([make_chunk(0, 1)], shard=0, position_start=0, encoding="paper", vocab_size=V, k=K, seq_len=T)
    entry = store.write_shard(out, data, 0)
    with pytest.raises(FamexError, match="cover 1 of 2"):
        store.write_manifest(out, {"encoding": "paper", "k": K, "vocab_size": V, "seq_len": T}, np.arange(2), [entry])


def test_stores_of_another_format_version_are_refused(tmp_path):
    out, _, _ = build(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    # A version-1 store, as the famex of that format wrote it: no digest.
    (out / "manifest.json").write_text(json.dumps({**{k: v for k, v in m.items() if k != "digest"}, "format_version": 1}))
    with pytest.raises(FamexError, match=r"format version 1, this famex reads 2.*regenerate"):
        store.LogitStore(out)
    with pytest.raises(FamexError, match=r"format version 1.*delete"):
        store.refuse_other_format(out)
    # an unfinished old store (shards, no manifest) is recognised by its shards' prefix
    (out / "manifest.json").unlink()
    path = out / "shard-00000.fxl"
    data = bytearray(path.read_bytes())
    data[8:12] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(FamexError, match=r"format version 1.*delete"):
        store.refuse_other_format(out)
    with pytest.raises(FamexError, match=r"shard-00000\.fxl: shard format version 1"):
        store.read_header(path)
    store.refuse_other_format(tmp_path / "nothing-here")  # no store, nothing to refuse


def test_shard_stats_report_both_kl_directions_and_adaptive_k(tmp_path):
    out, chunks, perm = build(tmp_path)
    stats = store.read_header(out / "shard-00000.fxl")["stats"]
    shard = [chunks[int(j)] for j in perm[0:4]]  # 4 chunks: all of them are the KL sample too
    assert stats["positions"] == stats["kl_positions"] == 4 * T
    assert 0 < stats["kl_decoded_vs_exact"] < 1e-3 and stats["kl_exact_vs_decoded"] > 0
    # against the whole top-k the dropped ids count too
    assert stats["kl_decoded_vs_top_k"] > stats["kl_decoded_vs_exact"]
    keeps = [codec.keep_mask(c.probs, codec.DEFAULT_DROP_BELOW) for c in shard]
    assert stats["mean_kept_k"] == pytest.approx(np.mean([kp.sum(1).mean() for kp in keeps])) and stats["mean_kept_k"] < K
    kept_mass = float(np.mean([np.where(kp, c.probs.astype(np.float64), 0).sum(1).mean() for kp, c in zip(keeps, shard)]))
    # the decoded mass is on a log grid (relative error <= 0.07% of the left-out mass)
    assert stats["mass_kept"] == pytest.approx(kept_mass, abs=1e-3 * (1 - kept_mass))
    assert stats["mass_covered"] == pytest.approx(np.mean([1 - c.mass_left.mean() for c in shard]))
    paper, _, _ = build(tmp_path, encoding="paper")
    pstats = store.read_header(paper / "shard-00000.fxl")["stats"]
    assert pstats["mean_kept_k"] == K and pstats["mass_kept"] == pytest.approx(pstats["mass_covered"], abs=1e-6)


def test_kept_summary_reads_only_what_it_needs_and_agrees_with_decode():
    c = make_chunk(0, 10)
    assert (codec.keep_mask(c.probs, codec.DEFAULT_DROP_BELOW).sum(1) < K).any()  # some positions drop ids at the defaults
    for drop_below in (0.0, codec.DEFAULT_DROP_BELOW):
        blob = codec.encode(c.ids, c.probs, V, mass_left=c.mass_left, drop_below=drop_below)
        dec = codec.decode(blob)
        kept, mass = codec.kept_summary(blob)
        assert np.array_equal(kept, (dec.probs > 0).sum(1))
        assert np.allclose(mass, dec.mass_left, rtol=1e-6)
    assert (kept < K).any()
