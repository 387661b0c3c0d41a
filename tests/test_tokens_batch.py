"""The batch contract of every stream: per-row ids beside input_ids / labels, kept by
Mixture, Schedule and Tagged; model_inputs; resuming at any sequence gives the same ids."""

import dataclasses

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.tokens import (IGNORE, MODEL_INPUTS, DocStream, Mixture, QAStream, Schedule,
                            Tagged, batch_keys, model_inputs)
from test_tokens_ragged import EOS, PAD, synthetic_docs, synthetic_qa

L = 64


@pytest.fixture(scope="module")
def docs():  # ids that are not the index, so a stream reporting indices fails
    enc = synthetic_docs()
    return dataclasses.replace(enc, example_id=10_000 + 7 * np.arange(len(enc)))


@pytest.fixture(scope="module")
def qa():
    enc = synthetic_qa()
    return dataclasses.replace(enc, example_id=50_000 + 3 * np.arange(len(enc)))


def _index_of(enc, eid):
    return int(np.flatnonzero(enc.example_id == eid)[0])


# ----------------------------------------------------------------------------- QA

def test_unpacked_qa_rows_carry_their_example_id_and_prompt_end(qa):
    s = QAStream(qa, L, PAD, seed=2, pack=False, prompt_end=True)
    assert s.model_inputs == {"input_ids", "prompt_end"}
    n = len(qa)
    got = s.sequences(n - 4, 9)  # crosses into the second (reshuffled) epoch
    assert list(got) == ["input_ids", "labels", "example_id", "prompt_end"]
    assert got["example_id"].dtype == np.int64 and got["example_id"].shape == (9,)
    want = np.concatenate([s.order(0)[-4:], s.order(1)[:5]])
    assert np.array_equal(got["example_id"], qa.example_id[want])
    for r, q in enumerate(want.tolist()):
        ex = qa.example(q)
        assert got["input_ids"][r, :len(ex)].tolist() == ex.tolist()  # the row is that example
        pe = int(got["prompt_end"][r])
        assert pe == qa.answer_start[q]
        assert (got["labels"][r, :pe] == IGNORE).all() and got["labels"][r, pe] == ex[pe]
    plain = QAStream(qa, L, PAD, seed=2, pack=False)
    assert plain.model_inputs == MODEL_INPUTS == {"input_ids"}
    assert "prompt_end" not in plain.sequences(0, 3)


def test_packed_qa_rows_have_an_id_only_when_they_hold_one_example(qa):
    eos = EOS
    longest = int(qa.lengths.max())
    long_ones = qa.take(np.flatnonzero(2 * qa.lengths > longest + 1))  # no two fit in one row
    for enc, seq_len, lone in ((long_ones, longest + 1, "all"), (qa, longest + 8, "some"),
                               (qa, 3 * longest, "few")):
        s = QAStream(enc, seq_len, PAD, seed=5, prompt_end=True)
        n = s.epoch_size(0) + s.epoch_size(1)
        got = s.sequences(0, n)
        singles = 0
        for r in range(n):
            ids = got["input_ids"][r]
            k = int((ids == eos).sum())  # every example ends with EOS
            eid, pe = int(got["example_id"][r]), int(got["prompt_end"][r])
            if k == 1:
                singles += 1
                q = _index_of(enc, eid)
                assert ids[:len(enc.example(q))].tolist() == enc.example(q).tolist()
                assert pe == enc.answer_start[q]
            else:
                assert k > 1 and eid == -1 and pe == -1
        # at 3x the longest any two examples fit: a lone one only ends an epoch
        assert {"all": singles == n, "some": 0 < singles < n, "few": singles <= 2}[lone]


# ----------------------------------------------------------------------------- documents

def test_whole_doc_rows_carry_the_document_id(docs):
    eos, pad = EOS, PAD
    s = DocStream(docs, int(docs.lengths.max()) + 1, eos, seed=4, whole=True, pad_id=pad)
    assert s.model_inputs == MODEL_INPUTS
    n = len(docs)
    got = s.sequences(n - 3, 6)  # one document per row: rows = epochs' orders
    want = np.concatenate([s.order(0)[-3:], s.order(1)[:3]])
    assert np.array_equal(got["example_id"], docs.example_id[want])
    for r, d in enumerate(want.tolist()):
        assert got["input_ids"][r, :len(docs.doc(d))].tolist() == docs.doc(d).tolist()


