"""``factlab memory tune``: store facts in a memory bank on a frozen model, and measure it.

One run: facts (a user's fact file, or generated random ones) -> a ``MemoryModel`` on the
backbone -> ``MemoryTuning`` on the one loop until every fact is done (or the budget ends)
-> the editing metrics, generation-based, with teacher-forced numbers beside:

- **reliability**: greedy exact match on the stored questions, after all writes;
- **locality**: answers recorded from the backbone **before** the write, compared after, on
  (a) the world's own questions (its held-out people's among them: the backbone's OOD
  accuracy before / after), (b) the stored relations asked about names never stored,
  (c) the world's attributes asked about the stored entities;
- **unknown-entity hallucination** on (b): how often the model answers, and how often with
  another entity's stored value;
- **abstention**: the key gate's nearest-stored-key cosine as a confidence; AUROC stored vs
  never stored;
- the bank holds the facts: recall with the bank's values zeroed;
- exposures per fact, slot sharing, bank bytes, tuning and evaluation times (separate).

Each locality set is split in two by position (even: validation, odd: test). The key
gate's radius is chosen on the validation halves (``pick_radius``) and every locality
number reported is on the test halves: settings are never chosen on what is reported.
Without a world (a pretrained model and a user's facts) the locality sets are (d) the shipped
general-knowledge questions (``factlab.evaluate.general``; answered in sentences, so scored
by containment and by whether the whole answer is unchanged) and (b).
``prompt_format=chat`` asks and stores every question through the tokenizer's chat
template (an instruct model such as SmolLM2).

Sequential writes (``writes=T``, lifelong editing): the facts in T parts, one experience
each through the experience driver (``OUT/writes``: its ``R.json`` holds the curve). Each
write stores its keys, then tunes only its own facts (``replay=true``: earlier writes'
facts are revisited too). The queries' whitening is fixed before the first write by the
never-stored validation questions, and the radius is chosen again after every write on
the validation halves against the keys stored so far. Reliability, generalization and
locality are measured after the last write, with the facts written so far, the first
write's facts and every locality test half scored at ``eval_points`` points along the
stream; the baselines write the same parts one experience each, with the memory's
exposures per write as their steps. ``routing=key`` gives every stored question its own
value rows (no sharing): measured, the product-key bank without replay forgets earlier
writes (``docs/memory.md``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from factlab.config import Strict
from factlab.errors import FactlabError
from factlab.io import atomic_write_text


class MemorySettings(Strict):
    # the bank (defaults measured on the quickstart backbone: docs/memory.md)
    n_keys: int = Field(256, ge=2, description="sub-keys per half: n_keys^2 slots")
    heads: int = Field(4, ge=1)
    topk: int = Field(8, ge=1)
    key_dim: int = Field(64, ge=2)
    layers: list[int | str] | None = None  # None: the head's input (key gate), see model
    # key: each stored question its own value rows (one per answer position), read by the
    # key gate's nearest key: no sharing (needs gate=keys; an option, not the product-key
    # headline)
    routing: Literal["learned", "pinned", "hash", "key"] = "pinned"
    # what a selected slot adds: its value (product-key memory), or a PEER singleton
    # expert's gelu(u . x) * value (memory/bank.py)
    experts: Literal["values", "peer"] = "values"
    span: int | None = Field(None, ge=1, description="key routing: rows per stored question "
                             "(None: the longest answer + 4)")
    pin_steps: int | None = Field(None, ge=0, description="router steps before pinning "
                                  "(None: 200, or 0 with sequential writes)")
    # keys: open on a stored question as stored (a codebook of question states); entity:
    # open where a stored entity is named and a stored relation asked, however phrased
    # (memory/entity.py; needs routing=key)
    gate: Literal["keys", "entity", "learned", "none"] = "keys"
    entity_layer: int | None = Field(None, ge=0, description="gate=entity: the layer whose "
                                     "state at the name keys the entity (None: 0.3 of depth)")
    relation_layer: int | None = Field(None, ge=0, description="gate=entity: the relation "
                                       "test's layer (None: the deepest)")
    entity_margin: float = Field(0.0, ge=0, le=1, description="gate=entity: the radius this "
                                 "far from the best validation negative towards 1")
    relation_margin: float = Field(0.0, ge=0, le=1, description="gate=entity: each relation "
                                   "threshold this far from its highest negative towards "
                                   "its lowest positive")
    entity_quantile: float = Field(1.0, gt=0, le=1, description="gate=entity: the radius "
                                   "above this quantile of the validation negatives' entity "
                                   "scores (1: above all of them)")
    relation_names: int = Field(100, ge=0, description="gate=entity: other names asked the "
                                "stored and other relations to fit the relation test on")
    radius: float | None = None  # None: chosen on the validation prompts (else 0.98)
    radius_margin: float = Field(0.5, gt=0, le=1)
    # the key gate's nearest-key search: exact (every key), or FAISS (faiss-cpu, optional
    # extra): faiss-flat (exhaustive, equal to exact), faiss-hnsw (approximate, sub-linear)
    key_index: Literal["exact", "faiss-flat", "faiss-hnsw"] = "exact"
    # tuning
    value_lr: float | None = Field(None, gt=0, description="None: 0.5, or 2.0 with key "
                                   "routing (one row per position learns in fewer steps)")
    router_lr: float = Field(3e-4, gt=0)
    expert_lr: float = Field(0.01, gt=0, description="experts=peer: the down vectors' lr")
    sparse_optimizer: Literal["sparse_adam", "row_adagrad", "sgd"] = "sparse_adam"
    tau: float = Field(0.05, gt=0)
    tau_margin: float = Field(1.0, gt=0, le=1, description="facts are trained to a max-token "
                              "NLL under tau * tau_margin; the run stops when all are under tau")
    revisit: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    minutes: float = Field(10.0, gt=0, description="wall-time budget of the tuning")
    max_exposures: int = Field(300, ge=1, description="step budget: exposures per fact")
    seed: int = 0
    eval_batch_size: int = Field(128, ge=1)
    # baselines on the same facts, same exposure budget as the memory used (not tuned to
    # their own best): LoRA with the paper's recipe (r 32, Adafactor, lr 2e-4), full
    # finetuning (AdamW)
    baselines: list[Literal["lora", "full"]] = []
    # each baseline also at its own best: this many epochs over the facts, recall
    # (greedy) measured ``baseline_evals`` times along, best point and final reported
    baseline_epochs: int | None = Field(None, ge=1)
    baseline_evals: int = Field(10, ge=1)
    # own best also over these learning rates (the one with the best recall is reported;
    # [] = lora_lr / full_lr alone)
    lora_lrs: list[float] = []
    full_lrs: list[float] = []
    lora_lr: float = Field(2e-4, gt=0)
    full_lr: float = Field(3e-4, gt=0)
    locality_per_set: int = Field(600, ge=2, description="prompts per locality set (cap)")
    # how questions and answers become text: the world's plain "Q\nAnswer: A" (factlab's
    # own models) or the tokenizer's chat template (a pretrained instruct model)
    prompt_format: Literal["plain", "chat"] = "plain"
    # sequential writes (lifelong editing): the facts in ``writes`` batches, one after
    # another through the experience driver; 1 = all at once
    writes: int = Field(1, ge=1)
    replay: bool = False  # with writes > 1: revisit (and retrain) earlier writes' facts
    eval_points: int = Field(10, ge=1, description="evaluated points along the writes")


def _available_bytes() -> int | None:
    """Free memory where the bank will live: host RAM, and the GPU's when there is one
    (the bank is built in host memory, then moved with the model)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = None
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.mem_get_info()[0]
        free = gpu if free is None else min(free, gpu)
    return free


