"""Distillation losses: KL to the stored sparse teacher top-k plus label cross-entropy.

The loss of a token t with a label is

    kl_weight · KL_t + (1 − kl_weight) · CE_t

where CE_t = −log softmax(z_t)[label_t] and KL_t = KL(teacher_t ‖ student_t) over the teacher's
stored top-k (ids and probabilities, see `teacher_targets` for padding and the two tail modes).
`distill_loss` computes it from the final hidden states and the lm_head weight without ever
holding the student's full-vocabulary logits for the whole batch: it works chunk by chunk of
tokens with a hand-written gradient (a torch.autograd.Function), forming each chunk's gradient
while its logits are at hand or recomputing them in backward (peak extra memory ≈ one chunk of
logits either way).
`sparse_kl` is the same KL from logits already in memory, for small inputs (eval, QAD logging).

Conventions shared by both:
- Alignment: row t of `hidden` / `student_logits` predicts `labels[t]`, and the teacher row t is
  the teacher's distribution for that same prediction. Labels are already shifted; nothing here
  shifts them.
- Temperature τ: the student is softmax(z/τ); the teacher is re-tempered from its stored
  probabilities (p_i^(1/τ), renormalized over the top-k); KL is multiplied by τ² (Hinton et al.)
  so gradient magnitudes do not shrink with τ. CE always uses τ = 1.
- Normalization: sums over tokens whose label is not `ignore_index`; the mean divides by that
  count. Both KL and CE use the same tokens (a labelled token whose teacher row is all padding
  adds CE but no KL, and still counts). `LossOut` carries the sums and the count so gradient
  accumulation across micro-batches and ranks can divide by the global count instead.

What this module does not do: read the logit store, check that a store chunk matches a data
chunk, shift labels, all-reduce counts across ranks, or run the model body.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famex.errors import FamexError

IGNORE_INDEX = -100
TAILS = ("renormalize", "bucket")


@dataclass
class LossOut:
    """Result of `distill_loss`. All tensors are 0-d.

    `loss` and `loss_sum` are differentiable (fp32, fp64 for fp64 inputs); the KL and CE parts are
    for logging and carry no gradient; `count` is int64. With no teacher, `kl_sum` is 0 and
    `loss_sum == ce_sum`.
    """

    loss: torch.Tensor
    """loss_sum / max(count, 1): the mean over this call's labelled tokens."""
    loss_sum: torch.Tensor
    """kl_weight · kl_sum + (1 − kl_weight) · ce_sum, summed over labelled tokens."""
    kl_sum: torch.Tensor
    """Σ KL_t over labelled tokens (τ²-scaled)."""
    ce_sum: torch.Tensor
    """Σ CE_t over labelled tokens."""
    count: torch.Tensor
    """Number of labelled tokens (label != ignore_index)."""
    kl: torch.Tensor
    """kl_sum / max(count, 1)."""
    ce: torch.Tensor
    """ce_sum / max(count, 1)."""


# ----------------------------------------------------------------------------------------------
# Teacher side


def _check_options(tail: str, temperature: float) -> None:
    if tail not in TAILS:
        raise FamexError(f"unknown tail mode {tail!r}; use one of {', '.join(TAILS)}")
    if not temperature > 0:
        raise FamexError(f"temperature must be > 0, got {temperature}")
    if tail == "bucket" and temperature != 1.0:
        raise FamexError(
            f"tail='bucket' needs temperature 1 (got {temperature}): the stored top-k does not say "
            "how the left-out mass is spread over the vocabulary, so it cannot be re-tempered — "
            "use tail='renormalize' with a temperature, or the bucket at temperature 1"
        )


