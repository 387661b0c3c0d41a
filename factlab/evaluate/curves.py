"""First-token accuracy tracked during training (the paper's Figure 1 curves).

For a fixed sample of P_train and P_test people: the first token of each attribute value
inside their bios (entry 0) and the first answer token of their six questions. Everything
is tokenised once; each call is a few batched forward passes.
"""

from __future__ import annotations

import numpy as np

from factlab.evaluate.metrics import first_token_accuracy
from factlab.tokens.encode import encode_qa
from factlab.tokens.first_token import first_token_targets, qa_first_token_targets


def accuracy_of(model, ft, batch_size: int = 64) -> np.ndarray:
    """Correct / not for every target of a FirstTokenTargets, in its order."""
    n_rows = len(ft.lengths)
    order = np.argsort(ft.row, kind="stable")
    bounds = np.searchsorted(ft.row[order], np.arange(n_rows + 1))
    seqs = [ft.input_ids[r, :ft.lengths[r]] for r in range(n_rows)]
    pos = [ft.position[order[bounds[r]:bounds[r + 1]]] for r in range(n_rows)]
    tgt = [ft.target[order[bounds[r]:bounds[r + 1]]] for r in range(n_rows)]
    flat = first_token_accuracy(model, seqs, pos, tgt, batch_size=batch_size)
    out = np.empty(len(ft), dtype=bool)
    out[order] = flat
    return out


class Curves:
    """``Curves(...)(loop, step) -> {"bio_first_token/train": acc, ...}`` for the loop."""

    def __init__(self, world, tokenizer, enc_docs, seq_len: int, n_people: int = 100,
                 batch_size: int = 64):
        self.batch_size = batch_size
        self.targets = {}
        pad = tokenizer.pad_token_id
        for split, ids in (("train", world.train_ids), ("test", world.test_ids)):
            people = ids[:n_people]
            docs = np.flatnonzero(np.isin(enc_docs.person, people) & (world.bios().entry == 0))
            self.targets[f"bio_first_token/{split}"] = first_token_targets(
                enc_docs, seq_len, docs, pad_id=pad)
            self.targets[f"qa_first_token/{split}"] = qa_first_token_targets(
                encode_qa(tokenizer, world.qa(people)), pad_id=pad)

    def __call__(self, loop, step: int) -> dict:
        return {k: float(accuracy_of(loop.model, ft, self.batch_size).mean())
                for k, ft in self.targets.items() if len(ft)}
