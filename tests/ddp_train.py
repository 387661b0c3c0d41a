"""Trained by tests/test_train.py under `accelerate launch --num_processes 2 --cpu`."""

import json
import sys

import numpy as np


class Toy:
    seq_len = 32

    def sequences(self, start, n):
        ids = np.stack([(np.arange(32) * (1 + (start + i) % 5)) % 50 for i in range(n)])
        return {"input_ids": ids.astype(np.int64), "labels": ids.astype(np.int64)}


def main(out):
    from accelerate import PartialState

    from factlab.model.build import build_model
    from factlab.train import Loop, TrainConfig

    model = build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, log_every=5, precision="no")
    hist = Loop(model, Toy(), cfg, out, progress=False).run()
    state = PartialState()
    if state.is_main_process:
        with open(f"{out}/ddp.json", "w") as f:
            json.dump({"world_size": state.num_processes, "first": hist[0]["loss"],
                       "last": hist[-1]["loss"]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