def _alone_rows(s, enc, epoch, L):
    """Brute force: for each row of ``epoch``, the document filling it exactly, or -1."""
    pos, starts = 0, {}
    for d in s.order(epoch).tolist():
        starts[pos] = d
        pos += int(enc.lengths[d]) + 1
    out = []
    for j in range(s.sequences_per_epoch):
        d = starts.get(j * L)
        out.append(int(enc.example_id[d]) if d is not None and enc.lengths[d] + 1 == L else -1)
    return out


@pytest.mark.parametrize("mask_head", [False, True])
def test_concatenated_rows_have_an_id_only_when_they_are_one_document(docs, mask_head):
    eos = EOS
    # equal-length documents and a context of one document + EOS: every row is one doc
    common = np.bincount(docs.lengths).argmax()
    same = docs.take(np.flatnonzero(docs.lengths == common))
    assert len(same) >= 4
    s = DocStream(same, int(common) + 1, eos, seed=1, mask_head=mask_head)
    n = 2 * s.sequences_per_epoch
    got = s.sequences(0, n)
    want = np.concatenate([s.order(0), s.order(1)])
    assert np.array_equal(got["example_id"], same.example_id[want])
    # mixed lengths: only the rows that are exactly one document + EOS get its id
    mix = docs.take(np.flatnonzero(np.abs(docs.lengths - common) <= 1))
    s = DocStream(mix, int(common) + 1, eos, seed=2, mask_head=mask_head)
    spe = s.sequences_per_epoch
    got = s.sequences(0, 2 * spe)["example_id"].tolist()
    want = _alone_rows(s, mix, 0, common + 1) + _alone_rows(s, mix, 1, common + 1)
    assert got == want
    assert 0 < sum(x >= 0 for x in got) < len(got)
    # an ordinary context: rows are fragments and several documents
    assert (DocStream(docs, L, eos, seed=0).sequences(0, 50)["example_id"] == -1).all()


# ----------------------------------------------------------------------------- wrappers

class _Masked:
    """A stream that emits an attention mask (and declares it a model input)."""

    seq_len = L
    sequences_per_epoch = 10
    model_inputs = frozenset({"input_ids", "attention_mask"})

    def sequences(self, start, n):
        ids = np.arange(start, start + n, dtype=np.int64)[:, None].repeat(L, 1)
        return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}


def test_tagged_adds_constant_bookkeeping_columns(qa):
    s = QAStream(qa, L, PAD, seed=1, pack=False, prompt_end=True)
    t = Tagged(s, experience=2, stage=0)
    assert t.seq_len == L and t.sequences_per_epoch == s.sequences_per_epoch
    assert t.model_inputs == s.model_inputs  # tags never reach a forward
    got, base = t.sequences(5, 7), s.sequences(5, 7)
    for k in base:
        assert np.array_equal(got[k], base[k])
    assert got["experience"].dtype == np.int64 and got["experience"].tolist() == [2] * 7
    assert got["stage"].tolist() == [0] * 7
    assert list(batch_keys(t)) == list(base) + ["experience", "stage"]
    assert batch_keys(t)["experience"] == (np.dtype(np.int64), ())
    with pytest.raises(FactlabError, match="already returns"):
        Tagged(s, example_id=3)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(FactlabError, match="int >= 0"):
            Tagged(s, experience=bad)
    with pytest.raises(FactlabError, match="no columns"):
        Tagged(s)


def test_mixture_keeps_every_key_and_fills_missing_row_keys(docs, qa):
    qs = Tagged(QAStream(qa, L, PAD, seed=1, prompt_end=True), experience=3)
    ds = DocStream(docs, L, EOS, seed=2)
    m = Mixture([qs, ds], [0.5, 0.5], seed=7)
    assert m.model_inputs == {"input_ids", "prompt_end"}
    n = 400
    got = m.sequences(0, n)
    assert list(got) == ["input_ids", "labels", "example_id", "prompt_end", "experience"]
    src, _ = m.sources(0, n)
    is_qa = src == 0
    nq = int(is_qa.sum())
    assert 0 < nq < n
    want_q, want_d = qs.sequences(0, nq), ds.sequences(0, n - nq)
    for k in want_q:
        assert np.array_equal(got[k][is_qa], want_q[k]), k
    for k in want_d:
        assert np.array_equal(got[k][~is_qa], want_d[k]), k
    assert (got["experience"][~is_qa] == -1).all() and (got["prompt_end"][~is_qa] == -1).all()
    for k in ("example_id", "prompt_end", "experience"):
        assert got[k].dtype == np.int64 and got[k].shape == (n,)
    # the keys do not depend on which sources a request happens to draw
    only_docs = Mixture([qs, ds], [0.0, 1.0], seed=0).sequences(0, 5)
    assert list(only_docs) == list(got) and (only_docs["experience"] == -1).all()
    assert list(m.sequences(10, 0)) == list(got)


