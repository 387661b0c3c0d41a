"""Per-experience LoRA adapters with a router (issue 15 §2): a routed model equals its base
before training, routing is exact where experiences are separable by their inputs,
hard routing is batch-composition invariant, the Driver trains only the current adapter,
expansion adds what it reports, save -> load_any and a killed run's resume reproduce the
model, and bad input is one clear error."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from factlab.continual.data import ExperienceData, FactStream
from factlab.continual.router import ExperienceAdapters, RoutedAdapters, route
from factlab.errors import FactlabError
from factlab.evaluate.generate import generate, qa_evaluator
from factlab.evaluate.score import score_answers
from factlab.model.build import build_model
from factlab.model.load import load_any
from factlab.text.qa import prompt
from factlab.tokens.encode import EncodedDocs, doc_prefix, encode_qa
from factlab.train import Plugin, TrainConfig
from factlab.train.experiences import Driver, Experience

# experience t's names are written with letters of its own: no token is shared
LETTERS = {0: ("bcdfg", "ae"), 1: ("klmnp", "io"), 2: ("rstvz", "uy")}
CITIES = ["Paris", "Oslo", "Lima", "Quito", "Accra", "Hanoi"]
JOBS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark"]
ASK = ["Where does {} live?", "Where does {} work?"]
HELD_OUT = "Which city is home to {}?"  # a template no experience trains on


def _names(t: int, n: int = 5) -> list[str]:
    cons, vow = LETTERS[t]
    g = np.random.default_rng(t)
    out: list[str] = []
    while len(out) < n:
        w = ["".join(g.choice(list(cons)) + g.choice(list(vow)) for _ in range(k))
             for k in (2, 3)]
        name = " ".join(x.capitalize() for x in w)
        if name not in out:
            out.append(name)
    return out


class QA:
    def __init__(self, question, answer, person, attribute):
        self.question, self.answer = list(question), list(answer)
        self.person = np.asarray(person, np.int32)
        self.attribute = np.asarray(attribute, np.int16)
        self.attributes = ("city", "company")

    def __len__(self):
        return len(self.question)


def _experience(tok, t: int, names: list[str]):
    g = np.random.default_rng(100 + t)
    city = [CITIES[i] for i in g.integers(0, len(CITIES), len(names))]
    job = [JOBS[i] for i in g.integers(0, len(JOBS), len(names))]
    bios = [f"{n} lives in {c} and works at {j}." for n, c, j in zip(names, city, job)]
    pre = doc_prefix(tok)
    enc = [tok(pre + b, add_special_tokens=False)["input_ids"] for b in bios]
    docs = EncodedDocs(np.array([x for e in enc for x in e], np.int32),
                       np.concatenate([[0], np.cumsum([len(e) for e in enc])]).astype(np.int64),
                       np.full((len(enc), 0), -1, np.int32), np.arange(len(enc), dtype=np.int32))
    qa = QA([a.format(n) for n in names for a in ASK],
            [v for c, j in zip(city, job) for v in (c, j)],
            np.repeat(np.arange(len(names)), 2), np.tile([0, 1], len(names)))
    eq = encode_qa(tok, qa)
    data = ExperienceData(docs, eq, np.full(len(docs), t, np.int64), np.full(len(eq), t, np.int64))
    return {"data": data, "qa": qa, "bios": bios, "names": names}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread beats two that contend (5x on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    names = {t: _names(t) for t in LETTERS}
    texts = []
    for t, ns in names.items():
        for n in ns:
            texts += [f"{n} lives in {c} and works at {j}." for c, j in zip(CITIES, JOBS)]
            texts += [prompt(a.format(n)) + " " + c for a in ASK + [HELD_OUT] for c in CITIES]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<eos>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    # no token of one experience's names is in another's
    toks = {t: {x for n in ns for s in (n, " " + n)
                for x in tok(s, add_special_tokens=False)["input_ids"]}
            for t, ns in names.items()}
    assert not any(toks[a] & toks[b] for a, b in itertools.combinations(toks, 2))
    exps = {t: _experience(tok, t, ns) for t, ns in names.items()}
    base_dir = tmp_path_factory.mktemp("router") / "base"
    build_model("gpt2-rope", "tiny", len(tok), 64, bos_id=0, eos_id=0, pad_id=1,
                seed=0).save_pretrained(base_dir)
    all_names = [n for ns in names.values() for n in ns]
    return {"tok": tok, "exps": exps, "base_dir": base_dir, "names": all_names}


def backbone(w):
    return load_any(w["base_dir"])


def routed(w, *, keys="examples", routing="hard", random_b=False, T=2, **kw):
    """A routed model over a fresh backbone: T adapters, keys of experiences 0..T."""
    plugin = ExperienceAdapters(w["exps"][0]["data"], r=4, names=w["names"], keys=keys,
                                routing=routing, **kw)
    m = plugin.wrap(backbone(w), w["tok"])
    for t in range(1, T + 1):
        m.add_experience()
        if random_b:  # distinct, non-zero adapters (LoRA B starts at zero)
            g = torch.Generator().manual_seed(t)
            with torch.no_grad():
                for p in m.adapters[f"e{t}"].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for t in range(T + 1):
        m.add_keys(t, m.queries(_sequences(w["exps"][t]["data"])))
    return m.eval()


def _sequences(data):
    from factlab.continual.router import example_sequences

    return example_sequences(data)


def prompts_of(w, T=2, held_out=True):
    """Questions of every experience (trained ones and a held-out template) + truth."""
    ps, truth, answers = [], [], []
    for t in range(T + 1):
        e = w["exps"][t]
        qs = list(e["qa"].question) + ([HELD_OUT.format(n) for n in e["names"]]
                                       if held_out else [])
        ps += [prompt(q) for q in qs]
        answers += list(e["qa"].answer) + (["Paris"] * len(e["names"]) if held_out else [])
        truth += [t] * len(qs)
    return ps, truth, answers


def _right_padded(tok, texts):
    enc = tok(texts)["input_ids"]
    L = max(map(len, enc))
    ids = torch.full((len(enc), L), 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask


# ------------------------------------------------------------------------- tests
def test_before_training_the_routed_model_is_the_base_model(world):
    tok = world["tok"]
    ps, _, _ = prompts_of(world)
    ps = ps[::3]
    bb = backbone(world).eval()
    ids, mask = _right_padded(tok, ps)
    with torch.no_grad():
        want = bb(input_ids=ids, attention_mask=mask).logits
    gen = generate(bb, tok, ps, max_new_tokens=6)
    for routing in ("hard", "soft"):
        m = routed(world, routing=routing)
        assert m.n_experiences == 2 and len(set(route(m, tok, ps))) == 3  # all three used
        with torch.no_grad():
            got = m(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(got, want), routing
        assert generate(m, tok, ps, max_new_tokens=6) == gen, routing


def test_routing_is_exact_on_separable_experiences_and_oracle_equals_hard(world):
    tok = world["tok"]
    ps, truth, answers = prompts_of(world)
    # bios as the keys saw them (a document is encoded after doc_prefix)
    bios = [doc_prefix(tok) + b for t in range(3) for b in world["exps"][t]["bios"]]
    for keys in ("examples", "mean"):
        m = routed(world, keys=keys, random_b=True)
        got = route(m, tok, ps)
        assert route(m, tok, ps, batch_size=1) == got == route(m, tok, ps, batch_size=7)
        trained_qs = [i for i, p in enumerate(ps) if "home to" not in p]
        assert [got[i] for i in trained_qs] == [truth[i] for i in trained_qs], keys
        assert route(m, tok, bios) == [t for t in range(3) for _ in world["exps"][t]["bios"]]
        if keys == "examples":  # 100% routing accuracy, held-out questions included
            assert got == truth
        else:  # one mean key per experience: a held-out template may stray
            assert np.mean(np.array(got) == np.array(truth)) >= 0.95
    assert len(m.keys) == 3  # mean keys: one per experience
    m = routed(world, random_b=True)
    assert len(m.keys) == sum(len(world["exps"][t]["data"]) for t in range(3))
    hard_gen = generate(m, tok, ps, max_new_tokens=5)
    hard_sc = score_answers(m, tok, [p[:-len("\nAnswer:")] for p in ps], answers)
    m.set_oracle(tok(ps)["input_ids"], truth)
    m.routing = "oracle"
    assert route(m, tok, ps) == truth
    assert generate(m, tok, ps, max_new_tokens=5) == hard_gen
    # teacher-forced rows (prompt + answer) find their prompt as the longest prefix
    ora_sc = score_answers(m, tok, [p[:-len("\nAnswer:")] for p in ps], answers)
    np.testing.assert_array_equal(ora_sc.nll, hard_sc.nll)
    # the adapters matter: forcing the base model changes these predictions
    with m.forced(0):
        assert generate(m, tok, ps, max_new_tokens=5) != hard_gen


def test_an_update_routes_to_the_latest_experience_that_matches(world):
    """Experience 2 re-teaches experience 1's questions: equal cosine, the latest wins."""
    m = routed(world)
    tok = world["tok"]
    e1 = world["exps"][1]
    m.add_keys(2, torch.cat([m.queries(_sequences(world["exps"][2]["data"])),
                             m.queries([tok(prompt(q))["input_ids"] for q in e1["qa"].question])]))
    ps = [prompt(q) for q in e1["qa"].question]
    assert route(m, tok, ps) == [2] * len(ps)
    m.margin = 0.0  # exact ties still go to the latest
    assert route(m, tok, ps) == [2] * len(ps)


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_mixed_batches_equal_every_row_alone(world, routing):
    tok = world["tok"]
    ps, truth, answers = (x[::2] for x in prompts_of(world))  # every experience, mixed
    m = routed(world, routing=routing, random_b=True)
    g64 = generate(m, tok, ps, max_new_tokens=5, batch_size=64)
    assert generate(m, tok, ps, max_new_tokens=5, batch_size=1) == g64
    assert generate(m, tok, ps[::-1], max_new_tokens=5, batch_size=5) == g64[::-1]
    qs = [p[:-len("\nAnswer:")] for p in ps]
    s64 = score_answers(m, tok, qs, answers, batch_size=64)
    s1 = score_answers(m, tok, qs, answers, batch_size=1)
    np.testing.assert_allclose(s1.nll, s64.nll, rtol=1e-5, atol=1e-5)
    assert (s1.all_argmax == s64.all_argmax).all()
    # logits of a right-padded mixed batch == each row alone (hard: with its adapter set)
    ids, mask = _right_padded(tok, ps)
    with torch.no_grad():
        mixed = m(input_ids=ids, attention_mask=mask).logits
        for i in range(0, len(ps), 4):
            n = int(mask[i].sum())
            row = ids[i:i + 1, :n]
            alone = m(input_ids=row).logits
            torch.testing.assert_close(mixed[i, :n], alone[0], rtol=1e-5, atol=1e-5)
            if routing == "hard":
                with m.forced(truth[i]):
                    torch.testing.assert_close(m(input_ids=row).logits, alone,
                                               rtol=1e-6, atol=1e-6)


