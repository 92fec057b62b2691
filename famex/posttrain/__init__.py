"""Post-training: instruct models from distilled students.

- `sft`: the `famex sft` stage — supervised fine-tuning on chat data (`famex data --chat`), loss on
  assistant tokens only, optionally with the distillation loss to an instruct teacher's stored logits;
  the shared training loop of `famex.distill.trainer`.
- `dpo`: the `famex dpo` stage — DPO on preference pairs against a frozen reference whose
  log-probabilities are computed once and cached; the same training loop.
- `losses`: the maths (answer log-probabilities, the DPO loss).
- `demo`: the offline demo chat and preference sets, answered by the instruct teacher.

Chat rendering and the assistant mask live in `famex.data.chat`.
"""
