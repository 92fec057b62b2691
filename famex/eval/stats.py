"""Uncertainty of evaluation figures: the standard error of a validation loss and of a paired difference.

The sampling unit is the packed val chunk (tokens within a chunk are correlated, chunks far less).
``famex eval`` writes each chunk's CE sum and token count to ``val_chunks.json`` (`VAL_CHUNKS_FILE`)
so that two evaluations of the same chunks can be compared pair by pair (`paired_se`): the paired
difference removes the chunk-to-chunk variation both models share, which is most of it.

What this module does not do: read models or data, or decide what the report prints (`famex.report`).
"""

from __future__ import annotations

import math
from pathlib import Path

from famex.utils import read_json

#: Per-chunk CE sums and token counts of an eval directory: ``{"ce_sum": [...], "tokens": [...]}``.
VAL_CHUNKS_FILE = "val_chunks.json"

#: A difference smaller than this many standard errors is reported as within noise.
NOISE_SE = 2.0


def ratio_se(sums: list[float], counts: list[int]) -> float | None:
    """Standard error of ``Σ sums / Σ counts`` over the chunks as the sampling unit: the ratio
    estimator's ``sqrt(n / (n − 1) · Σ (s_i − R·c_i)²) / Σ c_i``. None for fewer than two chunks."""
    n, total = len(sums), sum(counts)
    if n < 2 or total == 0:
        return None
    r = sum(sums) / total
    return math.sqrt(n / (n - 1) * sum((s - r * c) ** 2 for s, c in zip(sums, counts))) / total


def paired_se(eval_a: str | Path | None, eval_b: str | Path | None) -> float | None:
    """Standard error of val_loss(a) − val_loss(b), paired over the chunks both evaluations scored
    (their `VAL_CHUNKS_FILE`: the same chunks and token counts); None where either lacks the file."""
    try:
        a, b = (read_json(Path(e) / VAL_CHUNKS_FILE) for e in (eval_a, eval_b))
    except (TypeError, OSError, ValueError):
        return None
    if a.get("tokens") != b.get("tokens") or len(a.get("ce_sum", [])) != len(b.get("ce_sum", [])):
        return None
    return ratio_se([x - y for x, y in zip(a["ce_sum"], b["ce_sum"])], a["tokens"])


def within_noise(diff: float | None, se: float | None) -> bool | None:
    """Whether ``|diff| < NOISE_SE · se`` (None when either is unknown)."""
    if diff is None or se is None:
        return None
    return bool(abs(diff) < NOISE_SE * se)
