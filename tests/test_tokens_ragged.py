"""The ragged-array base of encodings: take, concat, example ids carried through both."""

import dataclasses

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.tokens import EncodedDocs, EncodedQA, Ragged

EOS, PAD = 0, 1  # token ids that no synthetic document or question contains


def synthetic_docs(n=80, seed=0, lo=20, hi=40, attributes=6):
    """Encoded documents without a tokenizer: random lengths and tokens (>= 2)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    vt = rng.integers(-1, lo, (n, attributes)).astype(np.int32)
    return EncodedDocs(rng.integers(2, 500, int(offsets[-1])).astype(np.int32), offsets, vt,
                       (np.arange(n) // 2).astype(np.int32))


def synthetic_qa(n=120, seed=1):
    """Encoded QA without a tokenizer: prompt (8-15 tokens), answer (2-5), EOS."""
    rng = np.random.default_rng(seed)
    prompt, answer = rng.integers(8, 16, n), rng.integers(2, 6, n)
    lens = prompt + answer + 1
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = rng.integers(2, 500, int(offsets[-1])).astype(np.int32)
    ids[offsets[1:] - 1] = EOS
    return EncodedQA(ids, offsets, prompt.astype(np.int32), (np.arange(n) // 3).astype(np.int32),
                     (np.arange(n) % 6).astype(np.int16))


@pytest.fixture(scope="module")
def docs():
    return synthetic_docs()


@pytest.fixture(scope="module")
def qa():
    return synthetic_qa()


def _assert_same(a, b):
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f.name


def test_columns_and_default_example_id(docs, qa):
    assert EncodedDocs.columns() == ["example_id", "value_tok", "person"]
    assert EncodedQA.columns() == ["example_id", "answer_start", "person", "attribute"]
    for enc in (docs, qa):
        assert enc.example_id.dtype == np.int64
        assert np.array_equal(enc.example_id, np.arange(len(enc)))
        assert np.array_equal(enc.item(3), enc.ids[enc.offsets[3]:enc.offsets[4]])
    assert np.array_equal(docs.doc(2), docs.item(2)) and np.array_equal(qa.example(5), qa.item(5))


@pytest.mark.parametrize("which", ["docs", "qa"])
def test_take_subsets_reorders_and_repeats_items_with_every_column(which, docs, qa):
    enc = {"docs": docs, "qa": qa}[which]
    enc = dataclasses.replace(enc, example_id=1000 + 3 * np.arange(len(enc)))  # ids != index
    idx = np.array([7, 2, 2, len(enc) - 1, 0])
    sub = enc.take(idx)
    assert type(sub) is type(enc) and len(sub) == 5
    assert sub.offsets.dtype == np.int64 and sub.ids.dtype == enc.ids.dtype
    assert sub.offsets[-1] == len(sub.ids)
    for i, j in enumerate(idx.tolist()):
        assert np.array_equal(sub.item(i), enc.item(j))
    assert np.array_equal(sub.lengths, enc.lengths[idx])
    for name in type(enc).columns():
        col = getattr(sub, name)
        assert col.dtype == getattr(enc, name).dtype
        assert np.array_equal(col, getattr(enc, name)[idx]), name
    assert sub.example_id.tolist() == [1021, 1006, 1006, 1000 + 3 * (len(enc) - 1), 1000]
    # a boolean mask is the same as its indices
    mask = np.arange(len(enc)) % 3 == 1
    _assert_same(enc.take(mask), enc.take(np.flatnonzero(mask)))


def test_take_nothing_gives_an_empty_encoding_of_the_same_shape(docs, qa):
    e = docs.take([])
    assert type(e) is EncodedDocs and len(e) == 0 and len(e.ids) == 0
    assert e.offsets.tolist() == [0] and e.value_tok.shape == (0, docs.value_tok.shape[1])
    assert e.example_id.shape == (0,) and e.lengths.shape == (0,)
    q = qa.take(np.zeros(0, np.int64))
    assert len(q) == 0 and q.answer_start.shape == (0,) and q.attribute.dtype == np.int16


def test_take_rejects_bad_indices(docs):
    with pytest.raises(FactlabError, match="indices must lie"):
        docs.take([0, len(docs)])
    with pytest.raises(FactlabError, match="indices must lie"):
        docs.take([-1])
    with pytest.raises(FactlabError, match="mask"):
        docs.take(np.ones(len(docs) - 1, bool))
    with pytest.raises(FactlabError, match="integers"):
        docs.take([0.5])


def test_concat_joins_parts_in_order_and_keeps_their_ids(qa):
    old = qa.take(np.arange(0, 10))
    new = dataclasses.replace(qa.take(np.arange(10, 25)), example_id=500 + np.arange(15))
    empty = qa.take([])
    both = EncodedQA.concat([old, empty, new])
    assert type(both) is EncodedQA and len(both) == 25
    assert both.example_id.tolist() == list(range(10)) + list(range(500, 515))
    for i in range(25):
        assert np.array_equal(both.item(i), qa.item(i))
    for name in ("answer_start", "person", "attribute"):
        assert getattr(both, name).dtype == getattr(qa, name).dtype
        assert np.array_equal(getattr(both, name), getattr(qa, name)[:25]), name
    assert both.offsets.dtype == np.int64 and both.offsets[-1] == len(both.ids)
    # the base's concat works on any subclass and returns it; empty with empty is empty
    assert type(Ragged.concat([old, new])) is EncodedQA
    assert len(EncodedQA.concat([empty, empty])) == 0 and len(EncodedQA.concat([empty])) == 0


def test_split_then_concat_then_take_restores_the_encoding(docs):
    perm = np.random.default_rng(0).permutation(len(docs))
    parts = [docs.take(perm[:11]), docs.take(perm[11:12]), docs.take(perm[12:])]
    back = EncodedDocs.concat(parts).take(np.argsort(perm))
    _assert_same(back, docs)


def test_concat_rejects_mismatched_parts(docs, qa):
    with pytest.raises(FactlabError, match="nothing"):
        EncodedDocs.concat([])
    with pytest.raises(FactlabError, match="types"):
        Ragged.concat([docs, qa])
    with pytest.raises(FactlabError, match="types"):
        EncodedDocs.concat([qa])
    narrow = dataclasses.replace(docs.take([0, 1]), value_tok=docs.value_tok[:2, :3])
    with pytest.raises(FactlabError, match="value_tok"):
        EncodedDocs.concat([docs.take([2]), narrow])


def test_construction_checks_offsets_and_column_lengths(qa):
    n = len(qa)
    with pytest.raises(FactlabError, match="offsets"):
        dataclasses.replace(qa, offsets=qa.offsets + 1)
    with pytest.raises(FactlabError, match="offsets"):
        dataclasses.replace(qa, offsets=qa.offsets[::-1].copy())
    with pytest.raises(FactlabError, match="person"):
        dataclasses.replace(qa, person=qa.person[:-1])
    with pytest.raises(FactlabError, match="example_id"):
        dataclasses.replace(qa, example_id=np.arange(n + 1))
    assert dataclasses.replace(qa, example_id=list(range(n))).example_id.dtype == np.int64