def test_expansion_adds_exactly_the_parameters_it_reports(world):
    from peft.tuners.lora import LoraLayer

    m = ExperienceAdapters(r=4, names=world["names"]).wrap(backbone(world), world["tok"])
    before = sum(p.numel() for p in m.parameters())
    assert before == 0  # the backbone is not the wrapper's
    for t in (1, 2, 3):
        n0 = sum(p.numel() for p in m.parameters())
        assert m.add_experience() == t
        added = sum(p.numel() for p in m.parameters()) - n0
        in_peft = sum(p.numel() for mod in m.backbone.modules() if isinstance(mod, LoraLayer)
                      for d in (mod.lora_A, mod.lora_B) for p in d[f"e{t}"].parameters())
        cfg = m.config  # rank 4 on the fused q/k/v matrix of every layer
        per_layer = 4 * cfg.hidden_size + 3 * cfg.hidden_size * 4
        assert added == m.parameter_count(t) == in_peft == cfg.num_hidden_layers * per_layer
    # with the MLP: + rank 4 on d -> 4d and 4d -> d of every layer
    mm = ExperienceAdapters(r=4, names=world["names"], modules="attention+mlp").wrap(
        backbone(world), world["tok"])
    mm.add_experience()
    d, f = cfg.hidden_size, cfg.intermediate_size
    mlp = 4 * (d + f) + 4 * (f + d)
    assert sum(p.numel() for p in mm.parameters()) == mm.parameter_count(1) == \
        cfg.num_hidden_layers * (per_layer + mlp)