def check_bank_fits(cfg: MemorySettings, width: int, n_banks: int) -> dict:
    """Bytes the banks and their optimizer state need; a clear error if this machine's
    free memory cannot hold them."""
    from factlab.memory.bank import bank_bytes

    q_in = 2 * width if cfg.gate == "keys" else width
    one = bank_bytes(cfg.n_keys ** 2, width, heads=cfg.heads, key_dim=cfg.key_dim, d_in=q_in,
                     n_keys=cfg.n_keys, optimizer=cfg.sparse_optimizer,
                     peer=cfg.experts == "peer")
    need = {k: v * n_banks for k, v in one.items()}
    free = _available_bytes()
    if free is not None and need["total"] > 0.8 * free:
        raise FactlabError(
            f"memory bank: {n_banks} bank(s) of {cfg.n_keys ** 2:,} slots x {width} need "
            f"{need['total'] / 2**30:.2f} GiB with their {cfg.sparse_optimizer} state; this "
            f"machine has {free / 2**30:.2f} GiB free (lower n_keys, or use row_adagrad)")
    return need


def _half(qa, parity: int):
    """Every other question of ``qa`` (even: validation, odd: test)."""
    return _take(qa, np.arange(parity, len(qa), 2))


def _take(qa, idx):
    """The questions ``idx`` of ``qa``."""
    from factlab.text.qa import QA

    idx = np.asarray(idx, dtype=np.int64)
    return QA(person=np.asarray(qa.person)[idx], attribute=np.asarray(qa.attribute)[idx],
              template=np.asarray(qa.template)[idx], question=[qa.question[i] for i in idx],
              answer=[qa.answer[i] for i in idx], attributes=qa.attributes,
              heldout=qa.heldout)


def _never_stored(world, facts, names: list[str], seed: int, cap: int):
    """The stored questions asked about names never stored (drawn from the world's name
    pools, or from every shipped name without a world)."""
    from factlab.memory.facts import fresh_names
    from factlab.text.qa import QA

    others = fresh_names(world, min(cap, 4 * len(names) + 8), seed + 1, exclude=names)
    nq = min(cap, len(others))
    return QA(person=np.arange(nq, dtype=np.int32), attribute=np.zeros(nq, np.int16),
              template=np.zeros(nq, np.int16),
              question=[facts.question[i % len(facts)].replace(
                  names[int(facts.person[i % len(facts)])], others[i]) for i in range(nq)],
              answer=["-"] * nq, attributes=("stored relation",), heldout=False)


def general_locality_sets(facts, names: list[str], seed: int, cap: int) -> dict:
    """A model without a world: the shipped general-knowledge questions
    (``factlab.evaluate.general``: what a pretrained model knew before the write) and the
    stored questions asked about never-stored names."""
    from factlab.evaluate.general import general_knowledge

    return {"general": general_knowledge(cap),
            "never_stored": _never_stored(None, facts, names, seed, cap),
            **({"stored_entities": o} if len(o := _other_attributes(facts, names, cap)) else {})}


def _canonical_questions(corpus) -> dict[str, str]:
    """{attribute: its canonical question with ``{name}``}: the world's own, or without a
    world the shipped bioS ones."""
    if corpus is None:
        from factlab.text.templates import bios_templates

        return {a.replace("_", " "): q for a, q in bios_templates().question.items()}
    qa, people, out = corpus.qa(), corpus.people.names, {}
    for i in range(len(qa)):
        a = qa.attributes[int(qa.attribute[i])].replace("_", " ")
        src = people[int(qa.person[i])]
        if a not in out and src in qa.question[i]:
            out[a] = qa.question[i].replace(src, "{name}")
    return out


