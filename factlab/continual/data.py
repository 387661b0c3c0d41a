"""What each experience of a stream trains on, as tokens, and the streams built from it.

Experience 0 is the base world (its bios and P_train QA: what the base model was trained
on, which joint training, cumulative retraining and rehearsal revisit); a cohort
experience is the new people's bios plus the QA of the cohort's P_train; an update
experience is the updated people's rewritten bios plus, for those in P_train, the QA of
the values that changed.

A :class:`FactStream` packs bios whole (one document per row at a short context) and one
question per row, mixed ``qa_ratio`` to ``1 - qa_ratio`` per sequence; it keeps its
:class:`ExperienceData` so that plugins (replay, EWC's Fisher) can read what an experience
held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factlab.errors import FactlabError


@dataclass
class ExperienceData:
    """The encoded examples of one experience (or of a union of experiences): bios and
    QA, and where every example came from (``*_source``: the experience it belongs to)."""

    docs: object  # factlab.tokens.encode.EncodedDocs or None
    qa: object  # factlab.tokens.encode.EncodedQA or None
    docs_source: np.ndarray
    qa_source: np.ndarray

    @property
    def n_docs(self) -> int:
        return 0 if self.docs is None else len(self.docs)

    @property
    def n_qa(self) -> int:
        return 0 if self.qa is None else len(self.qa)

    def __len__(self) -> int:
        return self.n_docs + self.n_qa

    def tokens(self) -> int:
        return int(sum(int(x.lengths.sum()) for x in (self.docs, self.qa) if x is not None))

    def facts(self, n_attributes: int) -> int:
        """Distinct (person, attribute) facts stated by the examples: a bio states every
        attribute of its person, a question one; people are told apart by source."""
        seen = set()
        if self.docs is not None:
            for s, p in zip(self.docs_source.tolist(), np.asarray(self.docs.person).tolist()):
                seen.update((s, p, a) for a in range(n_attributes))
        if self.qa is not None:
            for s, p, a in zip(self.qa_source.tolist(), np.asarray(self.qa.person).tolist(),
                               np.asarray(self.qa.attribute).tolist()):
                seen.add((s, p, a))
        return len(seen)

    def current(self, updated: tuple | None, t: int) -> ExperienceData:
        """Without the examples that are out of date at experience ``t``: those of a
        person from an experience before one (<= t) that updated them (the update
        experience holds their rewritten text). ``updated``: (person, experience) arrays
        of the stream's updates."""
        if updated is None or not len(updated[0]):
            return self

        def keep(src, person):
            k = np.ones(len(src), dtype=bool)
            for p, e in zip(*updated):
                if e <= t:
                    k &= ~((person == p) & (src < e))
            return np.flatnonzero(k)

        d = keep(self.docs_source, np.asarray(self.docs.person)) if self.docs is not None \
            else np.zeros(0, np.int64)
        q = keep(self.qa_source, np.asarray(self.qa.person)) if self.qa is not None \
            else np.zeros(0, np.int64)
        if len(d) == self.n_docs and len(q) == self.n_qa:
            return self
        return self.take(d, q)

    def take(self, docs_idx, qa_idx) -> ExperienceData:
        d = np.asarray(docs_idx, dtype=np.int64)
        q = np.asarray(qa_idx, dtype=np.int64)
        return ExperienceData(
            self.docs.take(d) if self.docs is not None and len(d) else None,
            self.qa.take(q) if self.qa is not None and len(q) else None,
            self.docs_source[d] if len(d) else np.zeros(0, np.int64),
            self.qa_source[q] if len(q) else np.zeros(0, np.int64))

    @staticmethod
    def concat(parts) -> ExperienceData:
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            raise FactlabError("no examples to join")
        docs = [p.docs for p in parts if p.docs is not None]
        qa = [p.qa for p in parts if p.qa is not None]
        return ExperienceData(
            type(docs[0]).concat(docs) if docs else None,
            type(qa[0]).concat(qa) if qa else None,
            np.concatenate([p.docs_source for p in parts]).astype(np.int64),
            np.concatenate([p.qa_source for p in parts]).astype(np.int64))


