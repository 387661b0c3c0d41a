"""Fact streams for continual knowledge learning: a base world followed by experiences —
**cohorts** of new people and batches of **updates** to people already known — stored as a
world directory (its ``experiences/T/`` folders) plus ``stream.json`` naming the base
model it starts from.

    corpus = make_stream(base_corpus, StreamConfig(cohorts=2, people=100, updates=0.2))
    save_stream(corpus, "streams/s0", base={...})
    facts = stream_facts(corpus)      # every test question with its label

Every test fact is labelled after the last experience T:

- ``invariant``: a base person's value that no experience changes (must be retained);
- ``updated``: a value changed in experience j (the gold answer is the new value; the old
  one is kept as ``stale``: it must no longer be produced);
- ``new``: a value of a person who arrives in experience j (must be acquired);
- ``unknown``: a person who never appears in any text (hallucination probes).

``experience`` says which column of the accuracy matrix a fact belongs to (0: the base
world, j: the experience that introduced or changed it, -1: unknown people) and ``split``
whether the person's QA is trained on (``train``: ID) or only their text (``test``: OOD).
The same seed and config give the same stream, byte for byte; the base world's people,
codes and files never change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from factlab.config import Strict
from factlab.errors import FactlabError
from factlab.io import atomic_write_text
from factlab.world.people import TEST, TRAIN

STREAM_FILE = "stream.json"
FORMAT = 1
STREAM_PICK = 8  # of factlab.world.sample.rng's streams: who is updated
LABELS = ("invariant", "updated", "new", "unknown")


class StreamConfig(Strict):
    """``order`` lists the experiences' kinds (default: ``cohorts`` cohorts, then one
    update batch when ``updates`` > 0); ``updates`` is the fraction of the base world's
    people in ``who`` whose ``attribute`` changes in each update experience (people are
    never updated twice in one stream). ``facts`` are fact files, one experience each,
    after those: entities, attributes and values of their own (a user's facts after a
    biography world), read by :func:`add_fact_file` with ``facts_templates``."""

    cohorts: int = Field(2, ge=0)
    people: int = Field(100, description="people per cohort")
    updates: float = 0.2
    attribute: str = "employer"
    who: Literal["train", "test", "both"] = "both"
    order: list[Literal["cohort", "update"]] | None = None
    facts: list[str] = []
    facts_templates: str | None = None
    seed: int = 0

    def kinds(self) -> list[str]:
        if self.order is not None:
            return list(self.order)
        return ["cohort"] * self.cohorts + (["update"] if self.updates > 0 else [])


def make_stream(corpus, cfg: StreamConfig):
    """The base ``corpus`` (a world with no experiences yet) extended by the experiences
    of ``cfg``; ``corpus`` itself is not changed."""
    kinds = cfg.kinds()
    if not kinds and not cfg.facts:
        raise FactlabError("stream: no experiences (cohorts=0, updates=0 and no fact files)")
    for f in cfg.facts + ([cfg.facts_templates] if cfg.facts_templates else []):
        if not Path(f).is_file():
            raise FactlabError(f"stream: {f}: no such file")
    if corpus.experiences:
        raise FactlabError(f"stream: the base world already has experiences "
                           f"{corpus.experiences}; start from a base world")
    if "cohort" in kinds and cfg.people < 2:
        raise FactlabError(f"stream: people per cohort must be >= 2 (P_train and P_test), "
                           f"got {cfg.people}")
    n_up = kinds.count("update")
    if n_up and not 0 < cfg.updates <= 1:
        raise FactlabError(f"stream: updates (the fraction of known people updated) must be "
                           f"in (0, 1], got {cfg.updates}")
    if n_up and cfg.attribute not in corpus.attributes:
        raise FactlabError(f"stream: attribute {cfg.attribute!r} does not exist (attributes: "
                           f"{', '.join(corpus.attributes)})")
    w = corpus.world
    pool = {"train": w.train_ids, "test": w.test_ids,
            "both": w.base_ids}[cfg.who]
    per = int(round(cfg.updates * len(pool))) if n_up else 0
    if n_up and per < 1:
        raise FactlabError(f"stream: updates={cfg.updates} of {len(pool)} people ({cfg.who}) "
                           f"updates nobody")
    if per * n_up > len(pool):
        raise FactlabError(f"stream: {n_up} update experiences of {per} people each need "
                           f"{per * n_up} people; {cfg.who} has {len(pool)}")
    order = np.random.default_rng([cfg.seed, STREAM_PICK]).permutation(pool)
    u = 0
    for t, kind in enumerate(kinds, start=1):
        if kind == "cohort":
            corpus = corpus.add_cohort(cfg.people, experience=t, seed=cfg.seed)
        else:
            who = np.sort(order[u * per:(u + 1) * per])
            corpus = corpus.update_facts(who, cfg.attribute, experience=t, seed=cfg.seed)
            u += 1
    for t, f in enumerate(cfg.facts, start=len(kinds) + 1):
        corpus = add_fact_file(corpus, f, t, seed=cfg.seed, templates=cfg.facts_templates)
    return corpus


def make_user_stream(files, *, templates=None, seed: int = 0, unknown: int = 50,
                     test_fraction: float = 0.5):
    """A stream from a user's fact files (CSV / JSONL: entity, attribute, value), one per
    experience: the first is the base world, each later one is added by
    :func:`add_fact_file`."""
    from factlab.corpus import CorpusConfig, make_corpus

    files = [Path(f) for f in files]
    if len(files) < 2:
        raise FactlabError("a user stream needs at least 2 fact files (the base, then one per "
                           "experience)")
    corpus = make_corpus(CorpusConfig(facts=str(files[0]), templates=templates, seed=seed,
                                      unknown=unknown, test_fraction=test_fraction))
    for t, f in enumerate(files[1:], start=1):
        corpus = add_fact_file(corpus, f, t, seed=seed, templates=templates)
    return corpus


def add_fact_file(corpus, path, t: int, *, seed: int = 0, templates=None):
    """``corpus`` with experience ``t`` read from a fact file (CSV / JSONL: entity,
    attribute, value): an entity not seen before arrives (a cohort), an entity-attribute
    that reappears with another value is an update, one that appears for the first time is
    a new fact, and a restated fact is ignored. An attribute the world lacks is added (a
    new kind of fact, e.g. a user's facts after a biography world: the experience is then
    separable from the others by its inputs), with ``templates`` (YAML) or generic ones;
    values first seen here are appended to the pools, so no code moves."""
    from factlab.world.cohorts import add_entities, extend_pools
    from factlab.world.facts import pronoun_codes, read_facts
    from factlab.world.people import Table
    from factlab.world.versions import set_values

    path = Path(path)
    pronouns: dict[str, str] = {}
    ents, at, facts = read_facts(path, pronouns=pronouns)
    corpus = corpus.with_attributes([a for a in at if a not in corpus.attributes], templates)
    attrs = corpus.attributes
    extra: dict[int, list[str]] = {}
    for (_, a), v in facts.items():
        extra.setdefault(attrs.index(a), []).append(v)
    w = extend_pools(corpus.world, extra)
    unknown = set(w.unknown.names)
    clash = [e for e in ents if e in unknown]
    if clash:
        raise FactlabError(f"{path}: {clash[0]!r} is one of the stream's unknown people; "
                           f"rename it")
    index = {n: i for i, n in enumerate(w.people.names)}
    code = [{v: c for c, v in enumerate(p)} for p in w.people.pools]
    new = [e for e in ents if e not in index]
    changes: dict[int, list[tuple[int, int]]] = {}
    now = w.codes_at(t - 1)
    for (e, a), v in facts.items():
        if e in index:
            ai, c = attrs.index(a), code[attrs.index(a)][v]
            if now[index[e], ai] != c:
                changes.setdefault(ai, []).append((index[e], c))
    if not new and not changes:
        raise FactlabError(f"{path}: adds nothing (every fact in it is already known)")
    if new:
        codes = np.full((len(new), len(attrs)), -1, np.int32)
        for k, e in enumerate(new):
            for a, attr in enumerate(attrs):
                v = facts.get((e, attr))
                if v is not None:
                    codes[k, a] = code[a][v]
        tab = Table(new, pronoun_codes(new, pronouns), attrs, codes, w.people.pools)
        w = add_entities(w, tab, t, seed)
    for ai, rows in changes.items():
        w = set_values(w, [r[0] for r in rows], attrs[ai], [r[1] for r in rows], t)
    return corpus.with_world(w)


def base_only(corpus):
    """The stream's base world alone (its people before any experience, no updates): what
    a validation stream is drawn from when no separate base world is at hand."""
    import dataclasses

    from factlab.world.people import Table
    from factlab.world.versions import Updates

    w = corpus.world
    ids = w.base_ids
    p = w.people
    people = Table([p.names[i] for i in ids], p.pronoun[ids], p.attributes, p.codes[ids],
                   p.pools)
    base = dataclasses.replace(w, people=people, split=w.split[ids], group=w.group[ids],
                               arrival=np.zeros(len(ids), np.int16), updates=Updates.empty())
    return type(corpus)(base, corpus.render, corpus.templates,
                        {k: v for k, v in corpus._cache.items() if k == "bios"})


def kinds_of(corpus) -> list[str]:
    """The kind of every experience of a stream (``cohort``, ``update``)."""
    w = corpus.world
    out = []
    for t in corpus.experiences:
        has_c = bool((w.arrival == t).any())
        has_u = bool((w.updates.experience == t).any())
        out.append("cohort+update" if has_c and has_u else "cohort" if has_c else "update")
    return out


@dataclass
class StreamFacts:
    """The stream's test questions with their labels (one row per question)."""

    qa: object  # factlab.text.qa.QA: answers are the values after the last experience
    label: np.ndarray  # (N,) str, one of LABELS
    experience: np.ndarray  # (N,) int: the column (0 base, j, -1 unknown)
    split: np.ndarray  # (N,) str: train | test | unknown
    stale: list  # (N,) the value before the update (updated facts), else None

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx) -> StreamFacts:
        from factlab.text.qa import QA

        idx = np.asarray(idx, dtype=np.int64)
        q = self.qa
        qa = QA(np.asarray(q.person)[idx], np.asarray(q.attribute)[idx],
                np.asarray(q.template)[idx], [q.question[i] for i in idx.tolist()],
                [q.answer[i] for i in idx.tolist()], q.attributes, q.heldout)
        return StreamFacts(qa, self.label[idx], self.experience[idx], self.split[idx],
                         [self.stale[i] for i in idx.tolist()])

    def records(self) -> list[dict]:
        """One record per question, without predictions (``factlab.continual.metrics``'s
        fields; the evaluator adds ``prediction`` and ``logprob``)."""
        q = self.qa
        return [{"person": int(p), "attribute": q.attributes[int(a)], "question": qs,
                 "answer": ans, "label": str(lab), "experience": int(e), "split": str(s),
                 "stale": st}
                for p, a, qs, ans, lab, e, s, st in zip(
                    np.asarray(q.person).tolist(), np.asarray(q.attribute).tolist(),
                    q.question, q.answer, self.label, self.experience.tolist(), self.split,
                    self.stale)]