def _other_attributes(facts, names: list[str], cap: int, corpus=None):
    """Without a world: the shipped canonical questions of attributes other than the
    stored ones, asked about the stored entities (they must keep the backbone's answers)."""
    from factlab.text.qa import QA

    stored = {a.replace("_", " ") for a in facts.attributes}
    others = [q for a, q in _canonical_questions(corpus).items() if a not in stored]
    subjects = sorted({int(p) for p in facts.person})
    n = min(cap, len(others) * len(subjects))
    q = [others[(i + i // len(subjects)) % len(others)].replace(
        "{name}", names[subjects[i % len(subjects)]]) for i in range(n)]
    return QA(person=np.arange(n, dtype=np.int32), attribute=np.zeros(n, np.int16),
              template=np.zeros(n, np.int16), question=q, answer=["-"] * n,
              attributes=("other attribute",), heldout=False)


def entity_fit_sets(corpus, facts, names: list[str], halves: dict, cfg) -> dict:
    """What the entity gate is fitted and thresholded on (``memory.entity.write_entity_gate``),
    never a locality test half: ``relation_names`` fresh names (none stored, none in the
    never-stored set) asked the stored relations (positive) and the other canonical
    relations (negative), the general and stored-entity validation halves (negative); the
    entity radius from the never-stored, general and own validation halves."""
    from factlab.memory.facts import fresh_names
    from factlab.text.qa import QA

    world = corpus.world if corpus is not None else None
    cap = cfg.locality_per_set
    never = fresh_names(world, min(cap, 4 * len(names) + 8), cfg.seed + 1, exclude=names)
    t = fresh_names(world, cfg.relation_names, cfg.seed + 2, exclude=list(names) + never) \
        if cfg.relation_names else []
    templates: dict[int, str] = {}
    for i in range(len(facts)):
        a, nm = int(facts.attribute[i]), names[int(facts.person[i])]
        if a not in templates and nm in facts.question[i]:
            templates[a] = facts.question[i].replace(nm, "{name}")
    pos = [(tm.replace("{name}", nm), a) for nm in t for a, tm in templates.items()]
    stored = {facts.attributes[a].replace("_", " ") for a in templates} | set(templates.values())
    others = [q for a, q in _canonical_questions(corpus).items()
              if a not in stored and q not in stored]
    neg_q = [q.replace("{name}", nm) for nm in t for q in others]

    def qa(qs, attr=None):
        n = len(qs)
        return QA(person=np.arange(n, dtype=np.int32),
                  attribute=np.asarray(attr if attr is not None else np.zeros(n), np.int16),
                  template=np.zeros(n, np.int16), question=list(qs), answer=["-"] * n,
                  attributes=facts.attributes, heldout=False)

    fit_negative = [qa(neg_q)] if neg_q else []
    fit_negative += [halves[k][0] for k in ("general", "stored_entities") if k in halves]
    return {"fit_positive": qa(*zip(*pos)) if pos else None, "fit_negative": fit_negative,
            "entity_negative": [halves[k][0] for k in ("never_stored", "general", "own")
                                if k in halves]}


def locality_sets(corpus, facts, names: list[str], seed: int, cap: int) -> dict:
    """The three locality sets of a world (see the module doc), before splitting."""
    from factlab.text.qa import QA

    own = corpus.qa()
    g = np.random.default_rng([seed, 35])
    order = g.permutation(len(own))[:cap]
    own = QA(person=np.asarray(own.person)[order], attribute=np.asarray(own.attribute)[order],
             template=np.asarray(own.template)[order],
             question=[own.question[i] for i in order], answer=[own.answer[i] for i in order],
             attributes=own.attributes, heldout=False)
    never = _never_stored(corpus.world, facts, names, seed, cap)
    # the world's questions about its people, asked about the stored entities instead
    people = corpus.people.names
    q = []
    for i in range(min(cap, len(own))):
        src = people[int(own.person[i])]
        q.append(own.question[i].replace(src, names[i % len(names)]))
    about = QA(person=np.arange(len(q), dtype=np.int32), attribute=own.attribute[:len(q)],
               template=np.zeros(len(q), np.int16), question=q, answer=["-"] * len(q),
               attributes=own.attributes, heldout=False)
    stored = set(facts.question)  # a stored question is not a locality prompt
    keep = [i for i, x in enumerate(about.question) if x not in stored]
    about = QA(person=about.person[keep], attribute=np.asarray(about.attribute)[keep],
               template=about.template[keep], question=[about.question[i] for i in keep],
               answer=[about.answer[i] for i in keep], attributes=about.attributes,
               heldout=False)
    return {"own": own, "never_stored": never, "stored_entities": about}


def shipped_paraphrases(attribute: str) -> list[str]:
    """Held-out phrasings of the question about ``attribute`` outside any world: the bioS
    paraphrases for its six attributes (``birth city``: "Where was {name} born?", ...), the
    generic ones for any other name ("Which access code does {name} have?", ...)."""
    from factlab.text.templates import ATTRIBUTES, bios_templates, generic_entry

    key = attribute.strip().replace(" ", "_")
    if key in ATTRIBUTES:
        return list(bios_templates().paraphrases[key])
    return list(generic_entry(attribute)["paraphrases"])


def paraphrases(corpus, facts, names: list[str]):
    """A held-out paraphrase of each stored fact: for an attribute the world has (``birth
    city`` = ``birth_city``), the world's paraphrased question of that attribute about one of
    its people with the stored entity's name put in; for any other attribute, or without a
    world (``corpus`` None), one of :func:`shipped_paraphrases` in turn. A paraphrase is
    never the stored question itself (the next phrasing is taken). None if no fact has one."""
    from factlab.text.qa import QA

    by_attr: dict[int, list[int]] = {}
    wattr: dict[str, int] = {}
    if corpus is not None:
        para = corpus.qa(paraphrase=True)
        wattr = {a.replace("_", " "): j for j, a in enumerate(para.attributes)}
        for i, a in enumerate(np.asarray(para.attribute).tolist()):
            by_attr.setdefault(a, []).append(i)
        people = corpus.people.names
    shipped: dict[str, list[str]] = {}
    rows = []
    for i in range(len(facts)):
        attr = facts.attributes[int(facts.attribute[i])]
        name = names[int(facts.person[i])]
        j = wattr.get(attr.replace("_", " "))
        if j is not None and j in by_attr:
            k = by_attr[j][i % len(by_attr[j])]
            src = people[int(para.person[k])]
            q = para.question[k].replace(src, name) if src in para.question[k] else None
        else:
            ts = shipped.setdefault(attr, shipped_paraphrases(attr))
            # the phrasing in turn, or the next one when that one is the stored question
            q = next((c for k in range(len(ts))
                      for c in [ts[(i + k) % len(ts)].replace("{name}", name)]
                      if c != facts.question[i]), None)
        if q is not None and q != facts.question[i]:
            rows.append((i, q))
    if not rows:
        return None, None
    idx = np.array([r[0] for r in rows])
    return QA(person=np.asarray(facts.person)[idx], attribute=np.asarray(facts.attribute)[idx],
              template=np.ones(len(idx), np.int16), question=[r[1] for r in rows],
              answer=[facts.answer[i] for i in idx], attributes=facts.attributes,
              heldout=True), idx


def _ask(model, tok, qa, cfg, locality_set: str | None = None):
    """Greedy answers to ``qa`` in the run's prompt format (the general-knowledge set: a
    sentence's worth of tokens, scored by containment)."""
    from factlab.evaluate.general import ANSWER_TOKENS
    from factlab.evaluate.generate import evaluate_qa

    return evaluate_qa(model, tok, qa, batch_size=cfg.eval_batch_size,
                       prompt_format=cfg.prompt_format,
                       max_new_tokens=ANSWER_TOKENS if locality_set == "general" else None)


def _routes_per_fact(model, enc, batch: int = 64) -> list[set]:
    import torch

    out: list[set] = []
    for s in range(0, len(enc), batch):
        idx = list(range(s, min(len(enc), s + batch)))
        rows = [enc.example(q).astype(np.int64) for q in idx]
        L = max(len(r) for r in rows)
        x = torch.zeros(len(rows), L, dtype=torch.long)
        for r, ids in enumerate(rows):
            x[r, :len(ids)] = torch.from_numpy(ids)
        routes = model.routes(x.to(model.device))
        for r, q in enumerate(idx):
            a, n = int(enc.answer_start[q]) - 1, len(rows[r]) - 1  # positions predicting answers
            slots = set()
            for b, ix in routes.items():
                slots.update((b * 10**9 + ix[r, a:n]).reshape(-1).tolist())
            out.append(slots)
    return out


def _continuations(qa, records, fmt: str):
    """``qa``'s prompts with the answers in ``records`` (the backbone's, recorded before any
    write) as the continuation that teacher-forced locality reads."""
    from dataclasses import replace

    ans = [p[1:] if fmt == "plain" and p.startswith(" ") else p
           for p in (r["prediction"] for r in records)]
    return replace(qa, answer=ans)


def _locality_continuations(backbone, tok, halves, before, cfg) -> dict:
    """Per locality test half: its prompts encoded with the backbone's own answers as the
    continuation, and the backbone's argmax token at each of its positions (EasyEdit's
    teacher-forced locality compares a later model's to these)."""
    from factlab.evaluate.score import score_encoded
    from factlab.tokens.encode import encode_qa

    out = {}
    for k, (_, te) in halves.items():
        e = encode_qa(tok, _continuations(te, before[k], cfg.prompt_format), cfg.prompt_format)
        out[k] = (e, score_encoded(backbone, e, batch_size=cfg.eval_batch_size,
                                   argmax=True).argmax)
    return out


def _evaluate_after(model, tok, facts, halves, before, corpus, cfg, para=None, enc=None,
                    tf_before=None) -> dict:
    """Reliability, generalization (on ``para``, the held-out paraphrases) and the
    locality sets' numbers for any model after the write: generation first; with ``enc``
    (the facts encoded) and ``tf_before`` (``_locality_continuations``) the teacher-forced
    numbers beside (``_scores``: the facts' scores)."""
    from factlab.evaluate.score import score_encoded
    from factlab.memory import metrics as M
    from factlab.tokens.encode import encode_qa

    t0 = time.perf_counter()
    met, recs = _ask(model, tok, facts, cfg)
    res = {"reliability": met["exact_match"], "locality": {}, "_records": recs,
           "_answer_s": time.perf_counter() - t0}
    if enc is not None:
        sc = score_encoded(model, enc, batch_size=cfg.eval_batch_size)
        res["_scores"], res["reliability_teacher_forced"] = sc, float(sc.all_argmax.mean())
    if para is not None:
        res["generalization"] = _ask(model, tok, para, cfg)[0]["exact_match"]
        res["generalization_teacher_forced"] = float(score_encoded(
            model, encode_qa(tok, para, cfg.prompt_format),
            batch_size=cfg.eval_batch_size).all_argmax.mean())
    for k, (_, te) in halves.items():
        _, after = _ask(model, tok, te, cfg, k)
        row = {"prompts": len(after),
               "unchanged": M.locality([r["prediction"] for r in before[k]],
                                       [r["prediction"] for r in after])}
        if tf_before is not None:
            e, ids = tf_before[k]
            row["unchanged_teacher_forced"] = M.token_agreement(
                ids, score_encoded(model, e, batch_size=cfg.eval_batch_size,
                                   argmax=True).argmax)
        if k == "own":
            split = np.asarray(corpus.split)[np.asarray(te.person)]
            for name, sel in (("ood", split == 1), ("id", split == 0)):
                if sel.any():
                    row[f"{name}_before"] = float(np.mean([r["correct"] for r, s in
                                                           zip(before[k], sel) if s]))
                    row[f"{name}_after"] = float(np.mean([r["correct"] for r, s in
                                                          zip(after, sel) if s]))
        if k == "general":  # the backbone's general knowledge, by containment
            from factlab.evaluate.general import contains_answer

            row["accuracy_before"] = float(np.mean([contains_answer(r["prediction"], r["answer"])
                                                    for r in before[k]]))
            row["accuracy_after"] = float(np.mean([contains_answer(r["prediction"], r["answer"])
                                                   for r in after]))
        if k == "never_stored":
            vals = list(facts.answer)
            row["hallucination_before"] = M.unknown_hallucination(
                [r["prediction"] for r in before[k]], vals)
            row["hallucination_after"] = M.unknown_hallucination(
                [r["prediction"] for r in after], vals)
        res["locality"][k] = row
    return res


def _baseline(kind, model_path, tok, facts, enc, longest, steps, cfg, halves, before, corpus,
              out, progress, writes=None, para=None, epochs=None, lr=None,
              tf_before=None) -> dict:
    """LoRA or full finetuning of the backbone on the same facts for ``steps`` steps; with
    ``writes`` (positions per write), one experience per write through the experience
    driver, ``steps`` steps each."""
    from factlab.model.load import load_any
    from factlab.tokens.streams import QAStream
    from factlab.train import Loop, TrainConfig
    from factlab.train.experiences import Driver, Experience
    from factlab.train.plugins import LoRA

    if kind not in ("lora", "full"):
        raise FactlabError(f"memory baselines: {kind!r} is not lora or full")
    model = load_any(model_path)
    plugins = [LoRA(r=32, r_embed=0, export="adapter")] if kind == "lora" else []

    def tcfg(n_steps, batch):
        return TrainConfig(steps=max(1, n_steps), batch_size=batch, precision="no",
                           lr=lr or (cfg.lora_lr if kind == "lora" else cfg.full_lr),
                           optimizer="adafactor" if kind == "lora" else "adamw",
                           weight_decay=0.0, schedule="constant", log_every=50, seed=cfg.seed)

    t0 = time.perf_counter()
    curve, evaluate = [], None
    if writes is None and epochs:  # at its own best: epochs, recall measured along
        steps = max(1, math.ceil(epochs * len(facts) / cfg.batch_size))

        def evaluate(loop, step):
            r = _ask(loop.model, tok, facts, cfg)[0]
            curve.append({"epochs": step * cfg.batch_size / len(facts),
                          "recall": r["exact_match"]})
            return {"recall": r["exact_match"]}
    if writes is None:
        c = tcfg(steps, cfg.batch_size)
        if evaluate is not None:
            c = c.model_copy(update={"eval_every": max(1, steps // cfg.baseline_evals)})
        loop = Loop(model, QAStream(enc, longest, tok.pad_token_id, pack=False),
                    c, out / (f"baseline_{kind}" + (f"_best_lr{c.lr:g}" if epochs else "")),
                    plugins=plugins, evaluate=evaluate,
                    progress=progress, name=kind, export=False, keep_checkpoint=False)
        loop.run()
        m, final = loop.model, loop.history[-1].get("loss") if loop.history else None
        total = loop.cfg.steps
    else:
        exps = [Experience(f"write{t}", QAStream(enc.take(w), longest, tok.pad_token_id,
                                                 pack=False),
                           tcfg(steps, min(cfg.batch_size, len(w))))
                for t, w in enumerate(writes, 1)]
        drv = Driver(model, exps, {}, out / f"baseline_{kind}", plugins=plugins,
                     eval_every=len(exps), tokenizer=tok, progress=False, export=False)
        drv.run()
        m, final, total = drv.model, None, max(1, steps) * len(exps)
    tuned = time.perf_counter() - t0
    m.eval()
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    row = _evaluate_after(m, tok, facts, halves, before, corpus, cfg, para, enc, tf_before)
    recs, sc = row.pop("_records"), row.pop("_scores")
    del row["_answer_s"]
    # the "hallucinate above a loss threshold" reading, for the finetuned model too
    from factlab.memory import metrics as M

    correct = np.array([r["correct"] for r in recs])
    res = {**row, "steps": total, "tuning_s": tuned, "trainable_parameters": trainable,
           "final_loss": final, "lr": lr or (cfg.lora_lr if kind == "lora" else cfg.full_lr),
           "recall_by_max_nll": M.recall_by_nll(sc.max_nll, correct),
           "reliable_below_nll": M.reliable_below(sc.max_nll, correct)}
    if curve:
        best = max(curve, key=lambda r: r["recall"])
        res.update(curve=curve, best_recall=best["recall"], best_epochs=best["epochs"],
                   epochs=epochs)
    return res


class _WriteBar:
    """One progress line for a stream of writes (the loops' own bars stay off)."""

    def __init__(self, plug, total: int, on: bool):
        self.plug, self.bar = plug, None
        if on:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]writes"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[extra]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.bar.add_task("writes", total=total, extra="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *a):
        if self.bar is not None:
            self.bar.stop()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.plug.completed,
                            extra=self.plug.progress_text())


def _sequential(m, plug, enc, facts, tok, longest, halves, before, cfg, out, progress):
    """Train ``plug``'s writes one experience each through the experience driver,
    scoring (generation) the facts written so far, the first write's facts and the
    locality test halves at ``cfg.eval_points`` points; returns the driver."""
    from factlab.memory import metrics as M
    from factlab.tokens.streams import QAStream
    from factlab.train import TrainConfig
    from factlab.train.experiences import Driver, Experience
    from factlab.train.plugins import Plugin

    writes = plug.writes
    exps = []
    for t, w in enumerate(writes, 1):
        bt = min(cfg.batch_size, max(1, math.ceil(len(w) / (1 - cfg.revisit))) +
                 (1 if cfg.replay else 0))
        steps = max(1, math.ceil(cfg.max_exposures * len(w) / min(bt, len(w))))
        exps.append(Experience(f"write{t}", QAStream(enc.take(w), longest, tok.pad_token_id,
                                                     pack=False),
                               TrainConfig(steps=steps, batch_size=bt, log_every=50,
                                           precision="no", schedule="constant", clip=0,
                                           sparse_optimizer=cfg.sparse_optimizer,
                                           seed=cfg.seed, ckpt_minutes=0)))
    bar = _WriteBar(plug, len(writes), progress)

    def em(model, idx):
        if not len(idx):  # nothing written yet
            return 0.0, None
        return _ask(model, tok, _take(facts, idx), cfg)[0][
            "exact_match"], None

    def written(model):
        done = writes[:plug.completed]
        return em(model, np.concatenate(done) if done else [])

    evals = {"written": written,
             "first_write": lambda model: em(model, writes[0] if plug.completed else [])}
    for k, (_, te) in halves.items():
        def unchanged(model, k=k, te=te):
            after = _ask(model, tok, te, cfg, k)[1]
            return M.locality([r["prediction"] for r in before[k]],
                              [r["prediction"] for r in after]), None
        evals[f"{k}_unchanged"] = unchanged
    every = max(1, len(writes) // cfg.eval_points)

    class _Tick(Plugin):  # the bar moves after every write, not only at evaluated ones
        name = "write tick"

        def after_experience(self, loop, t):
            bar.update()

    drv = Driver(m, exps, evals, out / "writes", plugins=[plug, _Tick()], eval_every=every,
                 tokenizer=tok, progress=False, export=False)
    with bar:
        drv.run()
    return drv


def tune_memory(model_path, tokenizer_path, facts, names: list[str], out, cfg: MemorySettings,
                *, corpus=None, progress: bool = True, run_id: dict | None = None,
                replace: bool = False) -> dict:
    """Store ``facts`` (a ``text.qa.QA``; ``names[facts.person[i]]`` is the entity of fact
    i) in a memory on the model at ``model_path``; check everything first, then write
    ``out/model`` (the wrapper),
    ``out/results.json``, ``out/report.md`` and the predictions; return the results."""
    import torch

    from factlab.memory import metrics as M
    from factlab.memory.gate import pick_radius
    from factlab.memory.model import MemoryModel, decoder_layers, default_layers, prompt_tokens
    from factlab.memory.tune import MemoryTuning
    from factlab.model.load import load_any
    from factlab.tokens.encode import encode_qa
    from factlab.tokens.streams import QAStream
    from factlab.tokens.tokenizer import load_tokenizer
    from factlab.train import Loop, TrainConfig

    out = Path(out)
    if len(facts) == 0:
        raise FactlabError("memory tune: no facts")
    if cfg.writes > len(facts):
        raise FactlabError(f"memory tune: writes={cfg.writes} but only {len(facts)} facts "
                           f"(each write needs at least one)")
    seq = cfg.writes > 1
    pin_steps = cfg.pin_steps if cfg.pin_steps is not None else (0 if seq else 200)
    tok = load_tokenizer(tokenizer_path)
    backbone = load_any(model_path)
    ctx = int(getattr(backbone.config, "max_position_embeddings", 0) or 0)
    enc = encode_qa(tok, facts, cfg.prompt_format)
    longest = int(enc.lengths.max())
    if ctx and longest > ctx:
        q = int(np.argmax(enc.lengths))
        raise FactlabError(f"memory tune: fact {q} ({facts.question[q]!r}) is {longest} tokens "
                           f"with its answer, longer than the model's context ({ctx})")
    decoder_layers(backbone)  # an unsupported family fails here, before anything is written
    if cfg.gate == "entity" and cfg.routing != "key":
        raise FactlabError("memory tune: gate=entity reads the matched fact's own rows: it "
                           "needs routing=key")
    if cfg.gate == "entity" and seq:
        raise FactlabError("memory tune: gate=entity writes every fact at once (writes=1); "
                           "sequential writes use gate=keys")
    n_banks = len(cfg.layers) if cfg.layers else 1 if cfg.gate in ("keys", "entity") else \
        len(default_layers(len(decoder_layers(backbone))))
    span = cfg.span or int((enc.lengths - enc.answer_start).max()) + 4
    if cfg.routing == "key":
        if cfg.gate not in ("keys", "entity"):
            raise FactlabError("memory tune: routing=key needs gate=keys or gate=entity")
        if len(facts) * span > cfg.n_keys ** 2:
            raise FactlabError(f"memory tune: routing=key: {len(facts):,} facts x span {span} "
                               f"rows need more than the bank's {cfg.n_keys ** 2:,} slots "
                               f"(raise n_keys)")
    need = check_bank_fits(cfg, backbone.config.hidden_size, n_banks)
    # everything checked: now the run directory (``run_id`` marks it: the same run again
    # resumes from the loop's checkpoint)
    if replace and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        atomic_write_text(out / "memory_run.json", json.dumps(run_id, indent=1) + "\n")
    res: dict = {"settings": cfg.model_dump(), "facts": len(facts), "model": str(model_path),
                 "bank_bytes": need, "timing_s": {}}
    # ---- before any write: the backbone's answers on the locality sets
    t0 = time.perf_counter()
    loc = locality_sets(corpus, facts, names, cfg.seed, cfg.locality_per_set) if corpus else \
        general_locality_sets(facts, names, cfg.seed, cfg.locality_per_set)
    halves = {k: (_half(v, 0), _half(v, 1)) for k, v in loc.items()}
    before = {k: _ask(backbone, tok, te, cfg, k)[1]
              for k, (_, te) in halves.items()}
    tf_before = _locality_continuations(backbone, tok, halves, before, cfg)
    t1 = time.perf_counter()
    base_recall = _ask(backbone, tok, facts, cfg)[0]
    answer_s = {"backbone": time.perf_counter() - t1}
    res["timing_s"]["before"] = time.perf_counter() - t0
    # ---- the memory, its keys, the radius (validation halves only)
    m = MemoryModel(backbone, n_keys=cfg.n_keys, heads=cfg.heads, topk=cfg.topk,
                    key_dim=cfg.key_dim, layers=cfg.layers, routing=cfg.routing,
                    gate=None if cfg.gate == "none" else cfg.gate, seed=cfg.seed,
                    experts=cfg.experts,
                    radius=cfg.radius or 0.98, backbone_path=str(model_path), span=span,
                    prompt_format=cfg.prompt_format, key_index=cfg.key_index,
                    entity_layer=cfg.entity_layer, relation_layer=cfg.relation_layer)
    writes, val_states = None, None
    if m.entgate is not None:
        from factlab.memory.entity import write_entity_gate

        fit = entity_fit_sets(corpus, facts, names, halves, cfg)
        res["entity_gate"] = write_entity_gate(
            m, tok, facts, names, **fit, prompt_format=cfg.prompt_format,
            entity_margin=cfg.entity_margin, relation_margin=cfg.relation_margin,
            entity_quantile=cfg.entity_quantile)
    if m.keygate is not None and not seq:
        m.write_keys(enc)
        if cfg.radius is None and halves:
            val = np.concatenate([m.question_scores(encode_qa(tok, va, cfg.prompt_format))
                                  for va, _ in halves.values()])
            m.radius = pick_radius(val, cfg.radius_margin)
    elif m.keygate is not None:  # keys are written one write at a time, by the plugin
        if halves and len(halves["never_stored"][0]) >= 16:  # queries' whitening: before
            m.fit_queries(encode_qa(tok, halves["never_stored"][0], cfg.prompt_format))  # any write
        if cfg.radius is None and halves:  # chosen again after each write
            val_states = torch.cat([m.key_states(encode_qa(tok, va, cfg.prompt_format))
                                    for va, _ in halves.values()])
    if seq:
        writes = np.array_split(np.arange(len(facts)), cfg.writes)
    # ---- tuning
    value_lr = cfg.value_lr or (2.0 if cfg.routing == "key" else 0.5)
    plug = MemoryTuning(enc, longest, tok.pad_token_id, tau=cfg.tau, tau_margin=cfg.tau_margin,
                        revisit=cfg.revisit,
                        value_lr=value_lr, router_lr=cfg.router_lr, pin_steps=pin_steps,
                        expert_lr=cfg.expert_lr,
                        seed=cfg.seed, minutes=cfg.minutes, writes=writes, replay=cfg.replay,
                        radius_from=val_states, radius_margin=cfg.radius_margin)
    t0 = time.perf_counter()
    if not seq:
        steps = max(1, math.ceil(cfg.max_exposures * len(facts) / cfg.batch_size))
        tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, log_every=50,
                           precision="no", schedule="constant", clip=0,
                           sparse_optimizer=cfg.sparse_optimizer, seed=cfg.seed)
        loop = Loop(m, QAStream(enc, longest, tok.pad_token_id, pack=False), tcfg, out,
                    plugins=[plug], tokenizer=tok, progress=progress, name="memory")
        loop.run()
        res["timing_s"]["tuning"] = time.perf_counter() - t0
        n_steps = loop.history[-1]["step"] if loop.history else 0
    else:
        drv = _sequential(m, plug, enc, facts, tok, longest, halves, before, cfg, out, progress)
        m = drv.model
        from factlab.train.loop import export_model

        export_model(m, out / "model", plugins=[plug], tokenizer=tok)
        res["timing_s"]["tuning"] = drv.seconds["train"]
        res["timing_s"]["evaluation_during_writes"] = drv.seconds["eval"]
        n_steps = plug.steps_total
        res["sequential"] = {"writes": len(writes), "facts_per_write":
                             [int(min(len(w) for w in writes)), int(max(len(w) for w in writes))],
                             "replay": cfg.replay, "pin_steps": pin_steps,
                             "radius": "chosen again after each write on the validation "
                                       "prompts" if val_states is not None else "fixed",
                             "curve": [{"writes": r["t"], **r["acc"]}
                                       for r in drv.R["rows"]]}
    if m.keygate is not None:
        res["radius"] = m.radius
    res["tuning"] = {**plug.summary(), "steps": n_steps, "all_done": bool(plug.done.all()),
                     "trace": plug.trace_rows()}
    # ---- after: generation first, teacher-forced beside
    t0 = time.perf_counter()
    m.eval()
    para, idx_para = paraphrases(corpus, facts, names)
    after = _evaluate_after(m, tok, facts, halves, before, corpus, cfg, para, enc, tf_before)
    recs, sc = after.pop("_records"), after.pop("_scores")
    answer_s["memory"] = after.pop("_answer_s")
    # the lookup's cost where a user meets it: greedy answers to the stored questions, the
    # same prompts and batch, the backbone (before) and the memory model (after)
    res["answer_latency_ms"] = {k: 1e3 * v / len(facts) for k, v in answer_s.items()}
    res["answer_latency_ms"]["batch"] = cfg.eval_batch_size
    correct = np.array([r["correct"] for r in recs])
    res["reliability"] = {"generation_exact_match": after["reliability"],
                          "teacher_forced_all_argmax": after["reliability_teacher_forced"],
                          "backbone_before": base_recall["exact_match"],
                          "measured": f"after all {cfg.writes} sequential writes" if seq
                          else "after all writes (one write of every fact)"}
    res["recall_by_max_nll"] = M.recall_by_nll(sc.max_nll, correct)
    res["reliable_below_nll"] = M.reliable_below(sc.max_nll, correct)
    res["locality"] = after["locality"]
    if para is not None:
        g_bb = _ask(backbone, tok, para, cfg)[0]
        row = {"prompts": len(para), "generation_exact_match": after.pop("generalization"),
               "teacher_forced_all_argmax": after.pop("generalization_teacher_forced"),
               "backbone": g_bb["exact_match"]}
        if m.keygate is not None:
            row["gate_open"] = float((m.question_scores(encode_qa(tok, para, cfg.prompt_format))
                                      >= m.radius).mean())
        if m.entgate is not None:
            pe = encode_qa(tok, para, cfg.prompt_format)
            at, kid = m.openings(prompt_tokens(pe))
            row["gate_open"] = float((at >= 0).mean())
            row["gate_open_own_fact"] = float((kid == idx_para).mean())
        res["generalization"] = row
    if m.entgate is not None:
        def ent(e):
            return m.entity_scores(prompt_tokens(e))

        pos = ent(enc)
        neg = np.concatenate([ent(encode_qa(tok, te, cfg.prompt_format))
                              for k, (_, te) in halves.items() if k != "stored_entities"])
        res["abstention"] = {"score": "best entity-key cosine over the question (entity gate)",
                             "auroc_stored_vs_never_stored": M.auroc(pos, neg),
                             "stored_min": float(pos.min()), "never_stored_max": float(neg.max())}
        if para is not None:  # asked as stored a question scores 1; a paraphrase does not
            res["abstention"]["auroc_paraphrase_vs_never_stored"] = M.auroc(
                ent(encode_qa(tok, para, cfg.prompt_format)), neg)
    if m.keygate is not None:
        pos = m.question_scores(enc)
        neg = np.concatenate([m.question_scores(encode_qa(tok, te, cfg.prompt_format))
                              for _, te in halves.values()]) if halves else np.zeros(0)
        res["abstention"] = {"score": "nearest stored key cosine (key gate)",
                             "auroc_stored_vs_never_stored": M.auroc(pos, neg),
                             "stored_min": float(pos.min()),
                             "never_stored_max": float(neg.max()) if len(neg) else None}
    try:
        res["slot_sharing"] = M.slot_sharing(_routes_per_fact(m, enc))
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        res["slot_sharing"] = {"error": str(e)}
    # the bank holds the facts: zero its values and recall falls to the backbone's
    saved = [p.detach().clone() for p in m.value_parameters()]
    m.zero_bank()
    res["reliability"]["bank_zeroed"] = _ask(m, tok, facts, cfg)[0]["exact_match"]
    with torch.no_grad():
        for p, v in zip(m.value_parameters(), saved):
            p.copy_(v)
    res["timing_s"]["evaluation_after"] = time.perf_counter() - t0
    res["parameters"] = {"added": sum(p.numel() for p in m.parameters()),
                         "trained_at_end": sum(p.numel() for p in m.parameters()
                                               if p.requires_grad),
                         "backbone": sum(p.numel() for p in backbone.parameters())}
    # ---- baselines: the same facts, the memory's exposure budget
    if not seq:
        budget = int(np.ceil(plug.exposures.sum() / cfg.batch_size))
    else:  # steps per write: the memory's exposures per write, in batches of the write
        budget = int(np.ceil(plug.exposures.sum() / len(writes) /
                             min(cfg.batch_size, min(len(w) for w in writes))))
    res["baselines"] = {}
    for k in cfg.baselines:
        res["baselines"][k] = _baseline(k, model_path, tok, facts, enc, longest, budget, cfg,
                                        halves, before, corpus, out, progress, writes=writes,
                                        para=para, tf_before=tf_before)
        if cfg.baseline_epochs and not seq:  # and at its own best (over the lr grid)
            tries = [_baseline(k, model_path, tok, facts, enc, longest, budget, cfg, halves,
                               before, corpus, out, progress, para=para,
                               epochs=cfg.baseline_epochs, lr=lr, tf_before=tf_before)
                     for lr in ((cfg.lora_lrs if k == "lora" else cfg.full_lrs) or [None])]
            # the best recall; of equals, the one that got there in fewest epochs
            best = max(tries, key=lambda b: (b["best_recall"], -b["best_epochs"]))
            best["lr_grid"] = [{"lr": b["lr"], "best_recall": b["best_recall"],
                                "best_epochs": b["best_epochs"], "reliability": b["reliability"]}
                               for b in tries]
            res["baselines"][f"{k}, own best"] = best
    # ---- write
    lines = "".join(json.dumps({**r, "name": names[int(r["person"])]}) + "\n" for r in recs)
    atomic_write_text(out / "predictions_facts.jsonl", lines)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(out / "report.md", report(res))
    return res


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _tf(x) -> str:
    """A teacher-forced number beside its generation one."""
    return "" if x is None else f" (tf {100 * x:.1f}%)"


def held_out(locality: dict) -> dict:
    """What the backbone knew, before and after: the world's held-out (OOD) accuracy on its
    own questions, or, without a world, the general-knowledge set's (containment); with
    ``unchanged`` and ``set`` (which of the two)."""
    if "own" in locality:
        o = locality["own"]
        return {"set": "own", "before": o.get("ood_before"), "after": o.get("ood_after"),
                "unchanged": o.get("unchanged"), "unchanged_tf": o.get("unchanged_teacher_forced")}
    if "general" in locality:
        g = locality["general"]
        return {"set": "general", "before": g.get("accuracy_before"),
                "after": g.get("accuracy_after"), "unchanged": g.get("unchanged"),
                "unchanged_tf": g.get("unchanged_teacher_forced")}
    return {}


def _loc(locality: dict, k: str) -> str:
    """One locality set's answers unchanged, generation (teacher-forced)."""
    row = locality.get(k, {})
    return _pct(row.get("unchanged")) + _tf(row.get("unchanged_teacher_forced"))


def report(res: dict) -> str:
    t, r = res["tuning"], res["reliability"]
    s = res["settings"]
    lines = [f"# Memory tuning: {res['facts']:,} facts on {res['model']}", "",
             f"Bank: {s['n_keys'] ** 2:,} slots, {s['heads']} heads x top-{s['topk']}, "
             f"routing {s['routing']}, gate {s['gate']}"
             + (f" (radius {res['radius']:.4f}, chosen on validation prompts)"
                if "radius" in res else "")
             + (f" (entity radius {res['entity_gate']['radius']:.4f} at layer "
                f"{s['entity_layer'] if s['entity_layer'] is not None else 'default'}, relation "
                f"thresholds {', '.join(f'{x:.2f}' for x in res['entity_gate']['relation_thresholds'])}"
                f", chosen on validation prompts)" if "entity_gate" in res else "")
             + f"; values + optimizer state {res['bank_bytes']['total'] / 2**20:.1f} MiB.", "",
             "| measure | value |", "|---|---|",
             f"| reliability (greedy exact match, after all writes) | {_pct(r['generation_exact_match'])} |",
             f"| reliability (teacher-forced: every answer token the argmax) | "
             f"{_pct(r['teacher_forced_all_argmax'])} |",
             f"| the backbone on the same questions, before | {_pct(r['backbone_before'])} |",
             f"| recall with the bank's values zeroed | {_pct(r['bank_zeroed'])} |",
             f"| facts done (max-token NLL < {s['tau']} and all argmax"
             + ("; flags of each fact's own write, later writes may undo them"
                if "sequential" in res and not s.get("replay") else "")
             + f") | {t['done']:,} / {t['facts']:,} |",
             f"| exposures per fact: mean / max | {t['exposures_mean']:.1f} / {t['exposures_max']} |",
             f"| tuning steps / time | {t['steps']:,} / {res['timing_s']['tuning']:.0f} s |",
             f"| evaluation time (before / after) | {res['timing_s']['before']:.0f} s / "
             f"{res['timing_s']['evaluation_after']:.0f} s |"]
    if "generalization" in res:
        g = res["generalization"]
        lines.append(f"| generalization: paraphrased questions ({g['prompts']}), greedy exact "
                     f"match (backbone alone) | {_pct(g['generation_exact_match'])} "
                     f"({_pct(g['backbone'])}) |")
        if "teacher_forced_all_argmax" in g:
            lines.append(f"| generalization, teacher-forced: every answer token the argmax | "
                         f"{_pct(g['teacher_forced_all_argmax'])} |")
        if "gate_open" in g:
            lines.append(f"| paraphrases the gate opens on | {_pct(g['gate_open'])} |")
        if "gate_open_own_fact" in g:
            lines.append(f"| paraphrases the gate opens on with their own fact's key | "
                         f"{_pct(g['gate_open_own_fact'])} |")
    for k, row in res.get("locality", {}).items():
        lines.append(f"| locality, {k.replace('_', ' ')} ({row['prompts']} test prompts): "
                     f"answers unchanged | {_pct(row['unchanged'])} |")
        if "unchanged_teacher_forced" in row:
            lines.append(f"| locality, {k.replace('_', ' ')}, teacher-forced: the backbone's "
                         f"answer tokens still the argmax (token share) | "
                         f"{_pct(row['unchanged_teacher_forced'])} |")
        if "ood_before" in row:
            lines.append(f"| the backbone's held-out (OOD) accuracy before → after | "
                         f"{_pct(row['ood_before'])} → {_pct(row['ood_after'])} |")
        if "accuracy_before" in row:
            lines.append(f"| general knowledge: the answer in the reply, before → after | "
                         f"{_pct(row['accuracy_before'])} → {_pct(row['accuracy_after'])} |")
        if "hallucination_after" in row:
            hb, ha = row["hallucination_before"], row["hallucination_after"]
            lines.append(f"| never-stored names: answered / with a stored value, before → after"
                         f" | {_pct(hb['answered'])} / {_pct(hb['stored_value'])} → "
                         f"{_pct(ha['answered'])} / {_pct(ha['stored_value'])} |")
    if "abstention" in res:
        lines.append(f"| abstention AUROC, stored vs never stored "
                     f"({'entity score' if 'entity_gate' in res else 'key-gate score'}) | "
                     f"{res['abstention']['auroc_stored_vs_never_stored']:.4f} |")
        if "auroc_paraphrase_vs_never_stored" in res["abstention"]:
            lines.append(f"| abstention AUROC, paraphrases of stored questions vs never stored "
                         f"(entity score) | "
                         f"{res['abstention']['auroc_paraphrase_vs_never_stored']:.4f} |")
    if "answer_latency_ms" in res:
        la = res["answer_latency_ms"]
        lines.append(f"| greedy answer time per stored question (batch {la['batch']}): "
                     f"backbone → memory | {la['backbone']:.1f} ms → {la['memory']:.1f} ms |")
    ss = res.get("slot_sharing", {})
    if "slots_used" in ss:
        lines.append(f"| slots used / facts per slot (mean, max) / facts sharing a slot | "
                     f"{ss['slots_used']:,} / {ss['facts_per_slot_mean']:.2f}, "
                     f"{ss['facts_per_slot_max']} / {ss['facts_sharing']:,} |")
    if res.get("baselines"):
        lines += ["", "Baselines on the same facts, with the memory's exposure budget "
                      "(the same number of sequences)"
                  + ("" if not s.get("baseline_epochs") else
                     f", and at their own best (\"own best\": {s['baseline_epochs']} epochs, "
                     f"greedy recall measured {s['baseline_evals']} times along, the best "
                     f"point in brackets, every other number after the last epoch)") + ":",
                  "",
                  "Generation exact match first; teacher-forced (tf) beside: every answer "
                  "token the argmax for reliability and generalization, the share of the "
                  "backbone's answer tokens still the argmax for locality.", "",
                  "| method | steps | time | trainable params | reliability | generalization "
                  "| own questions unchanged | held-out before → after | never-stored unchanged | "
                  "stored entities unchanged |", "|---|---|---|---|---|---|---|---|---|---|"]
        own = held_out(res["locality"])
        gen = res.get("generalization", {})
        lines.append(f"| memory (this run) | {t['steps']:,} | {res['timing_s']['tuning']:.0f} s "
                     f"| {res['parameters']['added']:,} added | "
                     f"{_pct(r['generation_exact_match'])}"
                     f"{_tf(r['teacher_forced_all_argmax'])} | "
                     f"{_pct(gen.get('generation_exact_match'))}"
                     f"{_tf(gen.get('teacher_forced_all_argmax'))} | "
                     f"{_pct(own.get('unchanged'))}{_tf(own.get('unchanged_tf'))} | "
                     f"{_pct(own.get('before'))} → {_pct(own.get('after'))} | "
                     + _loc(res["locality"], "never_stored") + " | "
                     + _loc(res["locality"], "stored_entities") + " |")
        for k, b in res["baselines"].items():
            lo = b["locality"]
            o = held_out(lo)
            lines.append(f"| {k} | {b['steps']:,} | {b['tuning_s']:.0f} s | "
                         f"{b['trainable_parameters']:,} | {_pct(b['reliability'])}"
                         f"{_tf(b.get('reliability_teacher_forced'))}"
                         + (f" (best {_pct(b['best_recall'])} at {b['best_epochs']:.0f} "
                            f"epochs, lr {b['lr']:g})" if "best_recall" in b else "") + " | "
                         f"{_pct(b.get('generalization'))}"
                         f"{_tf(b.get('generalization_teacher_forced'))} | "
                         f"{_pct(o.get('unchanged'))}{_tf(o.get('unchanged_tf'))} | "
                         f"{_pct(o.get('before'))} → {_pct(o.get('after'))} | "
                         + _loc(lo, "never_stored") + " | " + _loc(lo, "stored_entities") + " |")
    if "sequential" in res:
        sq = res["sequential"]
        cols = [k for k in sq["curve"][0] if k != "writes"] if sq["curve"] else []
        lines += ["", f"Sequential writes: {sq['writes']:,} writes of "
                      f"{sq['facts_per_write'][0]}–{sq['facts_per_write'][1]} facts, one after "
                      f"another (replay of earlier writes: {'yes' if sq['replay'] else 'no'}; "
                      f"radius {sq['radius']}). Greedy exact match on the facts written so far "
                      f"and on the first write's, and locality answers unchanged, along the "
                      f"stream:", "",
                  "| after write | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for row in sq["curve"]:
            lines.append(f"| {row['writes']:,} | " +
                         " | ".join(_pct(row[c]) for c in cols) + " |")
    lines += ["", "Greedy recall by the fact's max-token NLL (teacher-forced, after tuning):", "",
              "| max-token NLL | facts | recall |", "|---|---|---|"]
    for b in res["recall_by_max_nll"]:
        if b["facts"]:
            lines.append(f"| [{b['nll_from']:.3g}, {b['nll_to']:.3g}) | {b['facts']} | "
                         f"{_pct(b['recall'])} |")
    return "\n".join(lines) + "\n"
