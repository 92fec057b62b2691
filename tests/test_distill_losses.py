"""famex.distill.losses against a slow dense reference written here (float64, token by token)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from famex.distill.losses import distill_loss, sparse_kl, teacher_targets
from famex.errors import FamexError

N, D, V, K = 41, 24, 97, 8


def make_inputs(seed=0, bias=True, n=N, k=K, v=V, d=D):
    """fp32 hidden / lm_head / labels and a teacher top-k with every awkward case in it."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.4
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::6] = -100  # tokens without a label
    teacher = (torch.randn(n, v, generator=g) * 2.5).softmax(-1)
    probs, ids = teacher.topk(k, dim=-1)
    ids = ids.to(torch.int32)  # the store's dtype; the loss must accept it
    probs[2, 5:] = 0.0  # fewer than k entries, padded with id −1
    ids[2, 5:] = -1
    probs[3, 3:] = 0.0  # padding that repeats a real id (the most probable one)
    ids[3, 3:] = ids[3, 0]
    probs[4, 2:] = 0.0  # padding that repeats a non-top id
    ids[4, 2:] = ids[4, 1]
    probs[5, :] = 0.0  # no teacher at all for this token
    ids[5, :] = -1
    probs[7] = probs[7] / probs[7].sum() * 1.05  # top-k summing above 1 (rounding in a store): scaled to 1
    return h, w, b, labels, ids, probs


def reference(h, w, b, labels, ids, probs, *, kl_weight, temperature, tail, ignore=-100):
    """Dense float64 loss, token by token, plus gradients by autograd. Returns a dict."""
    h = h.double().detach().requires_grad_()
    w = w.double().detach().requires_grad_()
    b = None if b is None else b.double().detach().requires_grad_()
    z = h @ w.t()
    if b is not None:
        z = z + b
    kl_sum = torch.zeros((), dtype=torch.float64)
    ce_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for t in range(z.shape[0]):
        if int(labels[t]) == ignore:
            continue
        count += 1
        logp = z[t] - torch.log(torch.exp(z[t]).sum())
        ce_sum = ce_sum - logp[int(labels[t])]
        if ids is None:
            continue
        entries = {}
        for i, p in zip(ids[t].tolist(), probs[t].double().tolist()):
            if p > 0:
                entries[i] = p
        if not entries:
            continue
        logq = z[t] / temperature - torch.log(torch.exp(z[t] / temperature).sum())
        kl = torch.zeros((), dtype=torch.float64)
        if tail == "renormalize":
            powered = {i: p ** (1.0 / temperature) for i, p in entries.items()}
            total = sum(powered.values())
            for i, wi in powered.items():
                qi = wi / total
                kl = kl + qi * (math.log(qi) - logq[i])
        else:
            s = sum(entries.values())
            r = max(0.0, 1.0 - s)
            total = s + r
            student_top = sum(torch.exp(logq[i]) for i in entries)
            for i, p in entries.items():
                qi = p / total
                kl = kl + qi * (math.log(qi) - logq[i])
            if r > 0:
                kl = kl + (r / total) * (math.log(r / total) - torch.log(1.0 - student_top))
        kl_sum = kl_sum + temperature**2 * kl
    if ids is None:
        kl_weight = 0.0
    loss = (kl_weight * kl_sum + (1 - kl_weight) * ce_sum) / max(count, 1)
    loss.backward()
    return dict(loss=loss.detach(), kl_sum=kl_sum.detach(), ce_sum=ce_sum.detach(), count=count,
                gh=h.grad, gw=w.grad, gb=None if b is None else b.grad)


