"""The loop's widened contract (issue 12 §2-3): bookkeeping columns, extended batches,
per-position NLL / argmax, parameter groups and optimizers, stop(), timed checkpoints,
trainable-only checkpoints, a real SIGKILL resume, non-destructive LoRA export."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from factlab.errors import FactlabError
from factlab.model.build import build_model
from factlab.model.wrapper import FrozenBackbone
from factlab.train import Loop, LoRA, Plugin, TrainConfig
from factlab.train.lm_loss import causal_lm_loss, shifted_targets

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_train import Toy  # noqa: E402


def tiny(arch="gpt2-rope", seed=0):
    return build_model(arch, "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=seed)


def cfg(**kw):
    base = dict(steps=12, batch_size=4, lr=3e-3, log_every=2, precision="no", ckpt_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


class Tagged(Toy):
    """Toy rows with per-row bookkeeping columns and answer-only labels on some rows."""

    model_inputs = frozenset({"input_ids"})

    def sequences(self, start, n):
        b = super().sequences(start, n)
        b["labels"][:, 20:] = -100  # trailing positions without target: trimmed
        b["example_id"] = np.arange(start, start + n, dtype=np.int64)
        b["experience"] = np.full(n, 7, dtype=np.int64)
        return b


class Spy(Plugin):
    name = "spy"

    def __init__(self):
        self.batches, self.forward_keys = [], []

    def setup(self, loop):
        if not getattr(self, "_hooked", False):
            loop.model.register_forward_pre_hook(
                lambda m, a, kw: self.forward_keys.append(set(kw)), with_kwargs=True)
            self._hooked = True

    def extra_loss(self, loop, batch, out):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return None


def test_bookkeeping_columns_are_kept_trimmed_batches_and_never_reach_forward(tmp_path):
    spy = Spy()
    Loop(tiny(), Tagged(), cfg(steps=3), tmp_path, plugins=[spy], progress=False).run()
    b = spy.batches[0]
    assert b["input_ids"].shape[1] == 24  # trimmed after the last target (col 20 -> 24)
    assert b["example_id"].tolist() == [0, 1, 2, 3] and b["experience"].tolist() == [7] * 4
    assert spy.batches[1]["example_id"].tolist() == [4, 5, 6, 7]
    assert spy.forward_keys and all("example_id" not in k and "experience" not in k
                                    and "labels" not in k for k in spy.forward_keys)


class Double(Plugin):
    """Extends every batch with as many rows again, each marked by example_id -1."""

    name = "double"

    def __init__(self):
        self.rows = []

    def next_batch(self, loop, step, batch):
        extra = {k: v.clone() for k, v in batch.items()}
        extra["example_id"][:] = -1
        return {k: torch.cat([batch[k], extra[k]]) for k in batch}

    def extra_loss(self, loop, batch, out):
        self.rows.append((loop.step, batch["example_id"].tolist(), out.rows))


@pytest.mark.parametrize("accum", [1, 2])
def test_rows_added_by_next_batch_are_trained(tmp_path, accum):
    p = Double()
    Loop(tiny(), Tagged(), cfg(steps=2, grad_accum=accum), tmp_path, plugins=[p],
         progress=False).run()
    step0 = [ids for s, ids, _ in p.rows if s == 0]
    assert len(step0) == accum
    flat = [i for ids in step0 for i in ids]
    assert sorted(flat) == [-1, -1, -1, -1, 0, 1, 2, 3]


def test_lm_output_per_position_nll_argmax_and_rows():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(2, 64, (3, 16))
    labels = ids.clone()
    labels[0, :10] = -100
    labels[2] = -100  # a row without targets
    loss, out = causal_lm_loss(model, model.get_output_embeddings(),
                               {"input_ids": ids, "labels": labels})
    logits = model(ids).logits
    tgt = shifted_targets(labels)
    m = tgt != -100
    ref = torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="none")
    assert torch.allclose(out.nll, ref, atol=1e-5)
    assert torch.equal(out.argmax, logits[m].argmax(-1) == tgt[m])
    assert out.row.tolist() == m.nonzero()[:, 0].tolist()
    per_row = [ref[out.row == r].sum().item() for r in range(2)]
    assert np.allclose(out.row_nll()[:2].tolist(), per_row, atol=1e-4)
    assert out.row_nll()[2] == 0 and not out.row_all_argmax()[2]
    assert np.isclose(out.row_max_nll()[0].item(), ref[out.row == 0].max().item(), atol=1e-5)
    # labels that are the model's own argmax at every position: every row all-argmax
    _, out2 = causal_lm_loss(model, model.get_output_embeddings(),
                             {"input_ids": ids, "labels": torch.cat(
                                 [torch.full((3, 1), -100), logits.argmax(-1)[:, :-1]], 1)})
    assert out2.row_all_argmax().all()


class Claim(Plugin):
    def __init__(self, plugin_name, select, **group):
        self.name, self.select, self.group = plugin_name, select, group

    def trainable(self, loop):
        ps = [p for n, p in loop.model.named_parameters() if self.select(n)]
        return [{"params": ps, **self.group}] if self.group else ps


def test_plugins_parameter_groups_are_united_with_their_own_lr(tmp_path):
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = Claim("a", lambda n: "layers.0.attention" in n, lr=1e-2, name="attn0")
    b = Claim("b", lambda n: "final_layer_norm" in n)
    loop = Loop(model, Toy(), cfg(steps=3), tmp_path, plugins=[a, b], progress=False)
    loop.run()
    changed = {n for n, p in loop.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("layers.0.attention" in n for n in changed) and any("final_layer_norm" in n for n in changed)
    assert all("layers.0.attention" in n or "final_layer_norm" in n for n in changed)
    lrs = {g["name"]: g["lr"] for g in loop.groups}
    assert lrs == {"attn0": 1e-2, "b": 3e-3}
    c = Claim("c", lambda n: "final_layer_norm" in n)
    with pytest.raises(FactlabError, match="claimed by two groups"):
        Loop(tiny(), Toy(), cfg(steps=1), tmp_path / "x", plugins=[b, c], progress=False).run()


@pytest.mark.parametrize("opt", ["adafactor", "sgd"])
def test_other_optimizers_train(tmp_path, opt):
    hist = Loop(tiny(), Toy(), cfg(steps=30, optimizer=opt, lr=3e-2 if opt == "sgd" else 3e-3,
                                   momentum=0.9 if opt == "sgd" else 0.0, log_every=5),
                tmp_path, progress=False).run()
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]


class Table(FrozenBackbone):
    """A bank-like sparse table added to the input embeddings of a few token ids."""

    def __init__(self, backbone, rows=1000, **kw):
        super().__init__(backbone, **kw)
        self.table = torch.nn.Embedding(rows, backbone.config.hidden_size, sparse=True)
        torch.nn.init.zeros_(self.table.weight)

    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.get_input_embeddings()(input_ids) + self.table(input_ids % 10)
        return self.backbone(inputs_embeds=x, attention_mask=attention_mask, **kw)


class SparseGroups(Plugin):
    name = "sparse"

    def trainable(self, loop):
        return [{"params": [loop.model.table.weight], "sparse": True, "lr": 0.05}]


@pytest.mark.parametrize("which", ["row_adagrad", "sparse_adam"])
def test_sparse_row_optimizer_touches_only_used_rows(tmp_path, which):
    model = Table(tiny())
    loop = Loop(model, Toy(), cfg(steps=4, sparse_optimizer=which), tmp_path,
                plugins=[SparseGroups()], progress=False)
    hist = loop.run()
    w = loop.model.table.weight.detach()
    assert w[:10].abs().sum(1).gt(0).all() and w[10:].abs().sum() == 0
    bytes_ = hist[0]["optimizer_state_bytes"]
    if which == "row_adagrad":  # one float per row, not 2 x rows x width
        assert bytes_ == 1000 * 4
    else:
        assert bytes_ >= 2 * 1000 * w.shape[1] * 4
    # checkpoint: only the table, not the frozen model
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "checkpoint" / "model.safetensors")) == {"table.weight"}


class StopAt(Plugin):
    name = "stopat"

    def __init__(self, at):
        self.at = at

    def after_step(self, loop, step, logs):
        if step == self.at:
            loop.stop()


def test_stop_ends_early_checkpoints_exports_and_stays_stopped(tmp_path):
    hist = Loop(tiny(), Toy(), cfg(steps=50), tmp_path, plugins=[StopAt(5)],
                progress=False).run()
    assert hist[-1]["step"] == 5 and (tmp_path / "model" / "config.json").is_file()
    st = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)
    assert st["step"] == 5 and st["stopped"]
    again = Loop(tiny(), Toy(), cfg(steps=50), tmp_path, progress=False)
    assert again.run()[-1]["step"] == 5 and again.stopped


class Boom(Plugin):
    name = "boom"

    def after_step(self, loop, step, logs):
        if step == 9:
            raise KeyboardInterrupt


def test_timed_checkpoints_without_ckpt_every(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        Loop(tiny(), Toy(), cfg(steps=20, ckpt_minutes=1e-6), tmp_path, plugins=[Boom()],
             progress=False).run()
    st = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)
    assert st["step"] == 8  # the last log step before the interrupt (log_every=2)


KILL_SCRIPT = r"""
import sys, time
sys.path.insert(0, {here!r})
from ddp_train import Toy
from factlab.model.build import build_model
from factlab.train import Loop, Plugin, TrainConfig

