"""QA pairs: the six canonical questions (trained and evaluated), held-out paraphrases
(never trained on), and the leakage guard that keeps P_test questions out of training.

Text format shared by training and evaluation: the prompt is ``"{question}\\nAnswer:"``
and the completion ``" {answer}"`` followed by EOS; exact match compares the whole value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factlab.errors import FactlabError
from factlab.io import jstr
from factlab.text.templates import TemplateSet

PROMPT = "{question}\nAnswer:"


def prompt(question: str) -> str:
    return PROMPT.format(question=question)


def completion(answer: str) -> str:
    return " " + answer


@dataclass
class QA:
    """Question/answer pairs, columnar, person-major."""

    person: np.ndarray  # (Q,) int32 index into the people table
    attribute: np.ndarray  # (Q,) int16 index into ``attributes``
    template: np.ndarray  # (Q,) int16: 0 for the canonical question, i for paraphrase i
    question: list[str]
    answer: list[str]
    attributes: tuple[str, ...]
    heldout: bool  # paraphrases: for generalisation tests only, never for training

    def __len__(self) -> int:
        return len(self.question)

    def join(self, other: QA) -> QA:
        """These pairs then ``other``'s; the attribute list is the union (``other``'s
        indices renumbered into it), so forward and inverse questions can be joined."""
        attrs = tuple(self.attributes) + tuple(a for a in other.attributes
                                               if a not in self.attributes)
        remap = np.array([attrs.index(a) for a in other.attributes] or [0], dtype=np.int64)
        oa = remap[np.asarray(other.attribute, dtype=np.int64)] if len(other) else \
            np.zeros(0, np.int64)
        return QA(np.concatenate([self.person, other.person]).astype(np.int32),
                  np.concatenate([np.asarray(self.attribute, np.int64), oa]).astype(np.int16),
                  np.concatenate([self.template, other.template]).astype(np.int16),
                  list(self.question) + list(other.question),
                  list(self.answer) + list(other.answer), attrs,
                  self.heldout and other.heldout)

    def records(self, split=None, names=None):
        for i, (q, a) in enumerate(zip(self.question, self.answer)):
            p = int(self.person[i])
            rec = {"person": p}
            if names is not None:
                rec["name"] = names[p]
            if split is not None:
                rec["split"] = "test" if split[p] else "train"
            rec["attribute"] = self.attributes[int(self.attribute[i])]
            rec["template"] = int(self.template[i])
            rec["question"] = q
            rec["answer"] = a
            yield rec


    def jsonl(self, split=None, names=None):
        """The same lines as ``dumps(record)`` for each of :meth:`records`, built directly."""
        attrs = [jstr(a) for a in self.attributes]
        tags = ['"train"', '"test"']
        answers: dict[str, str] = {}  # values repeat: encode each once
        head = ""
        last = -1
        for p, a, t, q, ans in zip(self.person.tolist(), self.attribute.tolist(),
                                   self.template.tolist(), self.question, self.answer):
            if p != last:  # rows are person-major: the per-person prefix changes rarely
                name = f'"name":{jstr(names[p])},' if names is not None else ""
                sp = f'"split":{tags[int(split[p] != 0)]},' if split is not None else ""
                head, last = f'{{"person":{p},{name}{sp}"attribute":', p
            enc = answers.get(ans)
            if enc is None:
                enc = answers[ans] = jstr(ans)
            yield f'{head}{attrs[a]},"template":{t},"question":{jstr(q)},"answer":{enc}}}'


def qa_pairs(table, ids, templates: TemplateSet, *, paraphrase: bool = False,
             g: np.random.Generator | None = None) -> QA:
    """Questions about people ``ids`` for every attribute they have a value for.

    ``paraphrase``: the held-out phrasings instead of the canonical question — all of them,
    or with ``g`` one drawn per (person, attribute).
    """
    ids = np.asarray(ids, dtype=np.int64)
    attrs = table.attributes
    forms = []  # (attribute, template index, prefix, suffix)
    for a, attr in enumerate(attrs):
        qs = templates.paraphrases.get(attr, []) if paraphrase else [templates.question[attr]]
        for t, q in enumerate(qs):
            pre, suf = q.split("{name}")
            forms.append((a, t + 1 if paraphrase else 0, pre, suf))
    codes = table.codes[ids]  # (n, A)
    names = [table.names[i] for i in ids.tolist()]
    has = codes >= 0
    # keep[i, f]: person i has the attribute asked by form f
    fa = np.array([f[0] for f in forms], dtype=np.int64)
    keep = has[:, fa] if len(forms) else np.zeros((len(ids), 0), bool)
    question = [pre + nm + suf for nm in names for (_, _, pre, suf) in forms]
    code_rows = codes.tolist()
    pools = table.pools
    answer = [pools[a][row[a]] if row[a] >= 0 else "" for row in code_rows for (a, _, _, _) in forms]
    person = np.repeat(ids, len(forms)).astype(np.int32)
    attribute = np.tile(fa, len(ids)).astype(np.int16)
    template = np.tile(np.array([f[1] for f in forms], dtype=np.int16), len(ids))
    if paraphrase and g is not None and len(forms):
        # one held-out phrasing per (person, attribute), drawn uniformly
        n_par = np.bincount(fa, minlength=len(attrs))
        pick = (g.random((len(ids), len(attrs))) * n_par).astype(np.int64) + 1
        keep = keep & (pick[:, fa] == np.array([f[1] for f in forms])[None, :])
    flat = keep.reshape(-1)
    if not flat.all():
        idx = np.flatnonzero(flat).tolist()
        question = [question[i] for i in idx]
        answer = [answer[i] for i in idx]
        person, attribute, template = person[flat], attribute[flat], template[flat]
    return QA(person, attribute, template, question, answer, attrs, paraphrase)


# Inverse search (Part 3.2): every attribute of a person given, the full name asked. The
# question's order is the canonical bio order; a bio written name-first ("Anya ... was
# born on ...") stores name -> attributes, which this question runs backwards.
INVERSE = "name"  # the answer's attribute label in a QA of inverse questions
INVERSE_BIOS = ("Who was born on {birth_date} in {birth_city}, studied {major} at "
                "{university}, and worked for {employer} in {company_city}?")


def inverse_pairs(table, ids) -> QA:
    """Inverse-search questions about people ``ids`` of a bioS table: all six values
    given, the full name asked (attribute ``"name"``, template 0)."""
    missing = [a for a in ("birth_date", "birth_city", "major", "university", "employer",
                           "company_city") if a not in table.attributes]
    if missing:
        raise FactlabError(f"inverse search needs the six bioS attributes; this world lacks "
                           f"{', '.join(missing)}")
    ids = np.asarray(ids, dtype=np.int64)
    codes = table.codes[ids]
    col = {a: i for i, a in enumerate(table.attributes)}
    question, keep = [], []
    for row in codes.tolist():
        ok = all(row[col[a]] >= 0 for a in col)
        keep.append(ok)
        if ok:
            question.append(INVERSE_BIOS.format(
                **{a: table.pools[i][row[i]] for a, i in col.items()}))
    ids = ids[np.asarray(keep, dtype=bool)] if len(ids) else ids
    n = len(ids)
    return QA(ids.astype(np.int32), np.zeros(n, np.int16), np.zeros(n, np.int16), question,
              [table.names[i] for i in ids.tolist()], (INVERSE,), False)


QUESTIONS = ("forward", "inverse")  # kinds of question a cell trains on and is asked


def check_no_leak(world, people) -> None:
    """Fail loudly if ``people`` contains anyone from P_test (or an unknown index)."""
    people = np.asarray(people, dtype=np.int64)
    if len(people) and (people.min() < 0 or people.max() >= len(world.people)):
        raise FactlabError("training set names a person outside the world")
    leaked = people[world.split[people] != 0]
    if len(leaked):
        raise FactlabError(
            f"leakage: the training set would contain QA of {len(leaked)} P_test people "
            f"(e.g. {world.people.names[int(leaked[0])]!r}); P_test questions are for "
            f"evaluation only")


def training_qa(world, people=None, *, at: int = 0, kinds=("forward",)) -> QA:
    """The only way to get QA for training: canonical questions of P_train people (default:
    the base world's), answered with their values after experience ``at``. ``world`` is a
    :class:`~factlab.corpus.Corpus` (a world with its templates). ``kinds``: forward
    (attribute of a named person), inverse (the person of given attributes), or both."""
    ids = world.train_ids if people is None else np.asarray(people)
    check_no_leak(world, ids)
    bad = [k for k in kinds if k not in QUESTIONS]
    if bad or not kinds:
        raise FactlabError(f"question kinds {list(kinds)}: choose from {', '.join(QUESTIONS)}")
    out = None
    for k in kinds:
        qa = qa_pairs(world.table_at(at), ids, world.templates, paraphrase=False) \
            if k == "forward" else inverse_pairs(world.table_at(at), ids)
        out = qa if out is None else out.join(qa)
    return out
