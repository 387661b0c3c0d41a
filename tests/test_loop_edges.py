"""Edge cases of the loop's contract found in review: token-weighted gradient
accumulation, group lr 0, sparse-group checks, RowAdagrad's accumulator dtype on resume,
no optimizer kept alive across a driver's experiences, a driver restore whose plugin reads
its loop, prefix-prepending wrappers, absolute backbone paths, strict checkpoints."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factlab.errors import FactlabError
from factlab.model.build import build_model
from factlab.model.load import load_any
from factlab.model.wrapper import FrozenBackbone
from factlab.train import Loop, LoRA, Plugin, TrainConfig
from factlab.train.checkpoint import frozen_fingerprint, load_trainable, save_trainable
from factlab.train.experiences import Driver, Experience
from factlab.train.optim import RowAdagrad

sys.path.insert(0, str(Path(__file__).parent))
from ddp_train import Toy  # noqa: E402


def tiny(arch="gpt2-rope", seed=0):
    return build_model(arch, "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=seed)


def cfg(**kw):
    return TrainConfig(**{**dict(steps=4, batch_size=4, lr=3e-3, log_every=1, precision="no",
                                 ckpt_minutes=0), **kw})


class Ragged(Toy):
    """Rows with very different numbers of targets (answers of uneven length)."""

    def sequences(self, start, n):
        b = super().sequences(start, n)
        for i in range(n):
            b["labels"][i, : 4 + 24 * ((start + i) % 2)] = -100
        return b


def test_grad_accumulation_weighs_micro_batches_by_their_target_tokens(tmp_path):
    a = Loop(tiny(), Ragged(), cfg(), tmp_path / "a", progress=False)
    a.run()
    b = Loop(tiny(), Ragged(), cfg(grad_accum=2), tmp_path / "b", progress=False)
    b.run()
    assert np.allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], atol=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


class Groups(Plugin):
    name = "groups"

    def __init__(self, **group):
        self.group = group

    def trainable(self, loop):
        return [{"params": [p for n, p in loop.model.named_parameters() if "layers.0." in n],
                 **self.group}]


def test_a_group_lr_of_zero_is_kept_and_sparse_weight_decay_is_refused(tmp_path):
    m = tiny()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    loop = Loop(m, Toy(), cfg(), tmp_path / "a", plugins=[Groups(lr=0.0, weight_decay=0.0)],
                progress=False)
    loop.run()
    assert {g["lr"] for g in loop.groups} == {0.0}
    assert all(torch.equal(p, before[n]) for n, p in loop.model.named_parameters())
    with pytest.raises(FactlabError, match="weight decay on a sparse-row group"):
        Loop(tiny(), Toy(), cfg(), tmp_path / "b", plugins=[Groups(sparse=True, weight_decay=0.1)],
             progress=False).run()


def test_row_adagrad_keeps_an_fp32_accumulator_through_a_resume():
    w = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.bfloat16))
    opt = RowAdagrad([w], lr=0.1)
    w.grad = torch.ones_like(w) * 1e-3
    opt.step()
    assert opt.state[w]["sum"].dtype == torch.float32
    again = RowAdagrad([w], lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.state[w]["sum"].dtype == torch.float32
    assert torch.equal(again.state[w]["sum"], opt.state[w]["sum"])


class ReadsLoop(Plugin):
    """Reads its loop's config and output folder in setup (as a real plugin may)."""

    name = "reads"

    def __init__(self, fail_at=None):
        self.fail_at, self.lrs = fail_at, []

    def setup(self, loop):
        self.lrs.append((loop.cfg.lr, loop.out.name))

    def before_experience(self, loop, i):
        if i == self.fail_at:
            raise KeyboardInterrupt


def exps():
    return [Experience(f"e{k}", Toy(), cfg(lr=1e-3 * k)) for k in (1, 2, 3)]


def test_driver_keeps_no_optimizer_alive_and_restores_with_a_loop_like_stub(tmp_path):
    ev = {"a": lambda m: (0.0, None)}
    d = Driver(tiny(), exps(), ev, tmp_path / "a", progress=False, export=False)
    d.run()
    assert len(getattr(d.accelerator, "_optimizers", [])) == 0
    with pytest.raises(KeyboardInterrupt):
        Driver(tiny(), exps(), ev, tmp_path / "b", plugins=[ReadsLoop(fail_at=3)],
               progress=False).run()
    r = ReadsLoop()
    Driver(tiny(), exps(), ev, tmp_path / "b", plugins=[r], progress=False).run()
    assert r.lrs[0] == (0.003, "exp3-e3")  # the restore's stub is experience 3's loop


class Prefix(FrozenBackbone):
    """Prepends P learned input embeddings (prompt tuning): P more positions than labels."""

    def __init__(self, backbone, P=4, **kw):
        super().__init__(backbone, **kw)
        self.prompt = torch.nn.Parameter(torch.randn(P, backbone.config.hidden_size) * 0.02)

    def forward(self, input_ids=None, attention_mask=None, **kw):
        x = self.get_input_embeddings()(input_ids)
        x = torch.cat([self.prompt.expand(x.shape[0], -1, -1), x], dim=1)
        return self.backbone(inputs_embeds=x, **kw)


def test_a_prefix_prepending_wrapper_trains_in_the_loop(tmp_path):
    w = Prefix(tiny())
    p0 = w.prompt.detach().clone()
    hist = Loop(w, Toy(), cfg(steps=20, lr=3e-2, log_every=5), tmp_path, progress=False).run()
    assert not torch.equal(w.prompt, p0) and hist[-1]["loss"] < hist[0]["loss"]


def test_saved_wrappers_name_their_backbone_by_an_absolute_path(tmp_path, monkeypatch):
    tiny().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    w = Prefix(load_any("base"))
    assert Path(w.backbone_path).is_absolute()
    w.save_pretrained(tmp_path / "wrapped")
    monkeypatch.chdir("/")
    x = torch.randint(2, 64, (1, 8))
    assert torch.equal(load_any(tmp_path / "wrapped")(input_ids=x).logits, w(input_ids=x).logits)
    with pytest.raises(FactlabError, match="float32 weights, given bfloat16"):
        ck = tmp_path / "ck.safetensors"
        fr = frozen_fingerprint(w)
        save_trainable(w, ck)
        load_trainable(Prefix(load_any(tmp_path / "base", dtype=torch.bfloat16)), ck, fr)


def test_checkpoints_refuse_tensors_that_are_frozen_now_and_fingerprint_0d_params(tmp_path):
    m = tiny()
    save_trainable(m, tmp_path / "all.safetensors")
    fr = frozen_fingerprint(m)
    m.get_input_embeddings().requires_grad_(False)
    with pytest.raises(FactlabError, match="unexpected"):
        load_trainable(m, tmp_path / "all.safetensors", fr)
    mod = torch.nn.Module()
    mod.scale = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)
    assert frozen_fingerprint(mod)["tensors"] == 1


def test_merged_lora_export_of_a_tied_model_with_an_embedding_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny("llama")
    m.config.tie_word_embeddings = True  # as SmolLM2's
    m.tie_weights()
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    loop = Loop(m, Toy(), cfg(steps=5, lr=3e-2), tmp_path, plugins=[LoRA(4, 8)], progress=False)
    loop.run()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    x = torch.randint(2, 64, (2, 10))
    with torch.no_grad():
        assert torch.allclose(exported(x).logits, loop.model(input_ids=x).logits, atol=1e-5)