class Slow(Plugin):
    name = "slow"
    def after_step(self, loop, step, logs):
        time.sleep({sleep})

model = build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
cfg = TrainConfig(steps=40, batch_size=4, lr=3e-3, log_every=5, precision="no",
                  ckpt_every=5, ckpt_minutes=0)
Loop(model, Toy(), cfg, sys.argv[1], plugins=[Slow()], progress=False).run()
"""


def test_sigkill_and_resume_gives_the_same_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(here=str(HERE), sleep=0.15))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "trainer.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                if torch.load(state, weights_only=True)["step"] >= 10:
                    break
            except Exception:  # being written
                pass
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 10 <= step < 40
    # resume, and an uninterrupted run, in processes like the killed one (same threads)
    fast = tmp_path / "fast.py"
    fast.write_text(KILL_SCRIPT.format(here=str(HERE), sleep=0))
    for d in (out, tmp_path / "full"):
        r = subprocess.run([sys.executable, str(fast), str(d)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(out / "model" / "model.safetensors")
    b = load_file(tmp_path / "full" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert steps == list(range(5, 41, 5))


def test_lora_checkpoint_is_adapters_only_and_refuses_another_base(tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(KeyboardInterrupt):
        Loop(tiny(), Toy(), cfg(steps=20, ckpt_every=4), tmp_path, plugins=[LoRA(4, 8), Boom()],
             progress=False).run()
    keys = set(load_file(tmp_path / "checkpoint" / "model.safetensors"))
    assert keys and all("lora_" in k for k in keys)
    with pytest.raises(FactlabError, match="other frozen weights"):
        Loop(tiny(seed=1), Toy(), cfg(steps=20, ckpt_every=4), tmp_path, plugins=[LoRA(4, 8)],
             progress=False).run()


def test_lora_export_is_merged_without_touching_the_live_model_and_setup_is_idempotent(tmp_path):
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    loop = Loop(tiny(), Toy(), cfg(steps=6), tmp_path / "a", plugins=[LoRA(4, 8)], progress=False)
    loop.run()
    live = loop.model
    assert isinstance(live, PeftModel)
    lora_before = {n: p.detach().clone() for n, p in live.named_parameters() if "lora_" in n}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    ref = copy.deepcopy(live).merge_and_unload()
    x = torch.randint(2, 64, (2, 12))
    assert torch.allclose(exported(x).logits, ref(x).logits, atol=1e-5)
    assert not torch.allclose(exported(x).logits, tiny()(x).logits, atol=1e-3)
    assert all(torch.equal(p, lora_before[n]) for n, p in live.named_parameters() if "lora_" in n)
    # a second loop on the same model goes on training the same adapter (no re-wrap)
    loop2 = Loop(live, Toy(), cfg(steps=3), tmp_path / "b", plugins=[LoRA(4, 8)], progress=False)
    loop2.run()
    assert loop2.model is live
    assert not any(".base_model.model.base_model" in n for n, _ in live.named_parameters())
    assert any(not torch.equal(p, lora_before[n]) for n, p in live.named_parameters()
               if "lora_" in n)