def stream_facts(corpus, *, base_people: int | None = None) -> StreamFacts:
    """Every test question of the stream after its last experience T: the base world's
    people (at most ``base_people`` of each split, the first by id, plus every updated
    person), every cohort member
    and every unknown person, each attribute once (canonical question). Unknown people get
    ids after everyone else's (``len(people) + i``)."""
    from factlab.text.qa import QA, qa_pairs

    w = corpus.world
    T = w.last_experience
    tr, te = w.train_ids, w.test_ids
    if base_people is not None:  # every updated person stays in
        tr, te = tr[:base_people], te[:base_people]
    base = np.union1d(np.concatenate([tr, te]), w.updates.person.astype(np.int64))
    people = np.concatenate([base, w.ids()[w.arrival > 0]])
    qa = corpus.qa(people, at=T)
    person = np.asarray(qa.person, dtype=np.int64)
    attr = np.asarray(qa.attribute, dtype=np.int64)
    n = len(person)
    arrival = w.arrival[person].astype(np.int64)
    label = np.where(arrival > 0, "new", "invariant").astype(object)
    experience = arrival.copy()
    stale: list = [None] * n
    u = w.updates
    if len(u):
        key, first = {}, {}
        for row, (p, a) in enumerate(zip(u.person.tolist(), u.attribute.tolist())):
            key[(p, a)] = row  # the last update of (p, a) wins
            first.setdefault((p, a), row)  # the value before the first is the stale one
        pools = w.people.pools
        for i, (p, a) in enumerate(zip(person.tolist(), attr.tolist())):
            r = key.get((p, a))
            if r is None:
                continue
            experience[i] = int(u.experience[r])
            prev = int(u.previous[first[(p, a)]])
            if prev < 0:  # a value the entity had none of before: a new fact
                label[i] = "new"
            else:
                label[i] = "updated"
                stale[i] = pools[a][prev]
    split = np.where(w.split[person] == TEST, "test", "train").astype(object)
    unk = w.unknown
    uq = qa_pairs(unk, np.arange(len(unk)), corpus.templates) if len(unk) else None
    if uq is not None and len(uq):
        m = len(uq)
        qa = QA(np.concatenate([person, np.asarray(uq.person) + len(w.people)]),
                np.concatenate([attr, np.asarray(uq.attribute)]),
                np.concatenate([np.asarray(qa.template), np.asarray(uq.template)]),
                list(qa.question) + list(uq.question), list(qa.answer) + list(uq.answer),
                qa.attributes, False)
        label = np.concatenate([label, np.full(m, "unknown", dtype=object)])
        experience = np.concatenate([experience, np.full(m, -1)])
        split = np.concatenate([split, np.full(m, "unknown", dtype=object)])
        stale = stale + [None] * m
    return StreamFacts(qa, label.astype(str), experience.astype(np.int64), split.astype(str),
                     stale)


