"""A shipped set of general-knowledge questions (capitals, languages, authors, science and
geography; ``data/general_knowledge.jsonl``) for a pretrained model that has no world of
factlab's: what it knew before a write, asked again after it.

A pretrained instruct model answers in sentences ("The capital of France is Paris."), so
the set is scored by containment (:func:`contains_answer`: the gold answer appears in the
greedy completion, case-insensitively) and by whether the whole completion is unchanged;
exact match, the rule for factlab's own worlds, would call every such answer wrong.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

# greedy tokens per answer: enough for a one-sentence answer that names the value
ANSWER_TOKENS = 24


def general_knowledge(cap: int | None = None):
    """The shipped questions as a :class:`factlab.text.qa.QA` (attribute = topic), the
    first ``cap`` of them when given."""
    from factlab.text.qa import QA

    text = resources.files("factlab.evaluate").joinpath(
        "data", "general_knowledge.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()][:cap]
    topics = tuple(dict.fromkeys(r["topic"] for r in rows))
    return QA(person=np.arange(len(rows), dtype=np.int32),
              attribute=np.array([topics.index(r["topic"]) for r in rows], np.int16),
              template=np.zeros(len(rows), np.int16), question=[r["question"] for r in rows],
              answer=[r["answer"] for r in rows], attributes=topics, heldout=False)


def contains_answer(prediction: str, answer: str) -> bool:
    """The answer (case-insensitive, a leading "the " dropped) appears in the prediction."""
    a = answer.strip().lower()
    a = a[4:] if a.startswith("the ") else a
    return bool(a) and a in prediction.lower()