class Snapshot(Plugin):
    name = "snapshot"

    def __init__(self):
        self.after = {}

    def after_experience(self, loop, t):
        self.after[t] = {k: v.clone() for k, v in loop.model.state_dict().items()}


class Killed(Exception):
    pass


class Kill(Plugin):
    name = "kill"

    def __init__(self, at=None):
        self.at, self.seen = at, []

    def before_experience(self, loop, t):
        self.seen.append(t)
        if t == self.at:
            raise Killed


def _driver(w, out, plugins, model=None):
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=2, precision="no",
                      ckpt_minutes=0)
    exps = [Experience(f"c{t}", FactStream(w["exps"][t]["data"], 64, w["tok"], qa_ratio=0.5,
                                           seed=t), cfg) for t in (1, 2)]
    qa = w["exps"][1]["qa"]
    small = QA(qa.question[:4], qa.answer[:4], qa.person[:4], qa.attribute[:4])
    return Driver(model or backbone(w), exps, {"c1": qa_evaluator(w["tok"], small)}, out,
                  plugins=plugins, tokenizer=w["tok"], progress=False)


def _adapters(w, **kw):
    return ExperienceAdapters(w["exps"][0]["data"], r=4, names=w["names"], **kw)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("drive")
    bb = backbone(world)
    base = {k: v.clone() for k, v in bb.state_dict().items()}
    plug, snap = _adapters(world), Snapshot()
    d = _driver(world, out, [plug, snap], model=bb)
    R = d.run()
    return {"driver": d, "R": R, "base": base, "plugin": plug, "snap": snap, "out": out}


