"""The training loop: loss falls, kill-and-resume equals an uninterrupted run, plugins
(LoRA, extra losses, batch hooks), NaN handling, the 2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factlab.errors import FactlabError
from factlab.model.build import build_model
from factlab.train import Loop, LoRA, Plugin, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from ddp_train import Toy  # noqa: E402


def tiny(arch="gpt2-rope"):
    return build_model(arch, "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)


def cfg(**kw):
    base = dict(steps=30, batch_size=4, lr=3e-3, log_every=5, precision="no")
    base.update(kw)
    return TrainConfig(**base)


def strip_timing(hist):
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in hist]


def test_loss_falls_and_export_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    hist = Loop(tiny(), Toy(), cfg(), tmp_path, progress=False).run()
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == \
        [h["step"] for h in hist]
    x = torch.arange(10)[None]
    assert m(x).logits.shape == (1, 10, 64)


class Kill(Plugin):
    name = "kill"

    def __init__(self, at):
        self.at = at

    def after_step(self, loop, step, logs):
        if step == self.at:
            raise KeyboardInterrupt  # a kill between checkpoints


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    c = cfg(ckpt_every=8, steps=30)
    full = Loop(tiny(), Toy(), c, tmp_path / "a", progress=False).run()
    with pytest.raises(KeyboardInterrupt):
        Loop(tiny(), Toy(), c, tmp_path / "b", progress=False, plugins=[Kill(13)]).run()
    state = torch.load(tmp_path / "b/checkpoint/trainer.pt", weights_only=True)
    assert state["step"] == 8
    resumed = Loop(tiny(), Toy(), c, tmp_path / "b", progress=False).run()
    assert strip_timing(resumed) == strip_timing(full)
    a = Loop(tiny(), Toy(), c, tmp_path / "a", progress=False)
    b = Loop(tiny(), Toy(), c, tmp_path / "b", progress=False)
    a.run(), b.run()  # finished runs: nothing to do, weights reloaded
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_lora_trains_adapters_only(tmp_path):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop = Loop(model, Toy(), cfg(steps=10), tmp_path, progress=False,
                plugins=[LoRA(r=4, r_embed=8)])
    loop.run()
    trained = {n for n, p in loop.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any("embed_in" in n for n in trained)
    assert any("query_key_value" in n for n in trained)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in loop.model.named_parameters() if "lora_" not in n}
    for k, v in before.items():
        if k in base:
            assert torch.equal(base[k].detach(), v), f"base weight {k} changed"
    # the export merges the adapters: a plain model that differs from the base
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    diff = (merged.state_dict()["gpt_neox.embed_in.weight"] - before["gpt_neox.embed_in.weight"])
    assert diff.abs().max() > 0


def test_lora_on_llama_targets_q_and_v(tmp_path):
    loop = Loop(tiny("llama"), Toy(), cfg(steps=2), tmp_path, progress=False,
                plugins=[LoRA(r=2, r_embed=4)])
    loop.run()
    trained = {n for n, p in loop.model.named_parameters() if p.requires_grad}
    assert any("q_proj" in n for n in trained) and any("v_proj" in n for n in trained)
    assert not any("k_proj" in n for n in trained)


class Extra(Plugin):
    name = "extra"

    def extra_loss(self, loop, batch, out):
        return torch.tensor(100.0)

    def next_batch(self, loop, step, batch):
        self.seen = step
        return batch


def test_plugin_hooks_are_called(tmp_path):
    p = Extra()
    hist = Loop(tiny(), Toy(), cfg(steps=3, log_every=1), tmp_path, progress=False,
                plugins=[p]).run()
    assert all(h["loss"] > 100 for h in hist) and p.seen == 2


class Poison(Plugin):
    name = "poison"

    def extra_loss(self, loop, batch, out):
        return torch.tensor(float("nan")) if loop.step >= 6 else None


def test_nan_loss_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(FactlabError, match="loss is nan at step 6"):
        Loop(tiny(), Toy(), cfg(steps=20, ckpt_every=4), tmp_path, progress=False,
             plugins=[Poison()]).run()
    assert torch.load(tmp_path / "checkpoint/trainer.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "model").exists()


def test_bad_batch_split_is_an_error(tmp_path):
    with pytest.raises(FactlabError, match="divisible"):
        Loop(tiny(), Toy(), cfg(batch_size=6, grad_accum=4), tmp_path, progress=False).run()


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = Loop(tiny(), Toy(), cfg(steps=5, log_every=1), tmp_path / "a", progress=False).run()
    b = Loop(tiny(), Toy(), cfg(steps=5, log_every=1, grad_accum=2), tmp_path / "b",
             progress=False).run()
    assert np.allclose([h["loss"] for h in a], [h["loss"] for h in b], atol=1e-4)


def test_two_processes_train(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine: torchrun + gloo."""
    script = Path(__file__).parent / "ddp_train.py"
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                        "no", str(script), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "ddp.json").read_text())
    assert res["world_size"] == 2
    assert res["last"] < 0.6 * res["first"]
