"""Pre-training distillation: the loss, the optimizer and the schedules (the trainer lives beside them).

- `losses`: `distill_loss` (chunked sparse-KL + CE from hidden states and the lm_head) and
  `sparse_kl` (the same KL from logits in memory).
- `optim`: `AdEMAMix`, `wsd_schedule`, `cosine_schedule`, `lr_lambda`.

Importing this package registers nothing and starts nothing.
"""

from famex.distill.losses import IGNORE_INDEX, LossOut, distill_loss, sparse_kl, teacher_targets
from famex.distill.optim import AdEMAMix, cosine_schedule, lr_lambda, wsd_schedule

__all__ = [
    "IGNORE_INDEX",
    "LossOut",
    "distill_loss",
    "sparse_kl",
    "teacher_targets",
    "AdEMAMix",
    "cosine_schedule",
    "lr_lambda",
    "wsd_schedule",
]
