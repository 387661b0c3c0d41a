"""The experience driver (issue 12 §1): row 0 before training, hooks in order, plugin state
saved after after_experience and restored on resume, eval_every, streams replaced by a
plugin, LoRA over several experiences."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factlab.errors import FactlabError
from factlab.model.build import build_model
from factlab.train import LoRA, Plugin, TrainConfig
from factlab.train.experiences import Driver, Experience

sys.path.insert(0, str(Path(__file__).parent))
from ddp_train import Toy  # noqa: E402


class Shifted(Toy):
    """Toy sequences whose pattern depends on the experience."""

    def __init__(self, k):
        self.k = k

    def sequences(self, start, n):
        ids = np.stack([(np.arange(32) * (self.k + (start + i) % 3)) % 50 for i in range(n)])
        return {"input_ids": ids.astype(np.int64), "labels": ids.astype(np.int64),
                "experience": np.full(n, self.k, dtype=np.int64)}


def tiny():
    return build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)


def cfg(steps=6):
    return TrainConfig(steps=steps, batch_size=4, lr=3e-3, log_every=2, precision="no",
                       ckpt_minutes=0)


def loss_on(k):
    """An 'evaluation set': minus the mean loss on experience k's data (higher is better)."""
    batch = {key: torch.from_numpy(v) for key, v in Shifted(k).sequences(10_000, 4).items()}

    def fn(model):
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        return -float(out.loss), [{"k": k, "loss": float(out.loss)}]
    return fn


def experiences(T=3):
    return [Experience(f"e{k}", Shifted(k), cfg()) for k in range(1, T + 1)]


class Recorder(Plugin):
    """Logs the hook calls; its 'fisher' is computed in after_experience."""

    name = "recorder"

    def __init__(self, fail_before=None):
        self.calls, self.fisher, self.fail_before = [], {}, fail_before

    def before_experience(self, loop, i):
        if i == self.fail_before:
            raise KeyboardInterrupt  # a kill after the previous experience's state
        self.calls.append(("before", i, loop.experience))

    def after_experience(self, loop, i):
        self.calls.append(("after", i))
        self.fisher[str(i)] = float(sum(p.detach().abs().sum() for p in loop.model.parameters()))

    def state_dict(self):
        return {"fisher": json.dumps(self.fisher)}

    def load_state_dict(self, st):
        if st:
            self.fisher = json.loads(st["fisher"])


def evals():
    return {"e1": loss_on(1), "e2": loss_on(2), "e3": loss_on(3)}


def test_rows_hooks_and_resume_after_a_kill(tmp_path):
    full_rec = Recorder()
    R = Driver(tiny(), experiences(), evals(), tmp_path / "full", plugins=[full_rec],
               progress=False).run()
    assert R["t"] == [0, 1, 2, 3] and R["sets"] == ["e1", "e2", "e3"]
    m = np.array(R["matrix"])
    assert m[1, 0] > m[0, 0] and m[2, 1] > m[0, 1]  # each experience learned
    assert full_rec.calls == [("before", 1, 1), ("after", 1), ("before", 2, 2), ("after", 2),
                              ("before", 3, 3), ("after", 3)]
    assert (tmp_path / "full" / "predictions" / "t2_e3.jsonl").is_file()
    assert (tmp_path / "full" / "model" / "config.json").is_file()

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        Driver(tiny(), experiences(), evals(), out, plugins=[Recorder(fail_before=3)],
               progress=False).run()
    assert json.loads((out / "R.json").read_text())["t"] == [0, 1, 2]
    rec = Recorder()
    R2 = Driver(tiny(), experiences(), evals(), out, plugins=[rec], progress=False).run()
    assert rec.calls == [("before", 3, 3), ("after", 3)]  # 1 and 2 were not trained again
    assert set(rec.fisher) == {"1", "2", "3"}  # fishers of 1, 2 restored from the state
    assert rec.fisher == full_rec.fisher
    assert R2["matrix"] == R["matrix"]


