"""Prompt pools over a frozen LM (L2P, DualPrompt, CODA-Prompt; issue 15 §1): zero-length
prompts are the backbone exactly; training moves prompts and keys only; selection is per
example (batch size does not change predictions or scores); diversified selection and
disjoint masks move the usage histogram the way they should; CODA's earlier components
stay frozen; save -> load reproduces predictions; bad sizes fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make
from factlab.continual.data import FactStream, experience_data
from factlab.continual.prompts import (PromptLearning, PromptPool, matching_rate,
                                       selections)
from factlab.continual.query import NameIndex, frozen_query
from factlab.errors import FactlabError
from factlab.evaluate.generate import generate
from factlab.evaluate.score import score_answers

KINDS = ("l2p", "dual", "coda")
BOTH = [(k, pl) for pl in ("input", "prefix") for k in KINDS]


@pytest.fixture(scope="module")
def setup():
    from factlab.model.build import build_model
    from factlab.tokens.tokenizer import world_tokenizer

    w = make(people=12, unknown=4, augment="single",
             pools={"cities": 8, "universities": 8, "majors": 8, "companies": 8})
    tok = world_tokenizer(w, 600)
    model = build_model("gpt2-rope", "tiny", len(tok), 256, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    names = list(w.world.people.names) if hasattr(w, "world") else list(w.people.names)
    return w, tok, model, names


def _ids(tok, names):
    return [list(s) for s in NameIndex.from_names(tok, names).ids]


def _questions(names):
    return [f"Where was {n} born?" for n in names] + [f"What did {n} study?" for n in names]


def test_name_query_is_causal_and_found(setup):
    w, tok, model, names = setup
    ni = NameIndex.from_names(tok, names)
    q = [tok(f"Where was {n} born?")["input_ids"] for n in names[:4]]
    qa = [tok(f"Where was {n} born? In Paris, France")["input_ids"] for n in names[:4]]
    a = frozen_query(model, torch.tensor([q[0]]), None, layer=1, names=ni)
    b = frozen_query(model, torch.tensor([qa[0]]), None, layer=1, names=ni)
    assert torch.allclose(a, b, atol=1e-5)  # the answer appended does not move the query
    assert ni.misses == 0
    other = frozen_query(model, torch.tensor([q[1]]), None, layer=1, names=ni)
    assert not torch.allclose(a, other)
    mean_a = frozen_query(model, torch.tensor([q[0]]), None, layer=1, pool="mean")
    mean_b = frozen_query(model, torch.tensor([qa[0]]), None, layer=1, pool="mean")
    assert not torch.allclose(mean_a, mean_b)  # the mean pool reads the answer too


@pytest.mark.parametrize("kind,placement", BOTH)
def test_zero_length_prompts_are_the_backbone(setup, kind, placement):
    w, tok, model, names = setup
    pp = PromptPool(model, kind=kind, length=0, g_length=0, name_ids=_ids(tok, names),
                    placement=placement)
    x = torch.tensor([tok(f"Where was {names[0]} born?")["input_ids"]])
    assert torch.equal(pp(input_ids=x).logits, model(input_ids=x).logits)
    qs = _questions(names[:6])
    assert generate(pp, tok, qs, batch_size=4) == generate(model, tok, qs, batch_size=4)
    golds = ["Paris"] * len(qs)
    assert np.array_equal(score_answers(pp, tok, qs, golds).logprob,
                          score_answers(model, tok, qs, golds).logprob)
    assert pp.n_virtual == 0


def _train(model, tok, w, names, kind, tmp_path, steps=15, **kw):
    from factlab.train import Loop, TrainConfig

    data = experience_data(w, tok, 0)
    plug = PromptLearning(kind=kind, names=names, length=2, g_length=2, top=2, size=6, **kw)
    loop = Loop(model, FactStream(data, 128, tok, qa_ratio=0.5), TrainConfig(
        steps=steps, batch_size=4, lr=5e-2, log_every=100, precision="no", ckpt_minutes=0,
        warmup=2, weight_decay=0.0), tmp_path, plugins=[plug], tokenizer=tok, progress=False,
        export=False, keep_checkpoint=False)
    loop.run()
    return loop.model


@pytest.mark.parametrize("kind,placement", BOTH)
def test_training_moves_prompts_only_and_selection_is_per_example(setup, kind, placement,
                                                                  tmp_path):
    w, tok, model, names = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pp = PromptPool(model, kind=kind, length=2, g_length=2, top=2, size=6,
                    name_ids=_ids(tok, names), placement=placement)
    p0 = pp.prompts.detach().clone()
    k0 = pp.keys.detach().clone()
    trained = _train(model, tok, w, names, kind, tmp_path / kind, placement=placement)
    assert trained.placement == placement
    assert isinstance(trained, PromptPool)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(trained.prompts.detach(), p0)
    if kind != "coda":  # the key pull moves the selected keys
        assert not torch.equal(trained.keys.detach(), k0)
        assert trained.usage[1].sum() > 0
    qs = _questions(names)
    a = generate(trained, tok, qs, batch_size=1)
    b = generate(trained, tok, qs, batch_size=64)
    assert a == b
    s1 = score_answers(trained, tok, qs, a, batch_size=1).logprob
    s64 = score_answers(trained, tok, qs, a, batch_size=64).logprob
    assert np.allclose(s1, s64, atol=1e-4)
    s1, s64 = selections(trained, tok, qs, batch_size=1), selections(trained, tok, qs,
                                                                      batch_size=64)
    assert torch.equal(s1, s64) if kind != "coda" else torch.allclose(s1, s64, atol=1e-5)
    # generation (HF generate over the prompt) and the forward agree: every greedy token
    # is the forward's argmax after the question and the tokens before it
    trained.eval()
    for q in qs[:4]:
        qi = torch.tensor([tok(q)["input_ids"]])
        with torch.no_grad():
            out = trained.generate(input_ids=qi, attention_mask=torch.ones_like(qi),
                                   max_new_tokens=6, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            n = qi.shape[1]
            assert torch.equal(out[:, :n], qi)
            new = out[0, n:].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id) + 1]
            lg = trained(input_ids=out[:, :n + len(new)]).logits[0]
        assert lg[n - 1:n - 1 + len(new)].argmax(-1).tolist() == new


def test_diversified_selection_and_disjoint_masks_move_usage(setup):
    w, tok, model, names = setup
    x = [tok(q)["input_ids"] for q in _questions(names)]
    L = max(map(len, x))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in x])
    am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in x])

    def usage(**kw):
        pp = PromptPool(model, kind="l2p", size=8, top=2, length=1, experiences=2,
                        name_ids=_ids(tok, names), **kw)
        pp.train()
        for t in (1, 2):
            pp.start_experience(t)
            pp.prompt_embeds(ids, am)
        return pp.usage

    plain, div, masked = usage(), usage(diversify=True), usage(masks="disjoint")
    top = lambda u: set(u.topk(2).indices.tolist())  # noqa: E731
    # the same inputs and keys: without diversification experience 2 selects exactly as 1
    assert torch.equal(plain[1], plain[2])
    # with it, experience 2 moves away from the prompts experience 1 used most
    share1 = div[2][list(top(div[1]))].sum() / div[2].sum()
    assert share1 < plain[2][list(top(plain[1]))].sum() / plain[2].sum()
    # disjoint masks: experience t selects only its own prompts
    assert masked[1][2:].sum() == 0 and masked[2][:2].sum() == 0 and masked[2][4:].sum() == 0
    assert masked[1][:2].sum() == masked[2][2:4].sum() == 2 * len(x)


def test_matching_rate():
    usage = torch.tensor([[0, 0, 0, 0], [9, 8, 1, 0], [0, 1, 7, 9.]])
    sel = torch.tensor([[0, 1], [0, 3], [2, 3], [0, 1]])
    assert matching_rate(sel, usage, [1, 1, 2, 0]) == pytest.approx((1 + 0.5 + 1) / 3)
    assert matching_rate(sel, usage, [0, 0, 0, 0]) is None


def test_coda_keeps_earlier_components_frozen(setup, tmp_path):
    from factlab.train.experiences import Driver, Experience
    from factlab.train import TrainConfig

    w, tok, model, names = setup
    data = experience_data(w, tok, 0)
    cfg = TrainConfig(steps=8, batch_size=4, lr=5e-2, log_every=100, precision="no",
                      ckpt_minutes=0, warmup=1, weight_decay=0.0)
    exps = [Experience(f"e{t}", FactStream(data, 128, tok, qa_ratio=0.5, seed=t), cfg)
            for t in (1, 2)]
    seen = {}

    class Spy(PromptLearning):
        def setup(self, loop):
            super().setup(loop)
            seen.setdefault(("start", loop.experience), loop.model.keys.detach().clone())

        def after_experience(self, loop, t):
            m = loop.model
            seen[t] = (m.prompts.detach().clone(), m.keys.detach().clone(),
                       m.attention.detach().clone())

    plug = Spy(kind="coda", names=names, size=6, length=2)
    drv = Driver(model, exps, {}, tmp_path / "coda", plugins=[plug], tokenizer=tok,
                 progress=False, export=False)
    drv.run()
    g1 = list(drv.model.group(1))
    assert g1 == [0, 1, 2]
    for a, b in zip(seen[1], seen[2]):
        assert torch.equal(a[g1], b[g1])  # experience 1's components untouched by 2
        assert not torch.equal(a[3:], b[3:])
    # experience 2's keys started orthogonal to experience 1's
    k = torch.nn.functional.normalize(seen[("start", 2)], dim=-1)
    assert torch.equal(k[:3], torch.nn.functional.normalize(seen[1][1], dim=-1)[:3])
    assert (k[:3] @ k[3:].t()).abs().max() < 1e-4


@pytest.mark.parametrize("kind,placement", BOTH)
def test_save_load_reproduces_predictions(setup, kind, placement, tmp_path):
    from factlab.model.load import load_any

    w, tok, model, names = setup
    model.save_pretrained(tmp_path / "bb")
    bb = load_any(tmp_path / "bb")
    trained = _train(bb, tok, w, names, kind, tmp_path / "run", steps=6, placement=placement)
    trained.save_pretrained(tmp_path / "pool")
    again = load_any(tmp_path / "pool")
    assert isinstance(again, PromptPool) and again.kind == kind
    assert again.placement == placement and torch.equal(again.prompts, trained.prompts)
    qs = _questions(names[:8])
    assert generate(again, tok, qs) == generate(trained, tok, qs)
    assert torch.equal(again.usage, trained.usage)


def test_bad_sizes(setup):
    w, tok, model, names = setup
    ids = _ids(tok, names)
    with pytest.raises(FactlabError, match="cannot select the top 5"):
        PromptPool(model, size=3, top=5, name_ids=ids)
    with pytest.raises(FactlabError, match="beyond the model's depth"):
        PromptPool(model, layer=99, name_ids=ids)
    with pytest.raises(FactlabError, match="need a pool of >= 6"):
        PromptPool(model, size=4, top=2, masks="disjoint", experiences=3, name_ids=ids)
    with pytest.raises(FactlabError, match="needs the entities' names"):
        PromptPool(model, pool="name", name_ids=None)
    pp = PromptPool(model, size=4, top=4, length=70, name_ids=ids)
    x = torch.tensor([tok(f"Where was {names[0]} born?")["input_ids"]])
    with pytest.raises(FactlabError, match="exceed the model's context"):
        pp(input_ids=x)
    pp = PromptPool(model, size=4, top=4, length=70, name_ids=ids, placement="prefix")
    with pytest.raises(FactlabError, match="exceed the model's context"):
        pp(input_ids=x)
    with pytest.raises(FactlabError, match="g_length .3. must equal length .2."):
        PromptPool(model, kind="dual", length=2, g_length=3, name_ids=ids, placement="prefix")
    with pytest.raises(FactlabError, match="placement 'middle'"):
        PromptPool(model, name_ids=ids, placement="middle")