def test_the_driver_trains_only_the_current_adapter(world, trained):
    d, snap, plug = trained["driver"], trained["snap"], trained["plugin"]
    m = d.model
    assert isinstance(m, RoutedAdapters) and m.n_experiences == 2
    s1, s2 = snap.after[1], snap.after[2]
    e1 = [k for k in s2 if k.startswith("adapters.e1.")]
    e2 = [k for k in s2 if k.startswith("adapters.e2.")]
    assert e1 and e2 and not any(k.startswith("adapters.e2.") for k in s1)
    assert all(torch.equal(s1[k], s2[k]) for k in e1)  # bit-identical after experience 2
    assert any(s1[k].abs().sum() > 0 for k in e1 if k.endswith("B.weight"))  # e1 trained
    assert any(s2[k].abs().sum() > 0 for k in e2 if k.endswith("B.weight"))  # e2 trained
    # the base weights never changed (peft's wrapped layers hold them as base_layer)
    now = {k.replace(".base_layer.", "."): v for k, v in m.backbone.get_base_model()
           .state_dict().items() if "lora_" not in k}
    assert now.keys() == trained["base"].keys()
    assert all(torch.equal(now[k], trained["base"][k]) for k in now)
    # expansion as reported, and keys of experiences 0, 1, 2
    assert {t: a["params"] for t, a in plug.added.items()} == \
        {0: 0, 1: m.parameter_count(1), 2: m.parameter_count(2)}
    assert m.keyed() == {0, 1, 2}
    assert [plug.added[t]["keys"] for t in (0, 1, 2)] == \
        [int((m.key_exp == t).sum()) for t in (0, 1, 2)]
    # training questions of experience 1 are routed to its adapter
    qs = [prompt(q) for q in world["exps"][1]["qa"].question]
    assert route(m, world["tok"], qs) == [1] * len(qs)
    assert len(trained["R"]["rows"]) == 3


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_save_and_load_any_reproduce_predictions(world, trained, tmp_path, routing):
    tok = world["tok"]
    ps, truth, answers = prompts_of(world)
    m = trained["driver"].model
    m.routing = routing
    m.set_oracle(tok(ps)["input_ids"], truth)
    try:
        m.save_pretrained(tmp_path / "m")
        got = load_any(tmp_path / "m")
        assert isinstance(got, RoutedAdapters) and got.routing == routing
        assert got.n_experiences == 2 and torch.equal(got.keys, m.keys)
        assert torch.equal(got.key_exp, m.key_exp)
        assert generate(got, tok, ps, max_new_tokens=5) == generate(m, tok, ps, max_new_tokens=5)
        ids, mask = _right_padded(tok, ps)
        with torch.no_grad():
            assert torch.equal(got(input_ids=ids, attention_mask=mask).logits,
                               m.eval()(input_ids=ids, attention_mask=mask).logits)
        got.routing = "oracle"
        assert route(got, tok, ps) == truth
    finally:
        m.routing = "hard"
    # the driver's export opens too, on the backbone named by the base fingerprint
    exported = load_any(trained["out"] / "model")
    assert exported.base_sha256 == m.base_sha256
    assert generate(exported, tok, ps, max_new_tokens=5) == generate(m, tok, ps, max_new_tokens=5)


