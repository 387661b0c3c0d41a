"""The loop's LM loss (target positions only, fused cross-entropy) equals HF's own loss in
value and gradients, with and without masks, with peft, and reaches plugins."""

import pytest
import torch

from factlab.model.build import build_model
from factlab.train import Loop, LoRA, Plugin, TrainConfig
from factlab.train.lm_loss import (IGNORE, LMOutput, causal_lm_loss, cross_entropy,
                                   linear_cross_entropy)


def _batch(seed, mask_frac):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (3, 24), generator=g)
    labels = ids.clone()
    labels[torch.rand(3, 24, generator=g) < mask_frac] = IGNORE
    return {"input_ids": ids, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _OtherHead(torch.nn.Linear):
    """Not exactly nn.Linear: causal_lm_loss takes its unfused path (head, then CE)."""


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("arch", ["gpt2-rope", "llama"])
@pytest.mark.parametrize("mask_frac", [0.0, 0.6])
def test_equals_hf_loss_and_gradients(arch, mask_frac, fused):
    m = build_model(arch, "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    if not fused:
        m.get_output_embeddings().__class__ = _OtherHead
    b = _batch(0, mask_frac)
    ref = m(**b).loss
    ref.backward()
    g_ref = _grads(m)
    m.zero_grad(set_to_none=True)
    loss, out = causal_lm_loss(m, m.get_output_embeddings(), b)
    loss.backward()
    g = _grads(m)
    assert isinstance(out, LMOutput)
    assert torch.allclose(loss, ref, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert torch.allclose(g[k], g_ref[k], atol=1e-6, rtol=1e-4), k
    # only target positions reach the head: (n, V) logits, n = number of shifted targets
    n = int((b["labels"][:, 1:] != IGNORE).sum())
    assert (out._logits is None) == fused  # fused: the (n, V) logits were never made
    assert out.hidden.shape[0] == n
    assert out.logits.shape == (n, 64) and out.targets.shape == (n,)
    assert int(out.mask.sum()) == n and not out.mask[:, -1].any()


def test_cross_entropy_matches_torch_and_handles_empty():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 33, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (50,), generator=g)
    a = torch.nn.functional.cross_entropy(x, t)
    (ga,) = torch.autograd.grad(a, x)
    b = cross_entropy(x, t)
    (gb,) = torch.autograd.grad(b, x)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-7)
    e = torch.zeros(0, 33, requires_grad=True)
    z = cross_entropy(e, torch.zeros(0, dtype=torch.long))
    z.backward()
    assert float(z.detach()) == 0.0 and e.grad.shape == (0, 33)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_fused_head_matches_linear_then_cross_entropy(bias, chunk):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = (0.5 * torch.randn(50, 16, generator=g)).requires_grad_()
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (40,), generator=g)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t)
    args = [h, w] + ([b] if bias else [])
    g_ref = torch.autograd.grad(3 * ref, args)
    got = linear_cross_entropy(h, w, b, t, chunk=chunk)
    g_got = torch.autograd.grad(3 * got, args)  # the upstream gradient is honoured
    assert torch.allclose(got, ref, atol=1e-5)
    for x, y in zip(g_got, g_ref):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)
    # a frozen head (LoRA finetuning) gets no weight gradient, the hidden states still do
    w.requires_grad_(False)
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, w, None, t, chunk=chunk), [h])
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    assert torch.allclose(gh, torch.autograd.grad(ref, [h])[0], atol=1e-6, rtol=1e-4)


def test_fused_head_under_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(80, 32, generator=g)).requires_grad_()
    t = torch.randint(0, 80, (64,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, None, t, chunk=10)
    got.backward()
    assert got.dtype == torch.float32 and abs(float(got) - float(ref)) < 0.02
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype


def test_with_peft_lora_equals_hf_loss():
    m = build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    pm = LoRA(r=4, r_embed=8)

    class L:  # the plugin's setup only needs loop.model
        model = m

    pm.setup(L)
    peft_model = L.model
    b = _batch(2, 0.5)
    ref = peft_model(**b).loss
    loss, _ = causal_lm_loss(peft_model, peft_model.get_output_embeddings(), b)
    assert torch.allclose(loss, ref, atol=1e-5)


class Capture(Plugin):
    name = "capture"

    def __init__(self):
        self.seen = []

    def extra_loss(self, loop, batch, out):
        self.seen.append((out.logits.shape, int(out.mask.sum()),
                          int((batch["labels"][:, 1:] != IGNORE).sum())))
        return None


class _QA:
    """Sequences whose first half is masked (a prompt), like answer-only QA batches."""
    seq_len = 16

    def sequences(self, start, n):
        import numpy as np

        rng = np.random.default_rng(start)
        ids = rng.integers(2, 64, (n, self.seq_len))
        labels = ids.copy()
        labels[:, : self.seq_len // 2] = IGNORE
        return {"input_ids": ids, "labels": labels}


def test_loop_passes_target_logits_to_plugins(tmp_path):
    m = build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    cap = Capture()
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=1, precision="no")
    Loop(m, _QA(), cfg, tmp_path, plugins=[cap], progress=False).run()
    assert len(cap.seen) == 3
    for shape, n_mask, n_labels in cap.seen:
        assert shape == (n_labels, 64) and n_mask == n_labels == 2 * 8


def test_trimming_trailing_padding_is_exact():
    from factlab.train.loop import trim_batch

    m = build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    b = _batch(3, 0.0)
    b["labels"][:, 13:] = IGNORE  # every row's last target is token 12
    b["labels"][1, 5:] = IGNORE
    t = trim_batch(b)
    assert t["input_ids"].shape == (3, 16)  # 13 rounded up to a multiple of 8
    full, _ = causal_lm_loss(m, m.get_output_embeddings(), b)
    cut, _ = causal_lm_loss(m, m.get_output_embeddings(), t)
    assert torch.allclose(full, cut, atol=1e-6)
    assert trim_batch({**b, "extra": b["labels"]})["input_ids"].shape == (3, 24)  # plugin keys
    assert trim_batch(_batch(4, 0.0))["input_ids"].shape == (3, 24)  # nothing to trim
