"""QA and first-token metrics.

Everything except :func:`first_token_accuracy` is a pure function of predictions, so any
number in a report can be recomputed from a saved predictions file
(:func:`metrics_from_predictions`) without the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from factlab.errors import FactlabError


def exact_match(predictions: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """``predictions[i] == golds[i]`` as a bool array: the whole string, nothing stripped.

    Both sides are completions as generated (``" " + answer``, EOS removed), so a prefix
    of the answer and an answer followed by more text are both wrong.
    """
    if len(predictions) != len(golds):
        raise FactlabError(f"exact_match: {len(predictions)} predictions for {len(golds)} golds")
    return np.fromiter((p == g for p, g in zip(predictions, golds)), dtype=bool,
                       count=len(golds))


def accuracy_by_attribute(correct, attributes: Sequence[str]) -> dict[str, float]:
    """Mean of ``correct`` per attribute, attributes in order of first appearance."""
    correct = np.asarray(correct, dtype=bool)
    if len(correct) != len(attributes):
        raise FactlabError(f"accuracy_by_attribute: {len(correct)} flags for "
                           f"{len(attributes)} attributes")
    names, first, inverse = np.unique(np.asarray(attributes, dtype=object).astype(str),
                                      return_index=True, return_inverse=True)
    hits = np.bincount(inverse, weights=correct, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    return {str(names[k]): float(hits[k] / counts[k]) for k in np.argsort(first, kind="stable")}


def attribute_mean(per_attribute: dict[str, float]) -> float | None:
    """The paper's headline number: the unweighted mean of the per-attribute accuracies."""
    if not per_attribute:
        return None
    return float(np.mean(list(per_attribute.values())))


def metrics_from_arrays(predictions: Sequence[str], golds: Sequence[str],
                        attributes: Sequence[str]) -> tuple[dict, np.ndarray]:
    """The QA metrics dict and the per-question correctness."""
    correct = exact_match(predictions, golds)
    per = accuracy_by_attribute(correct, attributes)
    metrics = {
        "exact_match": float(correct.mean()) if len(correct) else None,  # over questions
        "attribute_mean": attribute_mean(per),  # over attributes (= the above when balanced)
        "per_attribute": per,
        "n": int(len(correct)),
    }
    return metrics, correct


def metrics_from_predictions(records: Sequence[dict]) -> dict:
    """The metrics dict of ``evaluate_qa`` recomputed from its prediction records.

    Correctness is recomputed from ``prediction`` and ``answer`` (the stored ``correct``
    flag is not trusted), so a file edited or produced elsewhere is scored the same way.
    """
    from factlab.text.qa import completion  # text layer, no torch

    for i, r in enumerate(records):
        for key in ("prediction", "answer", "attribute"):
            if key not in r:
                raise FactlabError(f"prediction record {i} has no {key!r}")
    metrics, _ = metrics_from_arrays([r["prediction"] for r in records],
                                     [completion(r["answer"]) for r in records],
                                     [r["attribute"] for r in records])
    return metrics


def first_token_accuracy(model, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray],
                         targets: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
    """For each sequence, one forward pass; for each (p, t): ``argmax(logits[p]) == t``.

    The logits at position p predict token p+1, so to score the first token of a value
    starting at token s pass p = s - 1, t = sequence[s]. Sequences are batched longest
    first and right-padded (causal attention: real positions never see the padding).
    Returns a flat bool array: sequence by sequence, pairs in their given order.
    """
    import torch

    if not len(sequences) == len(positions) == len(targets):
        raise FactlabError(f"first_token_accuracy: {len(sequences)} sequences, "
                           f"{len(positions)} position lists, {len(targets)} target lists")
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    pos = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positions]
    tgt = [np.asarray(t, dtype=np.int64).reshape(-1) for t in targets]
    for i, (s, p, t) in enumerate(zip(seqs, pos, tgt)):
        if len(p) != len(t):
            raise FactlabError(f"sequence {i}: {len(p)} positions but {len(t)} targets")
        if len(p) and (p.min() < 0 or p.max() >= len(s)):
            raise FactlabError(f"sequence {i}: position outside 0..{len(s) - 1}")
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pos])])
    result = np.zeros(int(offsets[-1]), dtype=bool)
    todo = [i for i in range(len(seqs)) if len(pos[i])]
    todo.sort(key=lambda i: -len(seqs[i]))
    pad = model.config.pad_token_id
    pad = 0 if pad is None else int(pad)
    device = model.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(todo), batch_size):
                idx = todo[start:start + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.from_numpy(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                # only project the positions we score onto the vocabulary
                keep = np.unique(np.concatenate([pos[i] for i in idx]))
                ids, mask = ids.to(device), mask.to(device)
                try:
                    logits = model(input_ids=ids, attention_mask=mask,
                                   logits_to_keep=torch.from_numpy(keep).to(device)).logits
                    col = {int(p): k for k, p in enumerate(keep.tolist())}
                except TypeError as e:  # a model without logits_to_keep: all positions
                    if "logits_to_keep" not in str(e):
                        raise
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    col = None
                pred = logits.argmax(-1).cpu().numpy()  # (B, kept)
                for row, i in enumerate(idx):
                    cols = pos[i] if col is None else np.array([col[int(p)] for p in pos[i]])
                    result[offsets[i]:offsets[i + 1]] = pred[row, cols] == tgt[i]
    finally:
        model.train(was_training)
    return result
