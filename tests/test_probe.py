"""P- and Q-probing: read positions sit on the token before each value (checked against the
renderer's character spans), folded task variants equal separate passes, the backbone is
bit-identical after probing and runs in train mode while the probe trains, a name-determined
attribute is read off with high accuracy while random labels stay at chance, the CLI's
errors, the recipe step and the report section."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factlab.errors import FactlabError
from factlab.model.build import build_model
from factlab.probe import (ProbeConfig, ProbeModel, p_probe_inputs, prepare, probe_tasks,
                           q_probe_inputs, run_probe)
from factlab.tokens import DocStream, encode_docs, world_tokenizer
from factlab.tokens.encode import doc_prefix
from factlab.train import Loop, TrainConfig
from factlab.corpus import CorpusConfig, make_corpus
from factlab.world.config import PoolSizes
from factlab.world.pools import MONTHS, load_pools

from conftest import cli, make

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def permuted():
    """Bios with the attributes in shuffled order, two entries per person."""
    w = make(people=30, augment="multi2+permute", seed=2)
    return w, world_tokenizer(w, 600)


@pytest.fixture(scope="module")
def determined(tmp_path_factory):
    """A world where the major is a function of the first name (4 first names, 4 majors)
    and a tiny model BIO-pretrained on it."""
    cfg = CorpusConfig(people=240, seed=0, unknown=4,
                       pools=PoolSizes(first=4, middle=20, last=20, majors=4))
    w = make_corpus(cfg)
    first = list(load_pools(cfg.pools).first)
    w.people.codes[:, w.attributes.index("major")] = [first.index(n.split()[0])
                                                      for n in w.people.names]
    tok = world_tokenizer(w, 1000)
    model = build_model("gpt2-rope", "tiny", len(tok), 64, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    stream = DocStream(encode_docs(tok, w.bios()), 64, tok.eos_token_id)
    # 600 steps: by then the model carries the first name to the first read position
    # (at 200 steps a P-probe reaches ~0.6 on held-out people while fitting the train people)
    cfg = TrainConfig(steps=600, batch_size=8, lr=3e-3, precision="no", log_every=300)
    Loop(model, stream, cfg, tmp_path_factory.mktemp("lm"), progress=False).run()
    return w, tok, model


# ------------------------------------------------------------------------ inputs, tasks

def test_positions_land_on_the_token_before_each_value(permuted):
    w, tok = permuted
    people = np.arange(len(w.people))
    ids, lens, pos, order = p_probe_inputs(w, tok, people, context=512, entry=1)
    bios = w.bios()
    assert (pos >= 0).all() and (np.diff(pos, axis=1) > 0).all()  # six, in order
    orders = set()
    for i, p in enumerate(people.tolist()):
        d = int(np.flatnonzero((bios.person == p) & (bios.entry == 1))[0])
        pre = doc_prefix(tok)  # documents are encoded after it (see encode_docs)
        text = pre + bios.text[d]
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids[i, 0] == tok.bos_token_id
        assert list(ids[i, 1:lens[i]]) == enc["input_ids"]
        starts = bios.spans[d, order[i], 0] + len(pre)
        assert (np.diff(starts) > 0).all()  # order of appearance
        orders.add(tuple(order[i]))
        for k in range(6):
            # input index pos+1 is doc token pos: the token holding the value's first char
            s, e = enc["offset_mapping"][pos[i, k]]
            assert s <= starts[k] < e, (text, k)
            # ... and the read position (doc token pos-1) ends before the value starts
            assert enc["offset_mapping"][pos[i, k] - 1][1] <= starts[k]
    assert len(orders) > 5  # permuted bios: the attribute at p_k varies
    # a short context cuts the later values off: their positions are absent
    _, lens, pos, order = p_probe_inputs(w, tok, people, context=24)
    assert (lens <= 24).all() and ((pos == -1) | (pos + 1 < lens[:, None])).all()
    assert (pos == -1).any() and ((pos == -1) == (order == -1)).all()


def test_q_inputs_are_start_name_end(permuted):
    w, tok = permuted
    ids, lens, pos = q_probe_inputs(w, tok, [3, 7])
    enc = encode_docs(tok, w.bios())
    for row, p in enumerate([3, 7]):
        assert ids[row, 0] == tok.bos_token_id and ids[row, lens[row] - 1] == tok.eos_token_id
        name = ids[row, 1:lens[row] - 1]
        assert tok.decode(name).strip() == w.people.names[p]
        # the name is the very tokens that open the person's bios (and sit in questions)
        d = int(np.flatnonzero(np.asarray(w.bios().person) == p)[0])
        assert w.bios().text[d].startswith(w.people.names[p])
        assert np.array_equal(enc.doc(d)[:len(name)], name)
        assert pos[row, 0] == lens[row] - 1
    # read at the name's last token instead: the same rows without the <eos>
    ids2, lens2, pos2 = q_probe_inputs(w, tok, [3, 7], read="name")
    assert np.array_equal(lens2, lens - 1) and np.array_equal(pos2[:, 0], lens - 2)
    for row in range(2):
        assert np.array_equal(ids2[row, :lens2[row]], ids[row, :lens[row] - 1])


def test_tasks_and_labels(permuted):
    w, tok = permuted
    people = np.arange(len(w.people))
    tasks, y = probe_tasks(w, tok, people)
    names = [t.name for t in tasks]
    assert len(tasks) == 11 and names[0] == "birth_date/month"
    assert names[1:3] == ["birth_city/first_token", "birth_city/value"]
    dates = w.people.column("birth_date")
    assert [tasks[0].classes[c] for c in y[:, 0]] == [d.split()[0] for d in dates]
    assert tasks[0].classes == list(MONTHS)
    written = lambda v: tok(" " + v, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tasks[0].class_tokens == [written(m) for m in MONTHS]
    for t, task in enumerate(tasks[1:], 1):
        vals = w.people.column(task.attribute)
        assert len(task.class_tokens) == task.n_classes
        if task.target == "value":
            assert [task.classes[c] for c in y[:, t]] == vals
            # the tied head's class tokens: the person's own value as bios write it
            assert [task.class_tokens[c] for c in y[:, t]] == [written(v) for v in vals]
        else:
            first = [written(v)[0] for v in vals]
            assert [task.classes[c] for c in y[:, t]] == [tok.decode([f]) for f in first]
            assert [task.class_tokens[c] for c in y[:, t]] == [[f] for f in first]
    with pytest.raises(FactlabError, match="no probe task 'major/nope'"):
        probe_tasks(w, tok, people, ["major/nope"])


# ------------------------------------------------------------------------ the module

def _reference(model, probe, ids, pos, variant_of):
    """Logits computed the slow way: one backbone pass per (task, position) variant."""
    E = model.get_input_embeddings().weight
    out = []
    for t in range(probe.n_tasks):
        cols = []
        for p in range(pos.shape[1]):
            g = variant_of(t, p)
            x = E[ids] + (probe.emb_u[g][ids] @ probe.emb_v[g])
            h = model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
            f = h[torch.arange(len(ids)), pos[:, p]][:, None]  # (B, 1, d)
            cols.append(probe.head(t, f.expand(-1, pos.shape[1], -1))[:, p])
        out.append(torch.stack(cols, 1))
    return out


@pytest.mark.parametrize("mode", ["per_task", "per_probe", "shared"])
def test_folded_variants_equal_separate_passes(mode):
    model = build_model("gpt2-rope", "tiny", 50, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    probe = ProbeModel(model, [3, 5, 2], 2, rank=2, embedding=mode, seed=1).eval()
    with torch.no_grad():
        probe.emb_u.normal_(0, 0.5)  # zero at init; make every variant differ
    ids = torch.randint(2, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[2, 7], [3, 9], [1, 11], [5, 6]])
    T, P = 3, 2
    variant_of = {"per_task": lambda t, p: t, "per_probe": lambda t, p: t * P + p,
                  "shared": lambda t, p: 0}[mode]
    assert probe.n_variants == {"per_task": T, "per_probe": T * P, "shared": 1}[mode]
    with torch.no_grad():
        got = probe(ids, pos)
        want = _reference(model, probe, ids, pos, variant_of)
    for g, w_ in zip(got, want):
        assert torch.allclose(g, w_, atol=1e-5)
    with torch.no_grad():  # padding after the last read position changes nothing
        longer = torch.cat([ids, torch.randint(2, 50, (4, 5))], 1)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(probe(longer, pos), got))


def test_batchnorm_learns_running_statistics():
    model = build_model("gpt2-rope", "tiny", 50, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    probe = ProbeModel(model, [3, 4], 1, rank=0, norm="batch")
    ids = torch.randint(2, 50, (8, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.full((8, 1), 5)
    before = probe.running_mean.clone()
    probe.train()(ids, pos)
    assert not torch.equal(before, probe.running_mean)  # per-task rows updated in place
    a = probe.eval()(ids[:1], pos[:1])[0]  # eval: one example works, stats are frozen
    assert torch.allclose(a, probe(ids, pos)[0][:1], atol=1e-5)


def test_tied_head_starts_as_the_models_own_readout_and_round_trips(tmp_path):
    model = build_model("gpt2-rope", "tiny", 50, 32, bos_id=0, eos_id=0, pad_id=1, seed=0)
    toks = [[[3], [7, 9], [11]], [[4, 5, 6], [20]]]
    probe = ProbeModel(model, [3, 2], 2, rank=0, head="tied", class_tokens=toks).eval()
    ids = torch.randint(2, 50, (4, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[2, 7], [3, 9], [1, 8], [5, 6]])
    with torch.no_grad():
        got = probe(ids, pos)
        h = model.base_model(input_ids=ids).last_hidden_state
        f = F.layer_norm(h[torch.arange(4)[:, None], pos], (h.shape[-1],))
        U = model.get_output_embeddings().weight
        for t, classes in enumerate(toks):  # by hand: LN(h) . mean of the class's rows
            C = torch.stack([U[c].mean(0) for c in classes])
            assert torch.allclose(got[t], f @ C.T, atol=1e-5)
    # nothing per class but a bias: 50 classes cost 47 biases a position more than 3
    wide = ProbeModel(model, [50, 2], 2, rank=0, head="tied",
                      class_tokens=[[[i] for i in range(50)], toks[1]])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(wide) - n(probe) == 2 * (50 - 3)
    with torch.no_grad():
        probe.tied_map.normal_(0, 0.1)
        probe.head_bias[1].normal_()
        want = probe(ids, pos)
    probe.save_pretrained(tmp_path / "p")
    back = ProbeModel.from_pretrained(tmp_path / "p", model).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(back(ids, pos), want))
    with pytest.raises(FactlabError, match="class tokens"):
        ProbeModel(model, [3, 2], 2, rank=0, head="tied")
    with pytest.raises(FactlabError, match="task 1 needs 2 classes"):
        ProbeModel(model, [3, 2], 2, rank=0, head="tied", class_tokens=[toks[0], [[4]]])
    with pytest.raises(FactlabError, match="head='mlp'"):
        ProbeModel(model, [3], 1, head="mlp")


# ------------------------------------------------------------------------ training

def test_backbone_is_frozen_bit_identical_and_in_train_mode(determined, tmp_path):
    w, tok, model = determined
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    hook = model.base_model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    try:
        cfg = ProbeConfig(kind="p", steps=3, batch_size=8, lr=1e-2, precision="no",
                          tasks=["major/value", "employer/value"], people=40)
        res = run_probe(model, tok, w, cfg, tmp_path, progress=False)
    finally:
        hook.remove()
    assert modes[:3] == [True, True, True]  # the loop's steps: dropout on
    assert modes[3:] and not any(modes[3:])  # scoring: eval mode
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"backbone weight {k} changed"
    assert not any(p.requires_grad for p in model.parameters())
    assert res["probe"]["backbone_frozen"] and res["probe"]["variants"] == 2
    # the probe did train, and its files hold the probe only, never the backbone
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "probe_p/model/probe.safetensors"))
    assert saved["emb_u"].abs().sum() > 0 and saved["emb_u"].shape[0] == 2
    assert not any(k.startswith(("gpt_neox", "embed_out")) for k in saved)
    ckpt = load_file(str(tmp_path / "probe_p/checkpoint/model.safetensors"))
    assert ckpt.keys() == saved.keys()
    assert json.loads((tmp_path / "probe_p.json").read_text())["split"]["test"] == 20
    # a probe finished before `head` existed is the linear probe it was: returned, not
    # refused as "other settings"; asking for the tied head is refused
    for f in (tmp_path / "probe_p/settings.json", tmp_path / "probe_p.json"):
        rec = json.loads(f.read_text())
        (rec.get("config", rec)).pop("head")
        f.write_text(json.dumps(rec))
    assert run_probe(model, tok, w, cfg, tmp_path, progress=False)["tasks"] == res["tasks"]
    with pytest.raises(FactlabError, match="other settings"):
        run_probe(model, tok, w, cfg.model_copy(update={"head": "tied"}), tmp_path,
                  progress=False)


@pytest.mark.parametrize("kind,steps,head", [("p", 50, "linear"), ("q", 40, "linear"),
                                             ("p", 50, "tied"), ("q", 40, "tied")])
def test_name_determined_attribute_is_read_off_and_random_labels_are_not(
        determined, tmp_path, kind, steps, head):
    w, tok, model = determined
    cfg = ProbeConfig(kind=kind, steps=steps, batch_size=32, lr=1e-2, precision="no",
                      tasks=["birth_city/value", "major/value"], head=head)
    data = prepare(w, tok, cfg, 64)
    assert len(data.train) == len(data.test) == 120
    # control: labels drawn at random for every person, unknowable from any input (for
    # the tied head, dealt out as four of the real majors' tokens)
    majors = data.tasks[data.task_index("major/value")].class_tokens
    data.relabel("birth_city/value", np.random.default_rng(5).integers(0, 4, len(data)),
                 majors if head == "tied" else None)
    res = run_probe(model, tok, w, cfg, tmp_path, data=data, progress=False)
    by = {t["name"]: t for t in res["tasks"]}
    assert res["probe"]["head"] == head
    major, rand = by["major/value"], by["birth_city/value"]
    assert major["classes"] == rand["classes"] == 4
    test_m = [a for a in major["test"] if a is not None]
    # the first name is in every P-probe prefix. 0.74 on this tiny model since bios are
    # encoded after a space (0.9+ before); chance 0.25, the random control stays <= 0.4
    # the tied head reads what the model itself writes: this model writes the major 44% of
    # the time at its own position (chance 25%); its P-probe reads 0.57, its Q-probe 0.9+
    assert max(test_m) >= (0.5 if head == "tied" and kind == "p" else 0.7), major
    ceiling = max(rand["chance"], rand["uniform"]) + 0.15
    assert all(a <= ceiling for a in rand["test"] if a is not None), rand
    if kind == "q":
        assert test_m[0] >= 0.9


# ------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def cell(tmp_path_factory, determined):
    """A recipe run cell on disk: world, tokenizer, pretrain/model."""
    from factlab.corpus.store import save_world

    w, tok, model = determined
    d = tmp_path_factory.mktemp("run") / "cell"
    save_world(w, d / "world")
    tok.save_pretrained(d / "tokenizer")
    model.save_pretrained(d / "pretrain" / "model")
    return d


def test_cli_probes_a_run_cell(cell, capsys):
    args = ["probe", cell, "--kind", "q", "--steps", "3", "--people", "40",
            "--tasks", "major/value,university/value"]
    assert cli(*args) == 0
    res = json.loads((cell / "probe_q.json").read_text())
    assert res["split"]["train"] == res["split"]["test"] == 20
    assert [t["name"] for t in res["tasks"]] == ["university/value", "major/value"]
    assert "major/value" in capsys.readouterr().out
    assert cli(*args) == 0  # finished: returned as it is
    assert cli(*args[:4], "--steps", "4", "--people", "40") == 2
    assert "other settings" in capsys.readouterr().err


def test_cli_bad_input_is_one_clear_error(cell, tmp_path, capsys):
    def err(*args):
        assert cli("probe", *args) == 2
        return capsys.readouterr().err

    assert "no such run cell or model directory" in err(tmp_path / "nope", "--kind", "p")
    e = err(cell, "--kind", "z")
    assert "kind" in e and "'p' or 'q'" in e
    assert "--world" in err(cell / "pretrain" / "model", "--kind", "q")
    assert "embedding" in err(cell, "--embedding", "sometimes")
    assert "neither a run cell" in err(tmp_path, "--kind", "q")
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    assert "is a recipe run" in err(tmp_path, "--kind", "q")
    assert "no such world directory" in err(cell / "pretrain" / "model", "--world",
                                            tmp_path / "w")


# ------------------------------------------------------------------------ recipe, report

def test_recipe_probe_step_config():
    from factlab.experiments.recipe import load_recipe

    r = load_recipe("quickstart")
    assert all(c.probe is None for c in r.cells)  # off unless asked for
    r = load_recipe("quickstart", ["probe.kinds=[q]", "probe.steps=7"])
    assert r.cells[0].probe.kinds == ["q"] and r.cells[0].probe.config("q").steps == 7
    assert r.cells[0].probe.config("q").resolved().rank == 16
    with pytest.raises(FactlabError, match="probe.kinds"):
        load_recipe("quickstart", ["probe.kinds=[x]"])


def _fake(cell, q_acc, qa, p_acc):
    attrs = ["birth_date", "birth_city", "university", "major", "employer", "company_city"]
    tasks_q = [{"name": "birth_date/month", "attribute": "birth_date", "target": "month",
                "classes": 12, "chance": 0.1, "uniform": 1 / 12, "test": [0.1]}]
    tasks_q += [{"name": f"{a}/value", "attribute": a, "target": "value", "classes": 9,
                 "chance": 0.05, "uniform": 0.1, "test": [q_acc[i]]}
                for i, a in enumerate(attrs[1:])]
    tasks_p = [{"name": f"{a}/value", "attribute": a, "target": "value", "classes": 9,
                "chance": 0.05, "uniform": 0.1, "test": [p_acc] * 6, "own": p_acc}
               for a in attrs[1:]]
    split = {"train": 50, "test": 50, "seed": 0, "rule": "r"}
    return {"cell": cell, "regime": "pretrain+finetune", "augment": cell, "people": 100,
            "params": 1, "seconds": 1.0, "curves": {}, "loss": {"pretrain": [[10, 1.0]]},
            "tokens_per_s": {"pretrain": 1.0},
            "ood": {"exact_match": float(np.mean(qa)), "per_attribute": dict(zip(attrs, qa))},
            "id": {"exact_match": 0.5}, "id_paraphrase": {"exact_match": 0.5},
            "probe": {"p": {"positions": [f"p{k}" for k in range(1, 7)], "tasks": tasks_p,
                            "split": split, "train": {"steps": 5},
                            "probe": {"embedding": "per_task", "rank": 2}},
                      "q": {"positions": ["end"], "tasks": tasks_q, "split": split}}}


def test_report_probe_section(tmp_path):
    from factlab.experiments.probe_report import pearson
    from factlab.experiments.recipe import load_recipe
    from factlab.experiments.report import write_report

    recipe = load_recipe("fig3", ["only=single,multi5,multi5+permute"])
    results = [_fake("single", [0.1, 0.1, 0.2, 0.1, 0.1], [0.3, 0.1, 0.1, 0.1, 0.1, 0.1], 0.1),
               _fake("multi5", [0.5, 0.4, 0.6, 0.5, 0.5], [0.4, 0.4, 0.3, 0.5, 0.4, 0.4], 0.5),
               _fake("multi5+permute", [0.9, 0.8, 0.9, 0.95, 0.9],
                     [0.9, 0.9, 0.7, 0.9, 0.95, 0.9], 0.9)]
    text = write_report(tmp_path, recipe, results).read_text()
    assert "### P-probe: single" in text and "### Q-probe" in text
    for cell in ("single", "multi5", "multi5_permute"):
        assert (tmp_path / f"probe_p_{cell}.png").stat().st_size > 1000
    assert "| *paper: multi5+permute* |" in text and "96.1" in text and "72.6" in text
    xs = [a for r in results for a in r["probe"]["q"]["tasks"][1:] for a in a["test"]]
    ys = [v for r in results for k, v in r["ood"]["per_attribute"].items() if k != "birth_date"]
    assert f"**{pearson(xs, ys):.2f}**" in text and pearson(xs, ys) > 0.9
    assert (tmp_path / "probe_q_vs_qa.png").is_file()
    assert pearson([1, 2], [3, 4]) is None and pearson([1, 1, 1], [1, 2, 3]) is None