def teacher_targets(
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    vocab_size: int,
    *,
    tail: str = "renormalize",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's side of the KL, ready for gathers and scatters into student rows.

    Args:
        teacher_ids: integer [..., k], teacher token ids (any integer dtype).
        teacher_probs: float [..., k], the teacher's probabilities of those ids at temperature 1.
            A row may hold fewer than k real entries: **padding slots have probability 0** (their
            id may be anything, −1 included). A probability that underflowed to 0 is treated the
            same way, which is exact: it carries no mass in either tail mode. The real ids of a
            row must be distinct (a top-k is).
        vocab_size: the student's vocabulary; a real id outside [0, vocab_size) is an error.
        tail: "renormalize" — the top-k is rescaled to sum to 1 and the student is pushed to put
            all its mass on it; "bucket" — the left-out mass r = 1 − Σ p_i is one more outcome whose
            student probability is the student's mass outside the top-k (temperature 1 only).
        temperature: τ > 0; the top-k is re-tempered as p_i^(1/τ) / Σ_j p_j^(1/τ) (exact for the
            renormalized top-k, since p_i ∝ exp(teacher logit_i)).

    Returns:
        ids: int64 [..., k]. Padding slots are re-pointed at the row's most probable real id, so
            writing one value at every id of a row touches exactly the row's real entries.
        q: float32 [..., k], teacher probability per slot (0 in padding slots).
        q_tail: float32 [...], the tail bucket's probability (all zeros for "renormalize").
        A row without any real entry gets q = 0 and q_tail = 0: that token adds no KL.
    """
    _check_options(tail, temperature)
    if teacher_ids.shape != teacher_probs.shape:
        raise FamexError(
            f"teacher ids {tuple(teacher_ids.shape)} and probs {tuple(teacher_probs.shape)} differ in "
            "shape — both come from the same logit-store chunk and must be [tokens, k]"
        )
    ids = teacher_ids.long()
    p = teacher_probs.float()
    if p.numel() and not bool(torch.isfinite(p).all()):
        raise FamexError("teacher probabilities contain NaN or inf — the logit store is corrupt; regenerate it")
    real = (p > 0) & (ids >= 0)
    if real.any() and int(ids[real].max()) >= vocab_size:
        raise FamexError(
            f"teacher id {int(ids[real].max())} is outside the student's vocabulary of {vocab_size} — "
            "the logit store was made with another tokenizer; students must share the teacher's vocabulary"
        )
    p = torch.where(real, p, 0.0)
    has = real.any(-1)
    # Re-point padding at a real id of the same row: scatters then never touch a token the
    # teacher did not list (which would wrongly remove it from the student's tail bucket).
    best = ids.gather(-1, p.argmax(-1, keepdim=True)).clamp_min(0)
    ids = torch.where(real, ids, best)

    if tail == "bucket":
        s = p.sum(-1)
        r = (1.0 - s).clamp_min(0.0)
        total = (s + r).clamp_min(torch.finfo(torch.float32).tiny)  # = max(s, 1)
        q = p / total.unsqueeze(-1)
        q_tail = torch.where(has, r / total, 0.0)
        return ids, q, q_tail

    if temperature == 1.0:
        w = p
    else:
        # In log space relative to the row maximum, so p^(1/τ) neither overflows nor underflows
        # for the entries that matter.
        logp = torch.where(real, p.clamp_min(torch.finfo(torch.float32).tiny).log(), -torch.inf)
        top = torch.where(has, logp.amax(-1), 0.0).unsqueeze(-1)
        w = torch.where(real, ((logp - top) / temperature).exp(), 0.0)
    q = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return ids, q, torch.zeros(q.shape[:-1], dtype=torch.float32, device=q.device)


# ----------------------------------------------------------------------------------------------
# Sparse KL from logits in memory


def sparse_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    tail: str = "renormalize",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) from full student logits (differentiable by autograd).

    Args:
        student_logits: float [..., V].
        teacher_ids, teacher_probs: [..., k], as in `teacher_targets` (padding: probability 0).
        tail, temperature: as in `teacher_targets`; the result is τ²·KL.

    Returns:
        [...] (fp32; fp64 for fp64 logits), one KL per token (0 for rows with no real teacher
        entry). No masking or averaging: callers select labelled tokens and reduce as they need.

    Materializes a log-softmax the size of the logits: for training batches use `distill_loss`.
    """
    ids, q, q_tail = teacher_targets(
        teacher_ids, teacher_probs, student_logits.shape[-1], tail=tail, temperature=temperature
    )
    ls = torch.log_softmax(_wide(student_logits) / temperature, dim=-1)
    kl = torch.special.xlogy(q, q).sum(-1) - (q * ls.gather(-1, ids)).sum(-1)
    if tail == "bucket":
        # log of the student's mass outside the top-k, without the cancellation of log(1 − Σ p_i).
        log_tail = ls.scatter(-1, ids, -torch.inf).logsumexp(-1)
        kl = kl + torch.where(q_tail > 0, q_tail * (q_tail.log() - log_tail), 0.0)
    return (temperature**2) * kl


# ----------------------------------------------------------------------------------------------
# Chunked loss from hidden states (forward and hand-written backward)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Softmax maths run in fp32 (fp64 stays fp64, so gradcheck works)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = torch.matmul(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    return _wide(z)


def _exp_normalizer_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite z [n, V] with exp(z − rowmax); return (logsumexp [n], row sums [n, 1]).

    In place because z is the one chunk-sized buffer; torch.logsumexp would allocate another.
    """
    m = z.amax(-1, keepdim=True)
    z.sub_(m).exp_()
    s = z.sum(-1, keepdim=True)
    return (m + s.log()).squeeze(-1), s


def _chunk(h, w, b, y, mask, ids, q, q_tail, temperature, bucket, g_kl=None, g_ce=None):
    """Per-token KL and CE of one chunk of tokens; with weights also d(g_kl·Σ KL + g_ce·Σ CE)/dz.

    Shapes: h [n, d], w [V, d], b [V] or None, y [n] (ignored tokens already set to 0), mask [n]
    (1 = labelled), ids/q [n, k] and q_tail [n] from `teacher_targets` (None: no teacher).
    Returns (kl [n] or None, ce [n], grad [n, V] fp32 or None). The gradient, with P = softmax(z/τ),
    S = Σ_{j∉K} P_j (the student's tail) and c = Σ q_i + q_tail, is

        dCE/dz = softmax(z) − onehot(label)
        dKL/dz = τ · (c·P − scatter(q) − q_tail · 1[j∉K] · P / S)

    (the τ² of the KL times the 1/τ of z/τ leaves τ). Everything is done in one [n, V] buffer
    (two when τ ≠ 1), in place.
    """
    z = _logits(h, w, b)
    teacher = ids is not None
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    z_k = z.gather(1, ids) if teacher else None
    u = z / temperature if teacher and temperature != 1.0 else None
    lse1, sums = _exp_normalizer_(z)  # z now holds exp(z − max)
    ce = (lse1 - z_y) * mask
    p1 = z.div_(sums)  # softmax(z)
    kl = p_t = p_k = log_tail = None
    if teacher:
        if u is None:
            lse_t, p_t = lse1, p1
        else:
            lse_t, sums_t = _exp_normalizer_(u)
            p_t = u.div_(sums_t)
        kl = torch.special.xlogy(q, q).sum(-1) - (q * (z_k / temperature - lse_t.unsqueeze(1))).sum(-1)
        if bucket:  # τ = 1 here, so p_t is p1
            # Student mass outside the top-k, summed directly (no 1 − Σ cancellation). The top-k
            # entries are zeroed for the sum and written back below when a gradient is wanted.
            p_k = p_t.gather(1, ids)
            tail_mass = p_t.scatter_(1, ids, 0.0).sum(-1).clamp_min(torch.finfo(p_t.dtype).tiny)
            log_tail = tail_mass.log()
            kl = kl + torch.where(q_tail > 0, q_tail * (q_tail.log() - log_tail), 0.0)
        kl = (temperature**2) * kl * mask
    if g_ce is None:
        return kl, ce, None

    a = g_ce * mask
    if not teacher:
        return kl, ce, p1.mul_(a.unsqueeze(1)).scatter_add_(1, y.unsqueeze(1), (-a).unsqueeze(1).to(p1.dtype))
    bk = g_kl * temperature * mask
    coef_in = bk * (q.sum(-1) + q_tail)
    if p_t is p1:
        coef_in = coef_in + a
        if bucket:
            # Outside the top-k the tail term lowers the coefficient; inside it does not.
            g = p1.mul_((coef_in - bk * q_tail / log_tail.exp()).unsqueeze(1))
            g.scatter_(1, ids, p_k * coef_in.unsqueeze(1))
        else:
            g = p1.mul_(coef_in.unsqueeze(1))
    else:
        g = p1.mul_(a.unsqueeze(1)).add_(p_t.mul_(coef_in.unsqueeze(1)))
        del p_t, u
    g.scatter_add_(1, ids, (-bk.unsqueeze(1) * q).to(g.dtype))
    g.scatter_add_(1, y.unsqueeze(1), (-a).unsqueeze(1).to(g.dtype))
    return kl, ce, g


def matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmuls run in: autocast's (bf16) for fp32 hidden states under autocast —
    as `F.linear` would — else the hidden states' own dtype (fp64 stays fp64 for gradcheck)."""
    dev = h.device.type
    if h.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _lm_head_loop(h, w, b, targets, temperature, chunk, bucket, weights, mm_dtype):
    """Run `_chunk` over all chunks; with weights (g_kl, g_ce) also return the gradients.

    The three lm_head matmuls run in ``mm_dtype`` (fp32 accumulation inside the kernel, as under
    autocast); the softmax maths in fp32. Returns (kl_sum, ce_sum, grad_h, grad_w, grad_b); the
    gradients are None when weights is None or when the corresponding input needs none (need flags
    in `weights[2:]`).
    """
    n = h.shape[0]
    wc = w.to(mm_dtype)  # one cast per call, as autocast would do for the lm_head matmul
    bc = None if b is None else b.to(mm_dtype)
    y, mask, ids, q, q_tail = targets
    teacher = ids is not None
    kl_sum = torch.zeros((), dtype=torch.float64, device=h.device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=h.device)
    grad_h = grad_w = grad_b = None
    g_kl = g_ce = None
    if weights is not None:
        g_kl, g_ce, need_h, need_w, need_b = weights
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32  # fp32 sums across chunks
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            t = (ids[sl], q[sl], q_tail[sl]) if teacher else (None, None, None)
            hs = h[sl].to(mm_dtype)  # a chunk at a time: no second copy of all hidden states
            kl, ce, g = _chunk(hs, wc, bc, y[sl], mask[sl], *t, temperature, bucket, g_kl, g_ce)
            ce_sum += ce.sum()
            if teacher:
                kl_sum += kl.sum()
            if g is None:
                continue
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(mm_dtype)
            if grad_h is not None:
                if grad_h.dtype == mm_dtype:
                    torch.matmul(g, wc, out=grad_h[sl])
                else:
                    grad_h[sl] = torch.matmul(g, wc)
            if grad_w is not None:
                if grad_w.dtype == mm_dtype:
                    grad_w.addmm_(g.t(), hs)
                else:
                    grad_w += torch.matmul(g.t(), hs).to(grad_w.dtype)
            del g
    if grad_w is not None:
        grad_w = grad_w.to(w.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(b.dtype)
    return kl_sum, ce_sum, grad_h, grad_w, grad_b


class _ChunkedDistill(torch.autograd.Function):
    """loss_sum = kl_weight·Σ KL + (1 − kl_weight)·Σ CE from hidden states and the lm_head.

    Outputs (loss_sum, kl_sum, ce_sum); only loss_sum is differentiable. Two ways to get the
    gradient, same memory bound (one chunk of logits at a time):
    - grad_in_forward: the forward already holds each chunk's softmax, so it turns it into the
      chunk's dL/dz at once and multiplies out the h and W gradients (3 lm_head matmuls per
      token, as the naive loss); backward only scales them by the incoming scalar.
    - otherwise the forward keeps nothing but its inputs and backward recomputes each chunk's
      logits (4 matmuls per token).
    Matmuls run in `matmul_dtype` (bf16 under autocast even when the final norm returns fp32 hidden
    states; h and W are cast to it, as autocast would); softmax maths in fp32; W and bias gradients
    are summed in fp32 across chunks.
    """

    @staticmethod
    def forward(ctx, h, w, b, y, mask, ids, q, q_tail, kl_weight, temperature, chunk, bucket, grad_in_forward, mm_dtype):
        targets = (y, mask, ids, q, q_tail)
        weights = None
        if grad_in_forward:
            one = torch.ones((), dtype=_wide(h).dtype, device=h.device)
            weights = (one * kl_weight, one * (1.0 - kl_weight), *ctx.needs_input_grad[:3])
        kl_sum, ce_sum, gh, gw, gb = _lm_head_loop(h, w, b, targets, temperature, chunk, bucket, weights, mm_dtype)
        if grad_in_forward:
            ctx.grads = (gh, gw, gb)
        else:
            ctx.save_for_backward(h, w, b, y, mask, ids, q, q_tail)
        ctx.kl_weight, ctx.temperature, ctx.chunk, ctx.bucket = kl_weight, temperature, chunk, bucket
        ctx.grad_in_forward, ctx.mm_dtype = grad_in_forward, mm_dtype
        loss_sum = kl_weight * kl_sum + (1.0 - kl_weight) * ce_sum
        dt = _wide(h).dtype
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return loss_sum.to(dt), kl_sum.to(dt), ce_sum.to(dt)

    @staticmethod
    def backward(ctx, g_loss, _g_kl, _g_ce):
        if ctx.grad_in_forward:
            if ctx.grads is None:
                raise RuntimeError("distill_loss: backward ran twice through a grad_in_forward loss "
                                   "(retain_graph); pass grad_in_forward=False for that")
            grads, ctx.grads = ctx.grads, None
            # In place: these buffers are ours alone, and a copy of W's gradient would cost V·d.
            scaled = [None if g is None else g.mul_(g_loss.to(g.dtype)) for g in grads]
        else:
            h, w, b, y, mask, ids, q, q_tail = ctx.saved_tensors
            g = g_loss.to(_wide(h).dtype)
            weights = (g * ctx.kl_weight, g * (1.0 - ctx.kl_weight), *ctx.needs_input_grad[:3])
            _, _, *scaled = _lm_head_loop(
                h, w, b, (y, mask, ids, q, q_tail), ctx.temperature, ctx.chunk, ctx.bucket, weights, ctx.mm_dtype
            )
        return (*scaled, None, None, None, None, None, None, None, None, None, None, None)


def distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    teacher_probs: torch.Tensor | None = None,
    *,
    kl_weight: float = 0.9,
    temperature: float = 1.0,
    tail: str = "renormalize",
    chunk_tokens: int | None = 1024,
    lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    grad_in_forward: bool = True,
) -> LossOut:
    """kl_weight · KL(teacher top-k ‖ student) + (1 − kl_weight) · CE(labels), chunked over tokens.

    Args:
        hidden: float [..., d], the student's final hidden states (after the final norm); any
            leading shape ([B, T, d] or [N, d]). Under autocast the lm_head matmuls run in the
            autocast dtype (bf16) even for fp32 hidden states, as `F.linear` would; softmax in fp32.
        lm_head_weight: [V, d] (the tied embedding for tied models); gets a gradient.
        labels: int [...], the next token for each row of `hidden`; `ignore_index` marks tokens
            without a label (padding, document ends): they count in neither KL nor CE.
        teacher_ids, teacher_probs: [..., k] top-k ids and probabilities at temperature 1 (see
            `teacher_targets`: padding slots have probability 0). None for both: CE only, and
            `kl_weight` is ignored (loss = CE).
        kl_weight: weight of the KL in [0, 1]; the paper's 0.9; 1.0 for QAD.
        temperature, tail: as in `teacher_targets`.
        chunk_tokens: tokens per chunk; peak extra memory ≈ chunk_tokens · V · 4 bytes (two such
            buffers with temperature ≠ 1). None: one chunk.
        lm_head_bias: optional [V].
        ignore_index: label value of tokens without a label.
        grad_in_forward: True — each chunk's gradient is formed while its logits are at hand
            (3 lm_head matmuls, like the naive loss; the h/W gradients, which backward would
            allocate anyway, exist from the forward on; backward may run only once). False —
            backward recomputes each chunk's logits (4 matmuls; retain_graph works). Either way
            only one chunk of logits exists at a time. Ignored when no gradient is wanted
            (no_grad or no input requiring grad): then only the forward matmul runs.

    Returns:
        `LossOut`: loss = loss_sum / max(count, 1) over this call's labelled tokens. For gradient
        accumulation over micro-batches and ranks, backpropagate loss_sum / global_count instead
        (global_count = all-reduced sum of `count` over the optimizer step).
    """
    if not 0.0 <= kl_weight <= 1.0:
        raise FamexError(f"kl_weight must lie in [0, 1], got {kl_weight}")
    _check_options(tail, temperature)
    if chunk_tokens is not None and chunk_tokens < 1:
        raise FamexError(f"chunk_tokens must be ≥ 1 (or None for one chunk), got {chunk_tokens}")
    if (teacher_ids is None) != (teacher_probs is None):
        raise FamexError("pass both teacher_ids and teacher_probs, or neither (CE only)")
    vocab, d = lm_head_weight.shape
    if hidden.shape[-1] != d:
        raise FamexError(
            f"hidden size mismatch: hidden states have {hidden.shape[-1]} features, lm_head expects {d}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise FamexError(
            f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape[:-1])} — "
            "one label per hidden row (already shifted)"
        )
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise FamexError(f"lm_head bias has shape {tuple(lm_head_bias.shape)}, expected ({vocab},)")

    h = hidden.reshape(-1, d)
    n = h.shape[0]
    y = labels.reshape(-1).long()
    mask_b = y != ignore_index
    if mask_b.any() and (int(y[mask_b].min()) < 0 or int(y[mask_b].max()) >= vocab):
        raise FamexError(
            f"labels outside [0, {vocab}) — the data was tokenized with another vocabulary than the "
            "student's (or the ignore index is not " + str(ignore_index) + ")"
        )
    mask = mask_b.to(_wide(h).dtype)
    y = torch.where(mask_b, y, 0)
    count = mask_b.sum()

    ids = q = q_tail = None
    if teacher_ids is not None:
        if teacher_ids.shape[:-1] != hidden.shape[:-1]:
            raise FamexError(
                f"teacher rows {tuple(teacher_ids.shape[:-1])} do not match hidden states "
                f"{tuple(hidden.shape[:-1])} — the logit-store chunk and the data chunk must be the same tokens"
            )
        ids, q, q_tail = teacher_targets(
            teacher_ids, teacher_probs, vocab, tail=tail, temperature=temperature
        )
        ids = ids.reshape(n, -1)
        q = q.reshape(n, -1)
        q_tail = q_tail.reshape(n)
    else:
        kl_weight = 0.0

    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
    )
    loss_sum, kl_sum, ce_sum = _ChunkedDistill.apply(
        h, lm_head_weight, lm_head_bias, y, mask, ids, q, q_tail, float(kl_weight),
        float(temperature), int(chunk_tokens or max(n, 1)), tail == "bucket", grad_in_forward and wants_grad,
        matmul_dtype(h),
    )
    denom = count.clamp_min(1).to(loss_sum.dtype)
    return LossOut(
        loss=loss_sum / denom,
        loss_sum=loss_sum,
        kl_sum=kl_sum,
        ce_sum=ce_sum,
        count=count,
        kl=kl_sum / denom,
        ce=ce_sum / denom,
    )
