"""Runs several famex training stages one after another inside one torchrun launch (for
tests/test_distributed.py: one process-group start instead of one per configuration).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_jobs.py JOBS.json

JOBS.json is a list of ``{"stage": "distill" | "sft", "config": {...}, "fail_on_rank": R}``; with
``fail_on_rank`` that rank raises right after its training loop returned (the other ranks carry on
to the end of the stage), to check that a failing rank fails the stage.
"""

from __future__ import annotations

import json
import os
import sys


def main(path: str) -> None:
    from famex.distill import train as distill_mod
    from famex.posttrain import sft as sft_mod

    for job in json.loads(open(path).read()):
        mod = distill_mod if job["stage"] == "distill" else sft_mod
        cfg_cls, run = (distill_mod.DistillConfig, distill_mod.distill) if job["stage"] == "distill" else (sft_mod.SftConfig, sft_mod.sft)
        real = mod.train
        if job.get("fail_on_rank") is not None:
            def failing(*args, _real=real, _rank=int(job["fail_on_rank"]), **kw):
                result = _real(*args, **kw)
                if int(os.environ.get("RANK", "0")) == _rank:
                    raise RuntimeError(f"injected failure on rank {_rank}")
                return result

            mod.train = failing
        try:
            cfg = cfg_cls(**job["config"])
            cfg.validate()
            run(cfg)
        finally:
            mod.train = real


if __name__ == "__main__":
    main(sys.argv[1])