def run(h, w, b, labels, ids, probs, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    out = distill_loss(h, w, labels, ids, probs, lm_head_bias=b, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def close(a, ref, rel=1e-5):
    """Max-abs error within `rel` of the reference's largest magnitude."""
    a, ref = a.double(), ref.double()
    err = (a - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g} (rel {err / scale:.3g})"


CASES = [
    dict(tail="renormalize", temperature=1.0, kl_weight=0.9),
    dict(tail="bucket", temperature=1.0, kl_weight=0.9),
    dict(tail="renormalize", temperature=2.0, kl_weight=0.9),
    dict(tail="renormalize", temperature=0.7, kl_weight=0.5),
    dict(tail="bucket", temperature=1.0, kl_weight=1.0),  # QAD: KL only
]


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["grad-in-forward", "recompute"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['tail']}-T{c['temperature']}-w{c['kl_weight']}")
def test_matches_dense_reference(case, grad_in_forward):
    h, w, b, labels, ids, probs = make_inputs()
    ref = reference(h, w, b, labels, ids, probs, **case)
    out, gh, gw, gb = run(h, w, b, labels, ids, probs, chunk_tokens=16, grad_in_forward=grad_in_forward, **case)
    assert int(out.count) == ref["count"] == int((labels != -100).sum())
    close(out.loss, ref["loss"])
    close(out.kl_sum, ref["kl_sum"])
    close(out.ce_sum, ref["ce_sum"])
    close(out.kl, ref["kl_sum"] / ref["count"])
    close(gh, ref["gh"])
    close(gw, ref["gw"])
    close(gb, ref["gb"])


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_chunked_equals_unchunked(tail):
    h, w, b, labels, ids, probs = make_inputs(seed=1)
    whole, gh0, gw0, gb0 = run(h, w, b, labels, ids, probs, tail=tail, chunk_tokens=None)
    for chunk, gif in ((1, True), (7, False), (7, True), (N, False), (10 * N, True)):
        out, gh, gw, gb = run(h, w, b, labels, ids, probs, tail=tail, chunk_tokens=chunk, grad_in_forward=gif)
        close(out.loss, whole.loss, 1e-6)
        close(gh, gh0, 1e-6)
        close(gw, gw0, 1e-6)
        close(gb, gb0, 1e-6)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_ce_only_matches_torch_cross_entropy(grad_in_forward):
    h, w, b, labels, _, _ = make_inputs(seed=2)
    out, gh, gw, gb = run(h, w, b, labels, None, None, chunk_tokens=8, grad_in_forward=grad_in_forward)
    h2, w2, b2 = (t.clone().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(F.linear(h2, w2, b2), labels, ignore_index=-100)
    ref.backward()
    assert float(out.kl_sum.detach()) == 0.0
    close(out.loss, ref.detach())
    close(out.ce, ref.detach())
    close(gh, h2.grad)
    close(gw, w2.grad)
    close(gb, b2.grad)


def test_gradcheck_float64():
    h, w, b, labels, ids, probs = make_inputs(seed=3, n=8, v=11, k=4, d=5)
    h, w, b = (t.double().requires_grad_() for t in (h, w, b))
    # Recompute mode only: gradcheck runs backward twice per graph, which grad_in_forward refuses.
    for tail in ("renormalize", "bucket"):
        fn = lambda h, w, b: distill_loss(h, w, labels, ids, probs, tail=tail, chunk_tokens=4, lm_head_bias=b,
                                          grad_in_forward=False).loss
        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_sums_compose_across_micro_batches():
    """Two micro-batches normalized by the global count give the one-batch loss and gradients."""
    h, w, b, labels, ids, probs = make_inputs(seed=4)
    whole, gh0, gw0, _ = run(h, w, b, labels, ids, probs, chunk_tokens=16)
    h1 = h.clone().requires_grad_()
    w1 = w.clone().requires_grad_()
    parts = [distill_loss(h1[s], w1, labels[s], ids[s], probs[s], lm_head_bias=b, chunk_tokens=16)
             for s in (slice(0, 17), slice(17, N))]
    total = sum(int(p.count) for p in parts)
    loss = sum(p.loss_sum for p in parts) / total
    loss.backward()
    close(loss.detach(), whole.loss.detach(), 1e-6)
    close(h1.grad, gh0, 1e-6)
    close(w1.grad, gw0, 1e-6)


def test_leading_dims_and_all_masked():
    h, w, b, labels, ids, probs = make_inputs(seed=5, n=40)
    flat = distill_loss(h, w, labels, ids, probs, lm_head_bias=b)
    shaped = distill_loss(h.view(4, 10, D), w, labels.view(4, 10), ids.view(4, 10, K), probs.view(4, 10, K),
                          lm_head_bias=b)
    close(shaped.loss, flat.loss, 1e-6)
    hm = h.clone().requires_grad_()
    wm = w.clone().requires_grad_()
    out = distill_loss(hm, wm, torch.full_like(labels, -100), ids, probs, lm_head_bias=b)
    out.loss.backward()
    assert int(out.count) == 0 and float(out.loss.detach()) == 0.0
    assert hm.grad.abs().max() == 0 and wm.grad.abs().max() == 0


def test_sparse_kl_matches_reference_per_token():
    h, w, b, labels, ids, probs = make_inputs(seed=6)
    z = h @ w.t() + b
    for tail, temp in (("renormalize", 1.0), ("bucket", 1.0), ("renormalize", 1.5)):
        per_token = sparse_kl(z, ids, probs, tail=tail, temperature=temp)
        assert per_token.shape == (N,)
        assert float(per_token[5]) == 0.0  # no teacher entries
        every = torch.zeros_like(labels)  # label every token so the reference sums them all
        ref = reference(h, w, b, every, ids, probs, kl_weight=1.0, temperature=temp, tail=tail)
        close(per_token.sum(), ref["kl_sum"])
        assert (per_token >= -1e-6).all()  # a KL


def test_bucket_tail_counts_mass_outside_topk():
    """Hand case: V=4, teacher top-2 {0: .5, 1: .3}, tail .2; student uniform."""
    z = torch.zeros(1, 4)
    ids = torch.tensor([[0, 1, -1]])
    probs = torch.tensor([[0.5, 0.3, 0.0]])
    kl = sparse_kl(z, ids, probs, tail="bucket")
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert abs(float(kl) - expected) < 1e-6
    renorm = sparse_kl(z, ids, probs, tail="renormalize")
    expected = 0.625 * math.log(0.625 / 0.25) + 0.375 * math.log(0.375 / 0.25)
    assert abs(float(renorm) - expected) < 1e-6
    out = distill_loss(torch.eye(4)[:1], torch.zeros(4, 4), torch.tensor([0]), ids, probs,
                       tail="bucket", kl_weight=1.0)
    expected_bucket = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    assert abs(float(out.loss) - expected_bucket) < 1e-6


def test_teacher_targets_padding():
    ids = torch.tensor([[5, 2, -1, 7]])
    probs = torch.tensor([[0.6, 0.3, 0.0, 0.0]])
    out_ids, q, q_tail = teacher_targets(ids, probs, 10, tail="bucket")
    assert out_ids.tolist() == [[5, 2, 5, 5]]  # padding re-pointed at the most probable id
    assert torch.allclose(q, torch.tensor([[0.6, 0.3, 0.0, 0.0]]))
    assert torch.allclose(q_tail, torch.tensor([0.1]))
    _, q, q_tail = teacher_targets(ids, probs, 10, tail="renormalize", temperature=2.0)
    a, c = 0.6**0.5, 0.3**0.5
    assert torch.allclose(q, torch.tensor([[a / (a + c), c / (a + c), 0.0, 0.0]]))
    assert float(q_tail) == 0.0


def test_recompute_saves_no_vocabulary_sized_tensor():
    """Recompute mode: autograd keeps the inputs and a few numbers per token, never [tokens, vocab]."""
    n, v, k = 256, 2048, 8
    h, w, b, labels, ids, probs = make_inputs(seed=7, n=n, v=v, k=k)
    h.requires_grad_()
    w.requires_grad_()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        distill_loss(h, w, labels, ids, probs, lm_head_bias=b, tail="bucket", chunk_tokens=64,
                     grad_in_forward=False)
    inputs = sum(t.untyped_storage().nbytes() for t in (h, w, b))
    per_token = n * (k * 8 + k * 4 + 4 * 8)  # ids, q, and a handful of per-token scalars
    assert sum(saved.values()) <= inputs + per_token
    assert max(saved.values()) < n * v * 4 / 4  # nothing close to a logits tensor


def test_grad_in_forward_backward_runs_once_and_no_grad_skips_it():
    h, w, b, labels, ids, probs = make_inputs(seed=10)
    h.requires_grad_()
    out = distill_loss(h, w, labels, ids, probs)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()
    again = distill_loss(h, w, labels, ids, probs, grad_in_forward=False)
    again.loss.backward(retain_graph=True)
    again.loss.backward()  # recompute mode supports it
    with torch.no_grad():
        evaluated = distill_loss(h, w, labels, ids, probs)
    assert float(evaluated.loss) == pytest.approx(float(out.loss.detach()), rel=1e-6)


def test_bf16_hidden_with_fp32_weight():
    """Autocast-style inputs: gradients come back in each input's dtype and near the fp32 ones."""
    h, w, b, labels, ids, probs = make_inputs(seed=8)
    hb = h.bfloat16().requires_grad_()
    w32 = w.clone().requires_grad_()
    out = distill_loss(hb, w32, labels, ids, probs, chunk_tokens=16)
    out.loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    ref, gh, gw, _ = run(h.bfloat16().float(), w.bfloat16().float(), None, labels, ids, probs, chunk_tokens=16)
    close(out.loss.detach(), ref.loss.detach(), 2e-2)
    close(hb.grad, gh, 3e-2)
    close(w32.grad, gw, 3e-2)


def test_bad_input_is_named():
    h, w, b, labels, ids, probs = make_inputs(seed=9)
    bad = ids.clone()
    bad[0, 0] = V  # outside the student's vocabulary
    with pytest.raises(FamexError, match="vocabulary"):
        distill_loss(h, w, labels, bad, probs)
    with pytest.raises(FamexError, match="temperature 1"):
        distill_loss(h, w, labels, ids, probs, tail="bucket", temperature=2.0)
    with pytest.raises(FamexError, match="same tokens"):
        distill_loss(h, w, labels, ids[:-1], probs[:-1])
    with pytest.raises(FamexError, match="labels"):
        distill_loss(h, w, labels[:-1], ids, probs)
    with pytest.raises(FamexError, match="hidden size"):
        distill_loss(h[:, :-1], w, labels, ids, probs)
    nan = probs.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(FamexError, match="NaN"):
        distill_loss(h, w, labels, ids, nan)
    with pytest.raises(FamexError, match="kl_weight"):
        distill_loss(h, w, labels, ids, probs, kl_weight=1.5)
    with pytest.raises(FamexError, match="tail"):
        distill_loss(h, w, labels, ids, probs, tail="drop")
    big = labels.clone()
    big[1] = V
    with pytest.raises(FamexError, match="labels outside"):
        distill_loss(h, w, big, ids, probs)


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every matmul whose operands have a dimension of size ``vocab``
    (the lm_head's: forward, dL/dh, dL/dW), as they reach the kernels (after autocast)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.seen = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            mats = [a for a in args if torch.is_tensor(a) and a.dim() >= 2]
            if any(self.vocab in a.shape for a in mats):
                self.seen.append(tuple(a.dtype for a in mats))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_lm_head_matmuls_bf16_under_autocast_from_real_model(grad_in_forward):
    """From the real Apertus student (its final RMSNorm returns fp32 hidden states), under bf16
    autocast all three lm_head matmuls get bf16 operands — not fp32 as when W was cast to h.dtype —
    while the loss and the parameter gradients stay fp32."""
    from famex.distill.train import hidden_states
    from famex.models import build_student

    vocab = 96
    model = build_student("tiny-apertus", vocab, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (2, 16), generator=g),
             "position_ids": torch.arange(16).expand(2, 16), "segment_ids": torch.zeros(2, 16, dtype=torch.long)}
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    probs, ids = torch.randn(2, 16, vocab, generator=g).softmax(-1).topk(8)
    head = model.get_output_embeddings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = hidden_states(model, batch)
        assert h.dtype == torch.float32  # the premise: Apertus's final norm hands back fp32
        rec = _MatmulDtypes(vocab)
        with rec:
            out = distill_loss(h, head.weight, labels, ids, probs, chunk_tokens=8, grad_in_forward=grad_in_forward)
            out.loss.backward()
    # 32 tokens in chunks of 8 × (logits, dL/dh, dL/dW), plus the recomputed logits without grad_in_forward
    assert len(rec.seen) == 4 * (3 if grad_in_forward else 4)
    assert all(d == torch.bfloat16 for dts in rec.seen for d in dts), rec.seen
    assert out.loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    # Same loss as an fp32 reference from bf16-rounded operands (fp32 accumulation): within bf16 noise.
    ref = distill_loss(h.detach().bfloat16().float(), head.weight.detach().bfloat16().float(), labels, ids, probs)
    assert torch.allclose(out.loss.detach(), ref.loss, rtol=1e-2)


def test_dpo_lm_head_matmul_bf16_under_autocast_from_real_model():
    """DPO's answer log-probs (policy, reference, validation) from the real Apertus model under bf16
    autocast: the lm_head matmul gets bf16 operands, the log-softmax and the result stay fp32."""
    from famex.models import build_student
    from famex.posttrain.dpo import answer_logps

    vocab = 96
    model = build_student("tiny-apertus", vocab, seed=0)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, (2, 12), generator=g)
    labels[:, :4] = -100
    batch = {"input_ids": torch.randint(0, vocab, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "labels": labels}
    rec = _MatmulDtypes(vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16), rec:
        logps, counts = answer_logps(model, batch, chunk_tokens=8)
    assert rec.seen and all(d == torch.bfloat16 for dts in rec.seen for d in dts), rec.seen
    assert logps.dtype == torch.float32 and counts.tolist() == [8, 8]
    with torch.no_grad():
        ref, _ = answer_logps(model, batch)
    assert torch.allclose(logps.detach(), ref, rtol=2e-2)
