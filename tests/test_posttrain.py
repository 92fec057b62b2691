"""Post-training: the DPO loss and answer log-probabilities against formulas written out here, and
short SFT / DPO runs on a tiny model that must improve held-out chat loss / preference margins."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from famex.data.chat import ChatEncoder, PreferencePair
from famex.errors import FamexError
from famex.posttrain.losses import dpo_loss, sequence_logps
from famex.stage import read_meta


def test_dpo_loss_equals_the_formula():
    pc = torch.tensor([-3.0, -10.0, -1.0, -7.5], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-5.0, -2.0, -1.5, -7.5], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-4.0, -6.0, -1.2, -8.0], dtype=torch.float64)
    rr = torch.tensor([-4.5, -3.0, -1.1, -7.0], dtype=torch.float64)
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(4):
        z = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        assert out.losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12)
    # d loss / d log π(chosen) = −β σ(−z); d loss / d log π(rejected) = +β σ(−z).
    out.losses.sum().backward()
    z = beta * ((pc - rc) - (pr - rr)).detach()
    assert torch.allclose(pc.grad, -beta * torch.sigmoid(-z), rtol=1e-12)
    assert torch.allclose(pr.grad, beta * torch.sigmoid(-z), rtol=1e-12)
    # Policy equal to the reference: every pair costs log 2.
    same = dpo_loss(rc, rr, rc, rr, beta)
    assert torch.allclose(same.losses, torch.full((4,), math.log(2), dtype=torch.float64))
    with pytest.raises(FamexError, match="beta"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_sequence_logps_match_dense_reference():
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 7, 5, 11
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, :] = -100  # a row without labels sums to 0
    labels[2, 5:] = -100
    logps, counts = sequence_logps(hidden, weight, labels, bias=bias, chunk_tokens=3)
    # Slow and obvious: full logits, log-softmax, loop over positions.
    ref = []
    for b in range(B):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(T):
            if labels[b, t] != -100:
                total = total + torch.log_softmax(hidden[b, t] @ weight.T + bias, -1)[labels[b, t]]
        ref.append(total)
    ref = torch.stack(ref)
    assert counts.tolist() == [4, 0, 5]
    assert torch.allclose(logps.double(), ref, rtol=1e-6)
    g1 = torch.autograd.grad(logps.sum(), (hidden, weight))
    g2 = torch.autograd.grad(ref.sum(), (hidden, weight))
    for a, b in zip(g1, g2):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- tiny models and data


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_model_dir(path: Path, tokenizer, seed: int = 0) -> Path:
    from famex.models import build_student, save_model

    model = build_student("tiny-apertus", len(tokenizer), tokenizer, seed=seed)
    save_model(model, path, tokenizer)
    return path


def sft_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is the code word for item {i}?"},
                          {"role": "assistant", "content": f"The code word for item {i} is {['red', 'green', 'blue'][i % 3]}."}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tokenizer_dir):
    from famex.data.prepare import DataConfig, prepare

    root = tmp_path_factory.mktemp("chatdata")
    src = root / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in sft_records(160)))
    return prepare(DataConfig(input=[str(src)], out=str(root / "data"), tokenizer=str(tokenizer_dir), chat=True, seq_len=96,
                              val_fraction=0.15, workers=1))


def test_sft_lowers_heldout_chat_loss(tmp_path, chat_data, chat_tok):
    from famex.data.packing import PackedChunks
    from famex.distill.train import validate_chunks
    from famex.models import load_model
    from famex.posttrain.sft import SftConfig, sft

    start = tiny_model_dir(tmp_path / "start", chat_tok)
    val = PackedChunks(chat_data, "val")
    before = validate_chunks(load_model(start), val, None, 0, 1)
    cfg = SftConfig(model=str(start), data=str(chat_data), out=str(tmp_path / "sft"), lr=3e-3, global_batch=4, micro_batch=4,
                    iters=25, eval_every=0, save_every=0, log_every=5)
    out = sft(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    # The held-out loss is measured on assistant tokens only: as many as the mask says.
    assert before["tokens"] == metrics["val_tokens"] == sum(int((val[i]["labels"] != -100).sum()) for i in range(len(val)))
    assert metrics["val_ce"] < before["ce"] - 2.0, (before, metrics)
    meta = read_meta(out)
    assert meta["status"] == "complete" and meta["lr_source"] == "--lr" and metrics["objective"] == "sft"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)  # a plain HF model, with the data's chat template
    assert AutoTokenizer.from_pretrained(out).chat_template == chat_tok.chat_template
    # A rerun with the same arguments does nothing.
    before_meta = (out / "meta.json").read_text()
    sft(cfg)
    assert (out / "meta.json").read_text() == before_meta


def test_sft_with_instruct_teacher_logits(tmp_path, tokenizer_dir, chat_tok):
    """`famex logits` over chat data, then SFT + KL: the store is read and the KL term is on."""
    from famex.data.prepare import DataConfig, prepare
    from famex.posttrain.sft import SftConfig, sft
    from famex.teacher.generate import LogitsConfig, generate

    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in sft_records(30)))
    chat_data = prepare(DataConfig(input=[str(src)], out=str(tmp_path / "data"), tokenizer=str(tokenizer_dir), chat=True,
                                   seq_len=96, val_fraction=0.0, workers=1))
    teacher = tiny_model_dir(tmp_path / "teacher", chat_tok, seed=1)
    store = generate(LogitsConfig(teacher=str(teacher), data=str(chat_data), out=str(tmp_path / "store"), top_k=8, encoding="paper",
                                  workers=1))
    start = tiny_model_dir(tmp_path / "start", chat_tok)
    out = sft(SftConfig(model=str(start), data=str(chat_data), logits=str(store), out=str(tmp_path / "sft"), lr=3e-3,
                        global_batch=4, micro_batch=4, iters=3, eval_every=0, save_every=0, log_every=1))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "sft+kd" and metrics["train_kl"] > 0


def test_sft_refuses_plain_data_and_guesses_lr(tmp_path, tiny_data, chat_tok):
    from famex.posttrain.sft import SftConfig, default_lr, sft
    from famex.utils import atomic_write_json

    start = tiny_model_dir(tmp_path / "start", chat_tok)
    with pytest.raises(FamexError, match="not chat data"):
        sft(SftConfig(model=str(start), data=str(tiny_data), out=str(tmp_path / "o"), lr=1e-3))
    with pytest.raises(FamexError, match="--lr is required"):
        default_lr(start)
    atomic_write_json(start / "meta.json", {"stage": "distill", "lr": 3e-3, "config": {"lr": None, "min_lr_ratio": 0.0}})
    assert default_lr(start)[0] == pytest.approx(3e-4)
    atomic_write_json(start / "meta.json", {"stage": "distill", "lr": 3e-3, "config": {"lr": None, "min_lr_ratio": 0.2}})
    assert default_lr(start)[0] == pytest.approx(6e-4)


# ---------------------------------------------------------------- DPO


def pref_records(n: int) -> list[dict]:
    return [{"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is a fine and useful thing.",
             "rejected": f"No. I will not talk about item {i}."} for i in range(n)]


def test_pair_batch_labels_only_the_answers(chat_tok):
    from famex.posttrain.dpo import encode_pairs, pair_batch

    pair = PreferencePair("x", [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi?"}],
                          "Hello there.", "Go away, really.")
    (enc,), counts = encode_pairs(ChatEncoder(chat_tok), [pair], seq_len=512, val_fraction=0.0)
    batch = pair_batch([enc], pad_id=0)
    assert batch["input_ids"].shape[0] == 2 and counts == {"pairs": 1, "truncated": 0, "dropped": 0}
    for row, answer in zip(range(2), ["Hello there.", "Go away, really."]):
        labels = batch["labels"][row]
        assert chat_tok.decode(labels[labels != -100].tolist()) == answer + "<|im_end|>"
        n = int(batch["attention_mask"][row].sum())
        assert chat_tok.decode(batch["input_ids"][row, :n].tolist()) == chat_tok.apply_chat_template(
            pair.conversation("chosen" if row == 0 else "rejected"), tokenize=False)
    # Truncation keeps the first seq_len tokens and drops a pair whose answer is cut away entirely.
    _, counts = encode_pairs(ChatEncoder(chat_tok), [pair], seq_len=10, val_fraction=0.0)
    assert counts == {"pairs": 1, "truncated": 1, "dropped": 1}


def test_answer_logps_match_direct_computation(tmp_path, chat_tok):
    from famex.models import load_model
    from famex.posttrain.dpo import answer_logps, encode_pairs, pair_batch
    from famex.data.chat import preference_pair

    model = load_model(tiny_model_dir(tmp_path / "m", chat_tok))
    pairs = [preference_pair(r, f"r{i}") for i, r in enumerate(pref_records(3))]
    pairs[1] = PreferencePair("long", pairs[1].prompt, "A much longer chosen answer than the others, " * 3, "Short.")
    encoded, _ = encode_pairs(ChatEncoder(chat_tok), pairs, 512, 0.0)
    with torch.no_grad():
        logps, counts = answer_logps(model, pair_batch(encoded, pad_id=0))
        for r, (ids, mask) in enumerate([(p.chosen, p.chosen_mask) for p in encoded] + [(p.rejected, p.rejected_mask) for p in encoded]):
            # One unpadded sequence, full logits: Σ over answer tokens of log p(token | everything before).
            logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            expected = sum(lp[t - 1, int(ids[t])] for t in range(1, len(ids)) if mask[t])
            assert logps[r].item() == pytest.approx(expected.item(), abs=2e-4)
            assert counts[r] == int(mask[1:].sum())


def test_dpo_raises_heldout_margin_and_caches_the_reference(tmp_path, chat_tok, monkeypatch):
    from famex.models import load_model
    from famex.posttrain import dpo as dpo_mod
    from famex.posttrain.dpo import DpoConfig, dpo
    from famex.utils import sha256_file

    start = tiny_model_dir(tmp_path / "start", chat_tok)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in pref_records(64)))
    cfg = DpoConfig(model=str(start), data=[str(prefs)], out=str(tmp_path / "dpo"), lr=2e-3, beta=0.1, global_batch=8,
                    micro_batch=4, iters=12, val_fraction=0.25, eval_every=0, save_every=0, log_every=4)
    out = dpo(cfg)
    meta, metrics = read_meta(out), json.loads((out / "metrics.json").read_text())
    assert meta["status"] == "complete" and metrics["pairs_val"] >= 8
    # Held-out pairs: the starting policy is its own reference (margin 0, loss log 2); DPO moves them apart.
    assert metrics["val_margin"] > 0.5 and metrics["val_accuracy"] > 0.9, metrics
    assert metrics["val_dpo_loss"] < math.log(2) - 0.1
    # The reference log-probabilities are cached, checksummed, and those of the starting model.
    info = json.loads((out / "reference.json").read_text())
    assert sha256_file(out / "reference.safetensors") == info["sha256"] == meta["reference"]["sha256"]
    pairs, _ = dpo_mod.encode_pairs(ChatEncoder(chat_tok), list(dpo_mod.read_preferences([prefs])), cfg.seq_len, cfg.val_fraction)
    ordered = [p for p in pairs if not p.val] + [p for p in pairs if p.val]
    fresh = dpo_mod.compute_reference(load_model(start), ordered, chat_tok.pad_token_id)
    from safetensors.torch import load_file

    assert torch.allclose(load_file(str(out / "reference.safetensors"))["logps"], fresh, atol=1e-4)

    # The cache is read back without loading the reference model; a corrupt file is recomputed.
    def no_model(*a, **k):
        raise AssertionError("the reference model was loaded although its log-probs are cached")

    monkeypatch.setattr("famex.models.load_model", no_model)
    cached = dpo_mod.cached_reference(out, str(start), ordered, chat_tok.pad_token_id, 4, torch.device("cpu"))
    assert torch.equal(cached, load_file(str(out / "reference.safetensors"))["logps"])
    # The reference is computed in the training forward's precision: a bf16 run does not reuse fp32 log-probs.
    with pytest.raises(AssertionError, match="reference model was loaded"):
        dpo_mod.cached_reference(out, str(start), ordered, chat_tok.pad_token_id, 4, torch.device("cpu"),
                                 torch.autocast("cpu", dtype=torch.bfloat16))
    (out / "reference.safetensors").write_bytes(b"corrupt")
    with pytest.raises(AssertionError, match="reference model was loaded"):
        dpo_mod.cached_reference(out, str(start), ordered, chat_tok.pad_token_id, 4, torch.device("cpu"))
    monkeypatch.undo()
    bf16 = dpo_mod.cached_reference(tmp_path / "ref-bf16", str(start), ordered, chat_tok.pad_token_id, 4, torch.device("cpu"),
                                    torch.autocast("cpu", dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = dpo_mod.compute_reference(load_model(start), ordered, chat_tok.pad_token_id)
    assert torch.allclose(bf16, want, atol=1e-3) and not torch.allclose(bf16, fresh, atol=1e-6)


def test_dpo_refuses_bad_input(tmp_path, chat_tok):
    from famex.posttrain.dpo import DpoConfig, dpo

    start = tiny_model_dir(tmp_path / "start", chat_tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same answer", "rejected": "same answer"}) + "\n")
    with pytest.raises(FamexError, match=r"bad.jsonl:1: 'chosen' equals 'rejected'"):
        dpo(DpoConfig(model=str(start), data=[str(bad)], out=str(tmp_path / "o"), iters=1))
    with pytest.raises(FamexError, match="--data"):
        DpoConfig(model=str(start), out="o").validate()


def test_dpo_resume_after_interruption_gives_identical_weights(tmp_path, chat_tok, monkeypatch):
    from safetensors.torch import load_file

    from famex.posttrain import dpo as dpo_mod
    from famex.posttrain.dpo import DpoConfig, dpo

    start = tiny_model_dir(tmp_path / "start", chat_tok)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in pref_records(24)))
    kw = dict(model=str(start), data=[str(prefs)], lr=1e-3, global_batch=4, micro_batch=2, iters=4, val_fraction=0.2,
              eval_every=0, save_every=2, log_every=1)
    ref = dpo(DpoConfig(out=str(tmp_path / "ref"), **kw))
    real, calls = dpo_mod.DpoTask.loss, {"n": 0}

    def crash_in_step_3(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:  # 2 micro-batches per step: the first call of step 3
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(dpo_mod.DpoTask, "loss", crash_in_step_3)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        dpo(DpoConfig(out=str(out), **kw))
    assert (out / "checkpoints" / "step-00000002").is_dir() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(dpo_mod.DpoTask, "loss", real)
    dpo(DpoConfig(out=str(out), **kw))
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "reference.safetensors").read_bytes() == (ref / "reference.safetensors").read_bytes()
