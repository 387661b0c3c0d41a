"""Editing and memory metrics (EasyEdit's names), pure functions over saved predictions.

Generation-based first: a prediction is the greedy completion up to EOS, right only when it
equals the answer exactly. Reliability (the trained question) and generalization
(paraphrases of it) are ``exact_match`` of their predictions; ``locality`` (the fraction of unrelated prompts whose answer is
unchanged from the one recorded **before** any write) read predictions; teacher-forced
numbers come from ``factlab.evaluate.score`` and are reported beside, labelled.
"""

from __future__ import annotations

import numpy as np


def exact_match(predictions, answers) -> float:
    """Fraction of predictions equal to their answer (both stripped of outer spaces)."""
    p, a = list(predictions), list(answers)
    if len(p) != len(a):
        raise ValueError(f"{len(p)} predictions for {len(a)} answers")
    return float(np.mean([x.strip() == y.strip() for x, y in zip(p, a)])) if p else float("nan")



def locality(before, after) -> float:
    """Fraction of prompts whose prediction is the same before and after the writes."""
    b, a = list(before), list(after)
    if len(b) != len(a):
        raise ValueError(f"{len(b)} predictions before, {len(a)} after")
    return float(np.mean([x == y for x, y in zip(b, a)])) if b else float("nan")


def token_agreement(before, after) -> float:
    """Teacher-forced locality (EasyEdit's): each prompt is followed by one fixed
    continuation (here the backbone's own answer before the write) and read by both models;
    per prompt, the share of continuation positions whose argmax token is the same after as
    before; the mean over prompts. ``before[i]`` / ``after[i]``: the argmax ids of prompt i
    (``factlab.evaluate.score.Scores.argmax``)."""
    b, a = list(before), list(after)
    if len(b) != len(a):
        raise ValueError(f"{len(b)} prompts before, {len(a)} after")
    rates = []
    for x, y in zip(b, a):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ValueError(f"a continuation of {len(x)} positions before, {len(y)} after")
        rates.append(float(np.mean(x == y)) if len(x) else 1.0)
    return float(np.mean(rates)) if rates else float("nan")


def unknown_hallucination(predictions, stored_values, abstain: str = "unknown") -> dict:
    """On questions about entities never stored: how often the model answers at all
    (anything but an empty string or ``abstain``), and how often its answer is one of the
    stored values (another entity's fact, the memory leaking)."""
    p = [x.strip() for x in predictions]
    vals = {v.strip() for v in stored_values}
    answered = [x not in ("", abstain) for x in p]
    return {"answered": float(np.mean(answered)) if p else float("nan"),
            "stored_value": float(np.mean([x in vals for x in p])) if p else float("nan")}


def auroc(positive, negative) -> float:
    """Area under the ROC curve of a score separating ``positive`` (stored) from
    ``negative`` (never stored): the probability that a random positive scores above a
    random negative, ties counting half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def slot_sharing(slots_per_fact) -> dict:
    """``slots_per_fact``: for each fact, the set of slot ids it reads. How many slots are
    used, by how many facts each, and how many facts share at least one slot with another."""
    count: dict[int, int] = {}
    for s in slots_per_fact:
        for x in set(s):
            count[x] = count.get(x, 0) + 1
    if not count:
        return {"slots_used": 0, "facts_per_slot_mean": 0.0, "facts_per_slot_max": 0,
                "shared_slots": 0, "facts_sharing": 0}
    c = np.fromiter(count.values(), dtype=np.int64)
    sharing = sum(any(count[x] > 1 for x in set(s)) for s in slots_per_fact)
    return {"slots_used": int(len(c)), "facts_per_slot_mean": float(c.mean()),
            "facts_per_slot_max": int(c.max()), "shared_slots": int((c > 1).sum()),
            "facts_sharing": int(sharing)}


def recall_by_nll(max_nll, correct, edges=(0.01, 0.05, 0.1, 0.3, 0.693, 1.0, 2.0, np.inf)
                  ) -> list[dict]:
    """Greedy recall in bins of the fact's max-token NLL (the "a fact is recalled only once
    its loss is near zero" curve)."""
    x, y = np.asarray(max_nll, np.float64), np.asarray(correct, bool)
    rows, lo = [], 0.0
    for hi in edges:
        sel = (x >= lo) & (x < hi)
        rows.append({"nll_from": lo, "nll_to": float(hi), "facts": int(sel.sum()),
                     "recall": float(y[sel].mean()) if sel.any() else None})
        lo = hi
    return rows


def reliable_below(max_nll, correct, level: float = 0.99) -> float | None:
    """The largest max-token NLL t such that facts with NLL < t are recalled at >= ``level``
    (None when even the lowest-loss facts are not)."""
    x, y = np.asarray(max_nll, np.float64), np.asarray(correct, bool)
    order = x.argsort()
    xs, ys = x[order], y[order]
    run = np.cumsum(ys) / np.arange(1, len(ys) + 1)
    ok = np.flatnonzero(run >= level)
    if not len(ok):
        return None
    # the longest prefix (by loss) that keeps the level
    k = int(ok.max())
    return float(xs[k + 1]) if k + 1 < len(xs) else float("inf")