def test_eval_every_k_and_resume_retrains_from_the_last_saved_state(tmp_path):
    exps = [Experience(f"e{k}", Shifted(k % 3 + 1), cfg(3)) for k in range(5)]
    full = Driver(tiny(), exps, {"a": loss_on(1)}, tmp_path / "a", eval_every=2,
                  progress=False).run()
    assert full["t"] == [0, 2, 4, 5]
    assert not list((tmp_path / "a").glob("exp*/checkpoint"))  # cheap path: none kept
    with pytest.raises(KeyboardInterrupt):
        Driver(tiny(), exps, {"a": loss_on(1)}, tmp_path / "b", eval_every=2,
               plugins=[Recorder(fail_before=4)], progress=False).run()
    rec = Recorder()
    again = Driver(tiny(), exps, {"a": loss_on(1)}, tmp_path / "b", eval_every=2,
                   plugins=[rec], progress=False).run()
    assert [c[1] for c in rec.calls if c[0] == "before"] == [3, 4, 5]
    assert again["matrix"] == full["matrix"]


class Joint(Plugin):
    """Replaces each experience's stream with experience 1's (a plugin-owned stream)."""

    name = "joint"

    def __init__(self):
        self.seen = []

    def before_experience(self, loop, i):
        loop.stream = loop.driver.experiences[0].stream

    def extra_loss(self, loop, batch, out):
        self.seen.append((loop.experience, int(batch["experience"][0])))


def test_a_plugin_may_replace_the_stream_of_an_experience(tmp_path):
    j = Joint()
    Driver(tiny(), experiences(2), {"a": loss_on(1)}, tmp_path, plugins=[j],
           progress=False).run()
    assert {e for e, _ in j.seen} == {1, 2} and {k for _, k in j.seen} == {1}


def test_lora_over_experiences_wraps_once_and_resumes(tmp_path):
    from peft import PeftModel

    d = Driver(tiny(), experiences(2), {"a": loss_on(1)}, tmp_path, plugins=[LoRA(4, 8)],
               progress=False)
    R = d.run()
    assert isinstance(d.model, PeftModel)
    assert not any("base_model.model.base_model" in n for n, _ in d.model.named_parameters())
    # a finished run: state restored (LoRA set up first), nothing trained, same rows
    d2 = Driver(tiny(), experiences(2), {"a": loss_on(1)}, tmp_path, plugins=[LoRA(4, 8)],
                progress=False)
    assert d2.run()["matrix"] == R["matrix"]
    x = torch.randint(2, 64, (1, 10))
    assert torch.equal(d.model(input_ids=x).logits, d2.model(input_ids=x).logits)


def test_another_run_in_the_same_directory_is_refused(tmp_path):
    Driver(tiny(), experiences(1), {"a": loss_on(1)}, tmp_path, progress=False).run()
    with pytest.raises(FactlabError, match="other experiences"):
        Driver(tiny(), experiences(2), {"a": loss_on(1)}, tmp_path, progress=False).run()


class PerExperience(Plugin):
    """Experience t trains only the t-th layer's MLP output projection (a toy of methods
    whose trainable set changes with the experience: a new adapter, new components)."""

    name = "per_experience"

    def trainable(self, loop):
        layer = loop.model.gpt_neox.layers[loop.experience - 1]
        return list(layer.mlp.dense_4h_to_h.parameters())


def test_a_state_holds_what_every_experience_so_far_trained(tmp_path):
    from safetensors.torch import load_file

    class Kill(Plugin):
        name = "kill"

        def before_experience(self, loop, t):
            if t == 2:
                raise KeyboardInterrupt

    whole = Driver(tiny(), experiences(2), {"e1": loss_on(1)}, tmp_path / "whole",
                   plugins=[PerExperience()], progress=False, export=False)
    whole.run()
    saved = set(load_file(tmp_path / "whole" / "state" / "model.safetensors"))
    assert {k for k in saved if "dense_4h_to_h" in k} == {
        f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.{w}" for i in (0, 1) for w in ("weight", "bias")}
    with pytest.raises(KeyboardInterrupt):
        Driver(tiny(), experiences(2), {"e1": loss_on(1)}, tmp_path / "cut",
               plugins=[PerExperience(), Kill()], progress=False, export=False).run()
    # resumed after experience 1: what experience 1 trained loads, experience 2 retrains
    again = Driver(tiny(), experiences(2), {"e1": loss_on(1)}, tmp_path / "cut",
                   plugins=[PerExperience()], progress=False, export=False)
    again.run()
    a, b = whole.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.R["matrix"] == whole.R["matrix"]