def test_mixing_2d_keys_that_a_source_lacks_is_an_error(docs):
    ds = DocStream(docs, L, EOS, seed=2)
    with pytest.raises(FactlabError, match="attention_mask"):
        Mixture([ds, _Masked()], [0.5, 0.5])
    with pytest.raises(FactlabError, match="attention_mask"):
        Schedule([_Masked(), ds], [3])
    both = Mixture([_Masked(), _Masked()], [0.5, 0.5])
    assert both.model_inputs == {"input_ids", "attention_mask"}
    assert model_inputs(ds) == {"input_ids"}

    class Odd(_Masked):  # a (n, 2) column where the other source has (n, L)
        def sequences(self, start, n):
            got = super().sequences(start, n)
            got["attention_mask"] = got["attention_mask"][:, :2]
            return got
    with pytest.raises(FactlabError, match="shapes"):
        Mixture([_Masked(), Odd()], [0.5, 0.5])


def test_schedule_keeps_every_key_across_segments(docs, qa):
    a = Tagged(DocStream(docs, L, EOS, seed=1), experience=0)
    b = QAStream(qa, L, PAD, seed=2, pack=False, prompt_end=True)
    s = Schedule([a, b], [5])
    assert s.model_inputs == {"input_ids", "prompt_end"}
    keys = ["input_ids", "labels", "example_id", "experience", "prompt_end"]
    got = s.sequences(2, 8)  # a's rows 2..4, then b's rows 0..4
    assert list(got) == keys
    for k in ("input_ids", "labels", "example_id"):
        assert np.array_equal(got[k], np.concatenate([a.sequences(2, 3)[k],
                                                      b.sequences(0, 5)[k]])), k
    assert got["experience"].tolist() == [0] * 3 + [-1] * 5
    assert got["prompt_end"].tolist() == [-1] * 3 + b.sequences(0, 5)["prompt_end"].tolist()
    first = s.sequences(0, 2)  # only the first segment: still every key
    assert list(first) == keys and (first["prompt_end"] == -1).all()
    assert list(s.sequences(3, 0)) == keys


# ----------------------------------------------------------------------------- resuming

@pytest.mark.parametrize("kind", ["qa", "qa_unpacked", "doc", "doc_whole", "mix", "schedule"])
def test_resuming_at_any_sequence_gives_the_same_rows_and_ids(kind, docs, qa):
    eos, pad = EOS, PAD

    def make():
        qs = QAStream(qa, 30, pad, seed=4, prompt_end=True)  # rows of one or two examples
        qu = QAStream(qa, 30, pad, seed=4, pack=False)
        common = int(np.bincount(docs.lengths).argmax())  # every row is one document
        ds = DocStream(docs.take(np.flatnonzero(docs.lengths == common)), common + 1, eos,
                       seed=3, mask_head=True)
        dw = DocStream(docs, int(docs.lengths.max()) + 1, eos, seed=3, whole=True, pad_id=pad)
        if kind == "mix":
            return Mixture([Tagged(qu, experience=1), Tagged(qs, experience=0)], [0.3, 0.7],
                           seed=5)
        if kind == "schedule":
            return Schedule([qu, Tagged(qs, experience=1)], [len(qa) + 3])
        return {"qa": qs, "qa_unpacked": qu, "doc": ds, "doc_whole": dw}[kind]

    s = make()
    N = 2 * s.sequences_per_epoch + 11
    big = s.sequences(0, N)
    assert (big["example_id"] >= 0).any()
    for k in range(0, N - 7, max(1, N // 9)):  # a fresh stream resumed at sequence k
        got = make().sequences(k, 7)
        assert list(got) == list(big)
        for key in big:
            assert np.array_equal(got[key], big[key][k:k + 7]), (k, key)