def test_a_killed_run_resumes_to_the_uninterrupted_result(world, trained, tmp_path):
    with pytest.raises(Killed):
        _driver(world, tmp_path, [_adapters(world), Kill(at=2)]).run()
    assert (tmp_path / "state" / "driver.pt").is_file()
    rec = Kill()
    d = _driver(world, tmp_path, [_adapters(world), rec])
    R = d.run()
    assert rec.seen == [2]  # resumed after experience 1, not retrained from the start
    want = trained["driver"].model.state_dict()
    got = d.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert R["matrix"] == trained["R"]["matrix"]
    # a finished run restored: nothing trains, the same model
    rec = Kill()
    d2 = _driver(world, tmp_path, [_adapters(world), rec])
    d2.run()
    assert rec.seen == [] and d2.model.n_experiences == 2
    assert all(torch.equal(d2.model.state_dict()[k], want[k]) for k in want)


def test_bad_input_is_one_clear_error(world):
    tok = world["tok"]
    m = routed(world)
    with pytest.raises(FactlabError, match="experience 3 has no module"):
        with m.forced(3):
            pass
    with pytest.raises(FactlabError, match="oracle experience 5 has no module"):
        m.set_oracle([[5, 6, 7]], [5])
    with pytest.raises(FactlabError, match="experience 4 has no module"):
        m.add_keys(4, torch.zeros(2, m.keys.shape[1]))
    m.set_oracle(tok([prompt("Where does Bade Gaf live?")])["input_ids"], [1])
    m.routing = "oracle"
    with pytest.raises(FactlabError, match="not in the oracle table"):
        generate(m, tok, [prompt("Who is Kilo Mipo?")])
    with pytest.raises(FactlabError, match="not in the oracle table"):
        route(m, tok, [prompt("Who is Kilo Mipo?")])
    with pytest.raises(FactlabError, match="routing 'fuzzy'"):
        m.routing = "fuzzy"
    with pytest.raises(FactlabError, match="beyond the model's depth"):
        RoutedAdapters(backbone(world), layer=2)
    with pytest.raises(FactlabError, match="beyond the model's depth"):
        ExperienceAdapters(layer=7).wrap(backbone(world))
    with pytest.raises(FactlabError, match="routing 'fuzzy'"):
        RoutedAdapters(backbone(world), routing="fuzzy")
    with pytest.raises(FactlabError, match="routing 'oracle'"):
        ExperienceAdapters(routing="oracle")
    with pytest.raises(FactlabError, match="router keys 'nearest'"):
        RoutedAdapters(backbone(world), keys="nearest")
    with pytest.raises(FactlabError, match="router keys 'nearest'"):
        ExperienceAdapters(keys="nearest")
    empty = RoutedAdapters(backbone(world))
    empty.add_experience()
    with pytest.raises(FactlabError, match="no routing keys"):
        route(empty.eval(), tok, [prompt("Who?")])


