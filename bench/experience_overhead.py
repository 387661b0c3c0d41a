"""Cost of experience boundaries: the experience driver over T short experiences vs one
``Loop`` over the same optimizer steps, in the same run.

    python bench/experience_overhead.py [--experiences 200] [--steps 1] [--eval-every 50]

A stream of single-fact writes (memory experts' sequential edits, issue 13) is T
experiences of a step or two each; what each boundary costs (a fresh optimizer, hooks,
the loop's setup, a saved state every ``--eval-every`` experiences) decides whether
T = 1,000 fits in minutes. Both train the same tiny model on the same sequences for
``T x steps`` optimizer steps; the evaluation set is a no-op, so the difference is the
driver's own overhead. Prints seconds, ms per experience and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Rows:
    """Toy token rows, addressed by index (like every factlab stream)."""

    seq_len = 32

    def __init__(self, k: int = 0):
        self.k = k

    def sequences(self, start, n):
        ids = np.stack([(np.arange(32) * (1 + (self.k + start + i) % 5)) % 50
                        for i in range(n)]).astype(np.int64)
        return {"input_ids": ids, "labels": ids.copy()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiences", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from factlab.model.build import build_model
    from factlab.train import Loop, TrainConfig
    from factlab.train.experiences import Driver, Experience

    torch.set_num_threads(a.threads)
    T, S = a.experiences, a.steps

    def model():
        return build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)

    def cfg(steps):
        return TrainConfig(steps=steps, batch_size=4, lr=1e-3, log_every=max(1, steps),
                           precision="no", ckpt_minutes=0)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        Loop(model(), Rows(), cfg(T * S), Path(tmp) / "loop", progress=False,
             export=False).run()
        base = time.perf_counter() - t0
        exps = [Experience(f"e{i}", Rows(i), cfg(S)) for i in range(T)]
        t0 = time.perf_counter()
        d = Driver(model(), exps, {"none": lambda m: (0.0, None)}, Path(tmp) / "driver",
                   eval_every=a.eval_every, progress=False, export=False)
        d.run()
        drv = time.perf_counter() - t0
    print(f"{T} experiences x {S} step(s), state + row every {a.eval_every}, "
          f"{a.threads} threads")
    print(f"{'':28}{'seconds':>10}{'ms / experience':>18}")
    print(f"{'one Loop (baseline)':28}{base:10.2f}{1000 * base / T:18.1f}")
    print(f"{'Driver':28}{drv:10.2f}{1000 * drv / T:18.1f}")
    print(f"overhead per experience: {1000 * (drv - base) / T:.1f} ms; ratio {drv / base:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
