"""The one evaluation of a stream: every test fact (``factlab.corpus.stream.stream_facts``)
answered by greedy generation, with the model's log-probability of its own answer.

The records are ``factlab.continual.metrics``' input: the labels of the test facts plus
``prediction`` (the generated completion, EOS removed) and ``logprob`` (teacher-forced
log-probability of that completion and its EOS: the answer's confidence; an answer that
does not start with a space is scored as if it did). The driver's accuracy for the row is
exact match over the known people's facts (not the unknown people's); every other number
is recomputed from the saved records.
"""

from __future__ import annotations

import numpy as np


def facts_evaluator(tok, facts, *, batch_size: int = 128, prompt_format: str = "plain"):
    """``fn(model) -> (exact match on known people's facts, records)`` for the driver."""
    from factlab.evaluate.generate import evaluate_qa
    from factlab.evaluate.score import score_answers

    base = facts.records()
    known = np.array([r["label"] != "unknown" for r in base])

    def evaluate(model):
        _, recs = evaluate_qa(model, tok, facts.qa, batch_size=batch_size,
                              prompt_format=prompt_format)
        preds = [r["prediction"] for r in recs]
        answers = [p[1:] if p.startswith(" ") else p for p in preds]
        lp = score_answers(model, tok, facts.qa.question, answers, batch_size=batch_size,
                           prompt_format=prompt_format).logprob
        out = [{**b, "prediction": p, "logprob": float(x)} for b, p, x in zip(base, preds, lp)]
        correct = np.array([r["correct"] for r in recs], dtype=bool)
        acc = float(correct[known].mean()) if known.any() else 0.0
        return acc, out

    return evaluate