def test_soft_routing_weighs_the_adapters_per_row(world):
    """Soft weights are a distribution over experiences 0..T; as the temperature goes to
    0 they become the hard choice, and so do the logits (the lora_B scaling is right)."""
    tok = world["tok"]
    ps, truth, _ = (x[::3] for x in prompts_of(world))
    ids, mask = _right_padded(tok, ps)
    hard = routed(world, random_b=True)
    soft = routed(world, routing="soft", random_b=True, temperature=1e-4)
    w = soft.soft_weights(soft.query(ids, mask))
    assert w.shape == (len(ps), 3)
    torch.testing.assert_close(w.sum(1), torch.ones(len(ps)))
    assert w.argmax(1).tolist() == truth == route(soft, tok, ps)
    with torch.no_grad():
        want = hard(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(soft(input_ids=ids, attention_mask=mask).logits, want,
                                   rtol=1e-5, atol=1e-5)
        soft.temperature = 0.5  # a real mixture: other adapters now contribute
        assert not torch.allclose(soft(input_ids=ids, attention_mask=mask).logits, want,
                                  atol=1e-3)
    assert soft.n_experiences == 2 and soft.current == 2  # left as it was
    assert [p.requires_grad for p in soft.adapter_parameters(1)] == [False, False] * 2


def test_olora_sums_every_adapter_and_pulls_the_new_one_orthogonal(world, tmp_path):
    """routing="sum" (O-LoRA): every row goes through every adapter (the sum of their
    updates: zeroing one adapter's B leaves exactly the other's model), no keys are
    stored; the orthogonality penalty is ‖A_1 A_2ᵀ‖² and training with it leaves the two
    adapters' down projections closer to orthogonal than training without it, with the
    first adapter untouched in experience 2."""
    tok = world["tok"]
    ps, _, _ = (x[::3] for x in prompts_of(world))
    ids, mask = _right_padded(tok, ps)
    m = routed(world, routing="sum", random_b=True)
    hard = routed(world, random_b=True)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    both = logits(m)
    for keep, drop in ((1, 2), (2, 1)):
        saved = [p.detach().clone() for p in m.adapters[f"e{drop}"].parameters()]
        with torch.no_grad():
            for name, p in m.adapters[f"e{drop}"].named_parameters():
                if name.endswith("B.weight"):
                    p.zero_()
        with hard.forced(keep):
            torch.testing.assert_close(logits(m), logits(hard), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p, s in zip(m.adapters[f"e{drop}"].parameters(), saved):
                p.copy_(s)
    with hard.forced(2):
        assert not torch.allclose(both, logits(hard), atol=1e-3)
    # the penalty, by hand
    want = sum((m.adapters["e1"][k]["A"].weight @ m.adapters["e2"][k]["A"].weight.t())
               .pow(2).sum() for k in m.adapters["e2"])
    torch.testing.assert_close(m.orthogonality(2), want)
    assert float(m.orthogonality(1)) == 0.0

    def overlap(ortho, out):
        plug = _adapters(world, routing="sum", ortho=ortho)
        snap = Snapshot()
        d = _driver(world, out, [plug, snap])
        d.run()
        mm = d.model
        assert mm.routing == "sum" and mm.keys.shape[0] == 0  # nothing to route
        assert plug.added[1]["params"] == plug.added[2]["params"] > 0
        e1 = {k: v for k, v in snap.after[1].items() if ".e1." in k or k.startswith("adapters.e1")}
        assert e1 and all(torch.equal(v, snap.after[2][k]) for k, v in e1.items())
        return float(mm.orthogonality(2).detach())

    assert overlap(50.0, tmp_path / "orth") < 0.5 * overlap(0.0, tmp_path / "plain")
