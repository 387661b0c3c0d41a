"""Continual-learning metrics: pure functions over an accuracy matrix and saved predictions.

Two inputs:

* **The accuracy matrix** ``R``, (T+1) x (T+1), T >= 1. Row ``t`` is measured after training
  on experience ``t`` (row 0: before any training); column ``j`` holds the facts of
  experience ``j`` (column 0: the base world's facts; column j >= 1: the facts introduced or
  updated in experience j). Entries are accuracies in [0, 1]; NaN (or None) means "not
  measured".
* **Prediction records** (dicts with ``person``, ``attribute``, ``question``, ``answer``,
  ``prediction``, ``label``, ``experience``, ``split``, ``stale``, ``logprob``), grouped as
  ``rows``: a mapping t -> the records predicted after experience t, all over the same
  questions. Correctness is always recomputed as ``prediction == completion(answer)``; a
  stored ``correct`` flag is ignored.

NaN policy (matrix metrics): every metric is a mean of per-column (or per-row) terms. A term
that needs a NaN entry is dropped (for the max in :func:`forgetting` only the NaN entries
inside the range are skipped), and the mean is taken over the remaining terms (nanmean). When
no term is defined the metric is ``None``. Values outside [0, 1] are an error.

Everything returns python floats / ints / None / dicts / lists, never numpy scalars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from factlab.errors import FactlabError
from factlab.text.qa import completion

LABELS = ("invariant", "updated", "new", "unknown")
KNOWN_LABELS = ("invariant", "updated", "new")
SPLITS = ("train", "test")


# --------------------------------------------------------------------------- matrix


def _as_matrix(R) -> tuple[np.ndarray, int]:
    """``R`` as a float64 (T+1) x (T+1) array and T; FactlabError if it is not one."""
    try:
        a = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FactlabError(f"accuracy matrix is not numeric: {e}") from None
    if a.ndim != 2:
        raise FactlabError(f"accuracy matrix must be 2-D (T+1 x T+1), got shape {a.shape}")
    if a.shape[0] != a.shape[1]:
        raise FactlabError(f"accuracy matrix must be square (T+1 x T+1), got shape {a.shape}")
    if a.shape[0] < 2:
        raise FactlabError(f"accuracy matrix needs T >= 1 (at least 2 x 2), got shape {a.shape}")
    finite = a[~np.isnan(a)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        bad = np.argwhere(~np.isnan(a) & ((a < 0.0) | (a > 1.0)))[0]
        raise FactlabError(f"accuracy matrix entry R[{bad[0]}, {bad[1]}] = "
                           f"{a[bad[0], bad[1]]} is outside [0, 1]")
    return a, a.shape[0] - 1


def _mean(terms) -> float | None:
    """Mean of the non-NaN terms; None when there is none."""
    vals = [float(x) for x in terms if not math.isnan(float(x))]
    return float(sum(vals) / len(vals)) if vals else None


def average_accuracy(R, include_base: bool = False) -> float | None:
    """Average accuracy A_T = mean_{j=1..T} R[T, j]: the final row over the experiences'
    facts (``include_base``: over j = 0..T, the base world's column too). NaN entries are
    skipped; None if none is measured."""
    a, T = _as_matrix(R)
    return _mean(a[T, (0 if include_base else 1):T + 1])


def _row_average(a: np.ndarray, t: int) -> float | None:
    return _mean(a[t, 1:t + 1])


def average_incremental_accuracy(R) -> float | None:
    """Average incremental accuracy (Rebuffi et al. 2017): mean_{t=1..T} A_t with
    A_t = mean_{j=1..t} R[t, j] (the facts seen so far, base column excluded). NaN entries
    are skipped inside A_t; an A_t with no measured entry is dropped; None if all are."""
    a, T = _as_matrix(R)
    return _mean([x for x in (_row_average(a, t) for t in range(1, T + 1)) if x is not None])


def learning_accuracy(R) -> float | None:
    """Learning accuracy (Riemer et al. 2019): mean_{i=1..T} R[i, i], the accuracy on each
    experience's facts just after learning them (the diagonal without R[0, 0])."""
    a, T = _as_matrix(R)
    return _mean([a[i, i] for i in range(1, T + 1)])


def forgetting(R) -> float | None:
    """Average forgetting (Chaudhry et al. 2018, "Riemannian Walk"):
    mean_{j=1..T-1} ( max_{l in j..T-1} R[l, j] - R[T, j] ). The max starts at the row where
    experience j was learned (rows before it do not count) and stops before the last row.
    Can be negative when accuracy rises after the peak. None when T = 1. NaN entries inside
    the max are skipped; a term whose max range is all NaN or whose R[T, j] is NaN is
    dropped."""
    a, T = _as_matrix(R)
    if T == 1:
        return None
    terms = []
    for j in range(1, T):
        seen = a[j:T, j]
        seen = seen[~np.isnan(seen)]
        if seen.size == 0 or math.isnan(a[T, j]):
            continue
        terms.append(float(seen.max()) - float(a[T, j]))
    return _mean(terms)


def base_forgetting(R) -> float | None:
    """Forgetting of the base world (column 0): max_{l in 0..T-1} R[l, 0] - R[T, 0], row 0
    (what the base model knew) included. NaN entries inside the max are skipped; None if
    the range is all NaN or R[T, 0] is NaN."""
    a, T = _as_matrix(R)
    seen = a[0:T, 0]
    seen = seen[~np.isnan(seen)]
    if seen.size == 0 or math.isnan(a[T, 0]):
        return None
    return float(seen.max()) - float(a[T, 0])


def bwt(R) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato 2017, GEM):
    mean_{j=1..T-1} ( R[T, j] - R[j, j] ); the last experience (j = T) and the base column are
    excluded. Negative = forgetting. None when T = 1. Terms with a NaN entry are dropped."""
    a, T = _as_matrix(R)
    if T == 1:
        return None
    return _mean([a[T, j] - a[j, j] for j in range(1, T)])


def fwt(R) -> float | None:
    """Forward transfer (Lopez-Paz & Ranzato 2017, GEM, with row 0 as the baseline b_j):
    mean_{j=2..T} ( R[j-1, j] - R[0, j] ): how well experience j's facts are answered just
    before learning them, above the untrained-on baseline. When experience j is about new
    i.i.d. people this is ~0 by construction (nothing earlier can tell their values). None
    when T = 1. Terms with a NaN entry are dropped."""
    a, T = _as_matrix(R)
    if T == 1:
        return None
    return _mean([a[j - 1, j] - a[0, j] for j in range(2, T + 1)])


def matrix_summary(R) -> dict:
    """All the matrix metrics in one dict: ``T``, ``average_accuracy``,
    ``average_accuracy_with_base``, ``average_incremental_accuracy``, ``learning_accuracy``,
    ``forgetting``, ``base_forgetting``, ``bwt``, ``fwt``."""
    _, T = _as_matrix(R)
    return {
        "T": T,
        "average_accuracy": average_accuracy(R),
        "average_accuracy_with_base": average_accuracy(R, include_base=True),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "learning_accuracy": learning_accuracy(R),
        "forgetting": forgetting(R),
        "base_forgetting": base_forgetting(R),
        "bwt": bwt(R),
        "fwt": fwt(R),
    }


# --------------------------------------------------------------------------- records


def _field(rec, key: str, i: int):
    if not isinstance(rec, Mapping):
        raise FactlabError(f"record {i} is not a dict: {type(rec).__name__}")
    if key not in rec:
        raise FactlabError(f"record {i} has no {key!r} key")
    return rec[key]


def _text(rec, key: str, i: int) -> str:
    v = _field(rec, key, i)
    if not isinstance(v, str):
        raise FactlabError(f"record {i}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _label(rec, i: int) -> str:
    v = _field(rec, "label", i)
    if v not in LABELS:
        raise FactlabError(f"record {i}: unknown label {v!r} (expected one of {', '.join(LABELS)})")
    return v


def _is_correct(rec, i: int) -> bool:
    return _text(rec, "prediction", i) == completion(_text(rec, "answer", i))


def _is_stale(rec, i: int) -> bool:
    stale = _field(rec, "stale", i)
    if stale is None:
        return False
    if not isinstance(stale, str):
        raise FactlabError(f"record {i}: 'stale' must be a string or None, "
                           f"got {type(stale).__name__}")
    return _text(rec, "prediction", i) == completion(stale)


def correct(records) -> np.ndarray:
    """Exact match per record, recomputed: ``prediction == completion(answer)`` (i.e.
    ``" " + answer``). Any stored ``correct`` flag is ignored. Returns a bool array."""
    return np.array([_is_correct(r, i) for i, r in enumerate(records)], dtype=bool)


def is_stale(records) -> np.ndarray:
    """Per record: ``prediction == completion(stale)`` (the model still gives the value from
    before the update); False where ``stale`` is None. Returns a bool array."""
    return np.array([_is_stale(r, i) for i, r in enumerate(records)], dtype=bool)


def _rows(rows, T) -> dict[int, list]:
    """``rows`` (mapping t -> records, or a list indexed by t) checked and aligned: every row
    holds the same questions, reordered like the first row present."""
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise FactlabError(f"T must be an integer >= 1, got {T!r}")
    T = int(T)
    if isinstance(rows, Mapping):
        items = list(rows.items())
    elif isinstance(rows, (list, tuple)):
        items = list(enumerate(rows))
    else:
        raise FactlabError(f"rows must map experience t -> records, got {type(rows).__name__}")
    if not items:
        raise FactlabError("no rows of predictions given")
    out: dict[int, list] = {}
    for t, recs in items:
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t <= T:
            raise FactlabError(f"row {t!r} is not an experience in 0..T={T}")
        recs = list(recs)
        if not recs:
            raise FactlabError(f"rows[{t}] has no records")
        out[int(t)] = recs

    def keys(recs):
        seen: dict[tuple, int] = {}
        ks = []
        for i, r in enumerate(recs):
            base = (_field(r, "person", i), _text(r, "attribute", i), _label(r, i),
                    _text(r, "question", i))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ks.append((base, n))  # the n-th record with that key: duplicates pair in order
        return ks

    def name(k):
        (person, attr, label, question), n = k
        dup = f" (copy {n + 1})" if n else ""
        return f"person {person!r}, attribute {attr!r}, label {label!r}, question {question!r}{dup}"

    ts = sorted(out)
    ref_t = ts[0]
    ref = keys(out[ref_t])
    pos = {k: i for i, k in enumerate(ref)}
    for t in ts[1:]:
        ks = keys(out[t])
        here = set(ks)
        for k in ref:
            if k not in here:
                raise FactlabError(f"rows[{t}] does not match rows[{ref_t}]: {name(k)} "
                                   f"is missing from rows[{t}]")
        for k in ks:
            if k not in pos:
                raise FactlabError(f"rows[{t}] does not match rows[{ref_t}]: {name(k)} "
                                   f"is not in rows[{ref_t}]")
        order = [None] * len(ref)
        for r, k in zip(out[t], ks):
            order[pos[k]] = r
        out[t] = order
    return out


def r_matrix(rows, T, split=None) -> np.ndarray:
    """The (T+1) x (T+1) accuracy matrix from prediction records: R[t, j] = exact-match
    accuracy of the records in ``rows[t]`` with label invariant/updated/new and
    ``experience == j`` (only ``split`` = "train" (ID) or "test" (OOD) records if given).
    Label "unknown" records never count. NaN where no record qualifies; rows t absent from
    ``rows`` are NaN rows. An update column's gold is the new value, so R[0, j] there is the
    rate at which the old model already gives the new value."""
    if split is not None and split not in SPLITS:
        raise FactlabError(f"unknown split {split!r} (expected 'train', 'test' or None)")
    aligned = _rows(rows, T)
    T = int(T)
    R = np.full((T + 1, T + 1), np.nan)
    for t, recs in aligned.items():
        hits = np.zeros(T + 1)
        counts = np.zeros(T + 1)
        for i, r in enumerate(recs):
            if _label(r, i) == "unknown":
                continue
            if split is not None and _field(r, "split", i) != split:
                continue
            j = _field(r, "experience", i)
            if not isinstance(j, (int, np.integer)) or isinstance(j, bool) or not 0 <= j <= T:
                raise FactlabError(f"rows[{t}] record {i}: experience {j!r} is outside 0..T={T} "
                                   f"for label {r['label']!r}")
            counts[j] += 1
            hits[j] += _is_correct(r, i)
        has = counts > 0
        R[t, has] = hits[has] / counts[has]
    return R


def _rate(mask: np.ndarray, sel: np.ndarray) -> float | None:
    n = int(sel.sum())
    return float(mask[sel].sum() / n) if n else None


def ckl(rows, T) -> dict:
    """Update metrics of CKL (Jang et al. 2022, "Towards Continual Knowledge Learning"),
    comparing row 0 (before training) with row T (after the last experience):

    * ``invariant_retention`` / ``invariant_before``: accuracy on label invariant at T / at 0;
    * ``update_success``: accuracy at T on label updated (gold = the new value);
    * ``stale_rate`` / ``stale_before``: share of updated records predicting the old value at
      T / at 0 (at 0 ~ the old model's accuracy on those facts);
    * ``new_acquisition``: accuracy at T on label new;
    * counts ``forgotten`` (invariant, right at 0 and wrong at T), ``updated`` (updated,
      right at T and not at 0), ``acquired`` (new, right at T and not at 0);
    * ``fuar`` = forgotten / (updated + acquired), lower is better; None when the
      denominator is 0, with ``fuar_note`` saying why (``fuar_note`` is None otherwise);
    * ``n_invariant``, ``n_updated``, ``n_new``, ``n_unknown``.

    Rates over no record are None. Both rows 0 and T must be present."""
    aligned = _rows(rows, T)
    T = int(T)
    for t in (0, T):
        if t not in aligned:
            raise FactlabError(f"CKL needs rows 0 and T={T}; rows[{t}] is missing")
    before, after = aligned[0], aligned[T]
    labels = np.array([_label(r, i) for i, r in enumerate(after)])
    c0, cT = correct(before), correct(after)
    s0, sT = is_stale(before), is_stale(after)
    inv, upd, new = labels == "invariant", labels == "updated", labels == "new"
    forgotten = int((inv & c0 & ~cT).sum())
    n_updated = int((upd & cT & ~c0).sum())
    acquired = int((new & cT & ~c0).sum())
    denom = n_updated + acquired
    if denom:
        fuar, note = forgotten / denom, None
    else:
        fuar = None
        note = ("undefined: nothing updated or acquired"
                + (" (and nothing forgotten)" if forgotten == 0 else f" ({forgotten} forgotten)"))
    return {
        "invariant_retention": _rate(cT, inv),
        "invariant_before": _rate(c0, inv),
        "update_success": _rate(cT, upd),
        "stale_rate": _rate(sT, upd),
        "stale_before": _rate(s0, upd),
        "new_acquisition": _rate(cT, new),
        "forgotten": forgotten,
        "updated": n_updated,
        "acquired": acquired,
        "fuar": None if fuar is None else float(fuar),
        "fuar_note": note,
        "n_invariant": int(inv.sum()),
        "n_updated": int(upd.sum()),
        "n_new": int(new.sum()),
        "n_unknown": int((labels == "unknown").sum()),
    }


# --------------------------------------------------------------------------- hallucination


def _scores(xs, what: str) -> np.ndarray:
    try:
        a = np.array(list(xs), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FactlabError(f"{what} scores are not numeric: {e}") from None
    if a.ndim != 1:
        raise FactlabError(f"{what} scores must be a flat list, got shape {a.shape}")
    if np.isnan(a).any():
        raise FactlabError(f"{what} scores contain NaN (at index {int(np.argmax(np.isnan(a)))})")
    return a


def auroc(pos_scores, neg_scores) -> float | None:
    """AUROC as the Mann-Whitney statistic: P(a random positive scores above a random
    negative), ties counting 1/2. Computed from mid-ranks of the pooled scores (O(n log n)):
    (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg). None if either side is
    empty; NaN scores are an error."""
    p, n = _scores(pos_scores, "positive"), _scores(neg_scores, "negative")
    if p.size == 0 or n.size == 0:
        return None
    pooled = np.concatenate([p, n])
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # 1-based rank of the last element of each tie group
    midrank = upper - (counts - 1) / 2.0
    ranks = midrank[inverse.reshape(-1)]
    u = ranks[:p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * n.size))


def choose_threshold(known_scores, unknown_scores) -> float:
    """The confidence threshold tau, chosen on validation data: among the candidate values
    (the distinct scores of both sides), the tau maximising the balanced accuracy
    (TPR + TNR) / 2 of the rule "confident iff score >= tau", known = positives, unknown =
    negatives. Ties are broken by the SMALLEST such tau (the most permissive rule with the
    best balanced accuracy); the comparison is exact (integer counts). Both sides must be
    non-empty."""
    k, u = _scores(known_scores, "known"), _scores(unknown_scores, "unknown")
    if k.size == 0 or u.size == 0:
        raise FactlabError(f"choose_threshold needs known and unknown scores "
                           f"(got {k.size} known, {u.size} unknown)")
    cand = np.unique(np.concatenate([k, u]))  # ascending
    ks, us = np.sort(k), np.sort(u)
    tp = k.size - np.searchsorted(ks, cand, side="left")  # known with score >= tau
    tn = np.searchsorted(us, cand, side="left")  # unknown with score < tau
    # 2 * n_k * n_u * balanced accuracy, an exact integer: ties compare exactly
    score = tp.astype(np.int64) * u.size + tn.astype(np.int64) * k.size
    return float(cand[int(np.argmax(score))])  # argmax: first (smallest tau) of the maxima


def confident_rate(scores, threshold) -> float | None:
    """Share of scores >= threshold; None for no scores."""
    s = _scores(scores, "confidence")
    if s.size == 0:
        return None
    return float((s >= float(threshold)).mean())


def _strip_one(prediction: str) -> str:
    return prediction[1:] if prediction.startswith(" ") else prediction


def contamination(records, values_by_attribute, pool_by_attribute=None) -> dict:
    """Contamination of wrong answers by other people's facts.

    Wrong answers: records with ``prediction != completion(answer)`` and a prediction that
    is not empty (nor only whitespace). A wrong answer is *contaminated* when its prediction,
    one leading space dropped, is a value of that attribute held by some person other than
    the record's own: ``values_by_attribute[attribute][value]`` is the set (any iterable) of
    person ids holding ``value``.

    ``chance``: for each wrong answer, the share of the distinct values in
    ``pool_by_attribute[attribute]`` (a list) other than the record's gold that are held by
    some other person (per ``values_by_attribute``), averaged over the wrong answers whose
    pool has such a value: the contamination rate of a guess drawn uniformly from the pool.
    None when ``pool_by_attribute`` is not given or no wrong answer has a pool.

    Returns ``{"rate", "chance", "n_wrong", "n_contaminated"}``; ``rate`` is None when
    ``n_wrong`` is 0."""
    if not isinstance(values_by_attribute, Mapping):
        raise FactlabError("values_by_attribute must map attribute -> {value: person ids}")
    holders_cache: dict[str, dict] = {}

    def holders(attr):
        if attr not in holders_cache:
            if attr not in values_by_attribute:
                raise FactlabError(f"attribute {attr!r} is not in values_by_attribute")
            holders_cache[attr] = {v: frozenset(ps) for v, ps in values_by_attribute[attr].items()}
        return holders_cache[attr]

    def held_by_other(attr, value, person):
        ps = holders(attr).get(value)
        return bool(ps) and bool(ps - {person})

    n_wrong = n_cont = 0
    chances = []
    for i, r in enumerate(records):
        if _is_correct(r, i):
            continue
        pred = _text(r, "prediction", i)
        if not pred.strip():
            continue
        attr, person = _text(r, "attribute", i), _field(r, "person", i)
        n_wrong += 1
        n_cont += held_by_other(attr, _strip_one(pred), person)
        if pool_by_attribute is not None:
            if attr not in pool_by_attribute:
                raise FactlabError(f"attribute {attr!r} is not in pool_by_attribute")
            gold = _text(r, "answer", i)
            others = {v for v in pool_by_attribute[attr] if v != gold}
            if others:
                chances.append(sum(held_by_other(attr, v, person) for v in others) / len(others))
    return {
        "rate": float(n_cont / n_wrong) if n_wrong else None,
        "chance": float(sum(chances) / len(chances)) if chances else None,
        "n_wrong": n_wrong,
        "n_contaminated": n_cont,
    }


def _logprobs(records, what: str, unknown: bool) -> np.ndarray:
    out = []
    for i, r in enumerate(records):
        lab = _label(r, i)
        if (lab == "unknown") != unknown:
            raise FactlabError(f"{what} record {i} has label {lab!r}; expected "
                               + ("'unknown'" if unknown else "a known label (not 'unknown')"))
        lp = _field(r, "logprob", i)
        if lp is None or isinstance(lp, bool) or not isinstance(lp, (int, float, np.floating)) \
                or math.isnan(float(lp)):
            raise FactlabError(f"{what} record {i} has no usable logprob: {lp!r}")
        out.append(float(lp))
    return np.array(out, dtype=np.float64)


def hallucination(known_records_val, unknown_records_val, known_records, unknown_records) -> dict:
    """Confident answers about unknown people, thresholded on the model's confidence.

    Positives are ALL records of known people (labels invariant/updated/new, right or wrong),
    negatives the records of unknown people (label unknown); the score is ``logprob``. The
    threshold tau = :func:`choose_threshold` on the validation pair; then on the test pair:
    ``confident_unknown_rate`` (share of unknown records with logprob >= tau: confident
    hallucinations), ``confident_known_rate``, ``auroc`` (known vs unknown by logprob) and
    ``threshold``. A record with logprob None (or NaN) is an error, as is a record on the
    wrong side."""
    kv = _logprobs(known_records_val, "validation known", unknown=False)
    uv = _logprobs(unknown_records_val, "validation unknown", unknown=True)
    kt = _logprobs(known_records, "test known", unknown=False)
    ut = _logprobs(unknown_records, "test unknown", unknown=True)
    tau = choose_threshold(kv, uv)
    return {
        "threshold": tau,
        "confident_unknown_rate": confident_rate(ut, tau),
        "confident_known_rate": confident_rate(kt, tau),
        "auroc": auroc(kt, ut),
        "n_known": int(kt.size),
        "n_unknown": int(ut.size),
    }


# --------------------------------------------------------------------------- summary


def _jsonable_matrix(R: np.ndarray) -> list:
    return [[None if math.isnan(x) else float(x) for x in row] for row in R.tolist()]


def summary(rows, T, values_by_attribute=None, pool_by_attribute=None) -> dict:
    """Everything in one JSON-serialisable dict (no numpy types, NaN written as None):

    * ``T``; ``matrix`` (:func:`r_matrix`, all splits), ``matrix_id`` (split "train": QA
      trained on) and ``matrix_ood`` (split "test"), as nested lists;
    * ``matrix_summary``, ``matrix_summary_id``, ``matrix_summary_ood``
      (:func:`matrix_summary` of each);
    * ``ckl`` (:func:`ckl`);
    * ``hallucination``: None when row T has no unknown record; else :func:`hallucination`
      on row T with people split by id parity: EVEN person ids are the validation half (the
      threshold is chosen on them), ODD ids the test half, for known and unknown people
      alike. If a validation side is empty it is None and ``hallucination_note`` says why;
    * ``contamination``: :func:`contamination` over row T's records of labels
      invariant/updated/new (their wrong answers), when ``values_by_attribute`` is given;
      else None.
    """
    aligned = _rows(rows, T)
    T = int(T)
    out: dict = {"T": T}
    for key, split in (("", None), ("_id", "train"), ("_ood", "test")):
        R = r_matrix(aligned, T, split=split)
        out["matrix" + key] = _jsonable_matrix(R)
        out["matrix_summary" + key] = matrix_summary(R)
    out["ckl"] = ckl(aligned, T)

    hall, note = None, None
    last = aligned.get(T)
    if last is not None:
        def parity(recs, even):
            return [r for i, r in enumerate(recs) if (int(_field(r, "person", i)) % 2 == 0) == even]

        known = [r for i, r in enumerate(last) if _label(r, i) != "unknown"]
        unknown = [r for i, r in enumerate(last) if _label(r, i) == "unknown"]
        if unknown:
            kv, uv = parity(known, True), parity(unknown, True)
            if not kv or not uv:
                note = (f"no threshold: the validation half (even person ids) has {len(kv)} "
                        f"known and {len(uv)} unknown records")
            else:
                hall = hallucination(kv, uv, parity(known, False), parity(unknown, False))
    out["hallucination"] = hall
    out["hallucination_note"] = note

    cont = None
    if values_by_attribute is not None and last is not None:
        known = [r for i, r in enumerate(last) if _label(r, i) != "unknown"]
        cont = contamination(known, values_by_attribute, pool_by_attribute)
    out["contamination"] = cont
    return out