def experience_data(corpus, tok, t: int, *, prompt_format: str = "plain",
                    update_qa: bool = True) -> ExperienceData:
    """What experience ``t`` of the stream ``corpus`` trains on (0: the base world)."""
    from factlab.text.qa import QA, training_qa
    from factlab.text.render import updated_people
    from factlab.tokens.encode import encode_docs, encode_qa
    from factlab.world.people import TRAIN

    w = corpus.world
    docs, qa = None, None
    if t == 0:
        docs, qa = corpus.bios(), training_qa(corpus)
    else:
        parts_d = []
        cohort_train = w.ids(arrival=t, split=TRAIN)
        if len(w.ids(arrival=t)):
            parts_d.append(corpus.cohort_bios(t))
            if len(cohort_train):
                qa = training_qa(corpus, cohort_train, at=t)
        u = w.updates.of(t)
        if len(u):
            parts_d.append(corpus.update_bios(t))
            moved = updated_people(w, t)
            moved = moved[w.split[moved] == TRAIN]
            if update_qa and len(moved):
                uq = training_qa(corpus, moved, at=t)
                changed = set(zip(u.person.tolist(), u.attribute.tolist()))
                keep = [i for i, (p, a) in enumerate(zip(np.asarray(uq.person).tolist(),
                                                         np.asarray(uq.attribute).tolist()))
                        if (p, a) in changed]
                uq = QA(np.asarray(uq.person)[keep], np.asarray(uq.attribute)[keep],
                        np.asarray(uq.template)[keep], [uq.question[i] for i in keep],
                        [uq.answer[i] for i in keep], uq.attributes, False)
                qa = uq if qa is None else qa.join(uq)
        if not parts_d:
            raise FactlabError(f"experience {t} of the stream adds nothing")
        docs = parts_d[0] if len(parts_d) == 1 else type(parts_d[0]).concat(parts_d)
    ed = encode_docs(tok, docs)
    eq = encode_qa(tok, qa, prompt_format) if qa is not None and len(qa) else None
    return ExperienceData(ed, eq, np.full(len(ed), t, np.int64),
                          np.full(0 if eq is None else len(eq), t, np.int64))


class FactStream:
    """Sequences over an :class:`ExperienceData`: a row is all-QA (one question, answer-
    only loss) with probability ``qa_ratio``, else one whole bio (a source without
    examples is left out)."""

    def __init__(self, data: ExperienceData, seq_len: int, tok, *, qa_ratio: float = 0.3,
                 seed: int = 0):
        from factlab.tokens.mixing import Mixture
        from factlab.tokens.streams import DocStream, QAStream

        if not 0 <= qa_ratio <= 1:
            raise FactlabError(f"qa_ratio must be in [0, 1], got {qa_ratio}")
        self.data, self.seq_len, self.seed, self.qa_ratio = data, int(seq_len), seed, qa_ratio
        parts, probs = [], []
        if data.qa is not None and qa_ratio > 0:
            parts.append(QAStream(data.qa, seq_len, tok.pad_token_id, seed=seed, pack=False))
            probs.append(qa_ratio)
        if data.docs is not None and (qa_ratio < 1 or not parts):
            parts.append(DocStream(data.docs, seq_len, tok.eos_token_id, seed=seed, whole=True,
                                   pad_id=tok.pad_token_id))
            probs.append(1 - qa_ratio if parts[:-1] else 1.0)
        if not parts:
            raise FactlabError("FactStream: no examples")
        probs = [p / sum(probs) for p in probs]
        self.inner = parts[0] if len(parts) == 1 else Mixture(parts, probs, seed=seed)
        self.model_inputs = self.inner.model_inputs

    @classmethod
    def union(cls, parts, seq_len: int, tok, *, qa_ratio: float = 0.3,
              seed: int = 0) -> FactStream:
        """Several experiences at once, each drawn equally often (a row comes from part i
        with probability 1/len(parts), whatever its size): joint training and cumulative
        retraining, where the base world's data would otherwise outweigh a cohort's."""
        from factlab.tokens.mixing import Mixture

        parts = [p for p in parts if p is not None and len(p)]
        streams = [cls(p, seq_len, tok, qa_ratio=qa_ratio, seed=seed + 101 * i)
                   for i, p in enumerate(parts)]
        if len(streams) == 1:
            return streams[0]
        self = cls.__new__(cls)
        self.data, self.seq_len, self.seed, self.qa_ratio = ExperienceData.concat(parts), \
            int(seq_len), seed, qa_ratio
        self.inner = Mixture([s.inner for s in streams], [1 / len(streams)] * len(streams),
                             seed=seed)
        self.model_inputs = self.inner.model_inputs
        return self

    @property
    def sequences_per_epoch(self) -> int:
        return self.inner.sequences_per_epoch

    def sequences(self, start: int, n: int) -> dict:
        return self.inner.sequences(start, n)