def counts(corpus, facts: StreamFacts | None = None) -> dict:
    """Per experience: its kind, the people it adds or updates, the values it changes, and
    the number of test facts of each label in its column."""
    facts = stream_facts(corpus) if facts is None else facts
    w = corpus.world
    rows = []
    for t, kind in zip([0] + corpus.experiences, ["base"] + kinds_of(corpus)):
        col = facts.experience == t
        row = {"experience": t, "kind": kind,
               "people": int((w.arrival == t).sum()),
               "p_train": int(((w.arrival == t) & (w.split == TRAIN)).sum()),
               "p_test": int(((w.arrival == t) & (w.split == TEST)).sum()),
               "updated_values": int((w.updates.experience == t).sum()),
               "updated_people": int(len(np.unique(w.updates.person[w.updates.experience
                                                                    == t]))),
               **{lab: int((col & (facts.label == lab)).sum()) for lab in LABELS[:3]}}
        rows.append(row)
    return {"experiences": rows, "unknown": int((facts.label == "unknown").sum()),
            "total": len(facts)}


def save_stream(corpus, out: str | Path, *, cfg: StreamConfig | None = None,
                base: dict | None = None, files=None, force: bool = False) -> dict:
    """The stream's world directory (base files and ``experiences/T/``) plus
    ``stream.json``: the config, each experience's kind and the base it starts from (a
    trained run cell's model and tokenizer, or a user's model)."""
    from factlab.corpus.store import save_world

    out = Path(out)
    if out.exists() and not (out / STREAM_FILE).is_file() and \
            (out / "manifest.json").is_file() and not force:
        force = True  # a world written by a killed save_stream, without its stream.json
    save_world(corpus, out, force=force)
    meta = {"format": FORMAT, "config": cfg.model_dump(mode="json") if cfg else None,
            "files": [str(Path(f).resolve()) for f in files] if files else None,
            "base": base or {},
            "experiences": [{"t": t, "kind": k}
                            for t, k in zip(corpus.experiences, kinds_of(corpus))]}
    atomic_write_text(out / STREAM_FILE, json.dumps(meta, indent=1) + "\n")
    return meta


def load_stream(path: str | Path):
    """(corpus, stream.json's contents) of a stream directory."""
    from factlab.corpus.store import load_world

    path = Path(path)
    f = path / STREAM_FILE
    if not f.is_file():
        raise FactlabError(f"{path}: not a stream (no {STREAM_FILE}); make one with "
                           f"`factlab stream make`")
    meta = json.loads(f.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise FactlabError(f"{path}: stream format {meta.get('format')}, this factlab reads "
                           f"{FORMAT}")
    return load_world(path), meta
