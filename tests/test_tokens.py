"""Tokenizer, encodings, packing streams, masks, mixtures, first-token targets."""

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.text.documents import Docs
from factlab.text.qa import completion, prompt, training_qa
from factlab.tokens import (EOS, PAD, DocStream, Mixture, QAStream, Schedule, encode_docs,
                            encode_qa, first_token_targets, load_tokenizer,
                            qa_first_token_targets, train_tokenizer, world_tokenizer)
from factlab.tokens import encode as tdata
from factlab.corpus import CorpusConfig, make_corpus

L = 64  # sequence length used by the stream tests


@pytest.fixture(scope="module")
def world():
    return make_corpus(CorpusConfig(people=60, seed=0, unknown=5, augment="multi5+permute"))


@pytest.fixture(scope="module")
def tok(world):
    return world_tokenizer(world, vocab_size=800)


@pytest.fixture(scope="module")
def enc(world, tok):
    return encode_docs(tok, world.bios())


@pytest.fixture(scope="module")
def qa(world):
    return training_qa(world)


@pytest.fixture(scope="module")
def enc_qa(tok, qa):
    return encode_qa(tok, qa)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_and_has_distinct_specials(world, tok, tmp_path):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.bos_token == EOS
    assert eos is not None and pad is not None and eos != pad
    assert tok.padding_side == "right"
    texts = list(world.bios().text[:20]) + [prompt(q) + completion(a) for q, a in
                                             zip(world.qa([0]).question, world.qa([0]).answer)]
    texts.append("Zoë from Québec, 北京 — \ttabs  and  spaces\n")  # bytes never seen in training
    for t in texts:
        ids = _ids(tok, t)
        assert tok.decode(ids) == t
        assert eos not in ids and pad not in ids  # no specials inserted
    assert tok(texts[0])["input_ids"] == _ids(tok, texts[0])  # no post-processor
    assert _ids(tok, EOS) == [eos] and _ids(tok, PAD) == [pad]
    assert len(tok) == 800
    # every held-out question word was seen: paraphrases tokenize into few pieces
    para = world.qa([0], paraphrase=True, all_paraphrases=True).question[0]
    assert len(_ids(tok, para)) < len(para) / 2

    # deterministic: the same texts give the same vocabulary and merges
    again = world_tokenizer(world, vocab_size=800)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert train_tokenizer(["a b c"] * 3 + ["x y"], 300).get_vocab() != tok.get_vocab()

    tok.save_pretrained(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.eos_token_id == eos and back.pad_token_id == pad
    assert _ids(back, texts[0]) == _ids(tok, texts[0])
    with pytest.raises(FactlabError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_loaded_tokenizer_without_pad_pads_with_eos(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS)
    assert bare.pad_token is None
    bare.save_pretrained(tmp_path / "bare")
    back = load_tokenizer(tmp_path / "bare")
    assert back.pad_token == EOS and back.pad_token_id == tok.eos_token_id


# ----------------------------------------------------------------------------- documents

def _check_value_tok(tok, docs, enc):
    assert len(enc) == len(docs) and enc.value_tok.shape == docs.spans.shape[:2]
    assert np.array_equal(enc.person, docs.person)
    checked = 0
    pre = tdata.doc_prefix(tok)
    for d, text in enumerate(docs.text):
        ids = enc.doc(d).tolist()
        text = pre + text
        assert tok.decode(ids) == text
        for a in range(docs.spans.shape[1]):
            s, e = docs.spans[d, a].tolist()
            v = int(enc.value_tok[d, a])
            if s < 0:
                assert v == -1
                continue
            s += len(pre)
            # the token at v covers character s: decoded prefixes bracket the value start
            assert len(tok.decode(ids[:v])) <= s < len(tok.decode(ids[:v + 1]))
            piece = tok.decode([ids[v]])
            assert text[s] in piece and piece.lstrip()[0] == text[s]
            checked += 1
    return checked


def test_value_tok_points_at_first_token_of_every_value(world, tok, enc):
    docs = world.bios()
    assert _check_value_tok(tok, docs, enc) == 6 * len(docs)
    assert np.array_equal(enc.offsets[1:] - enc.offsets[:-1],
                          [len(_ids(tok, " " + t)) for t in docs.text])
    assert enc.ids.dtype == np.int32 and enc.offsets[-1] == len(enc.ids)


def doc_starts_with(doc, ids):
    return doc[:len(ids)] == ids


def test_a_name_opening_a_bio_is_the_same_tokens_as_in_a_question(world, tok, enc):
    """Byte-level BPE splits a word differently at the start of a text; documents are
    encoded with a leading space so the name's tokens match the questions'."""
    assert tdata.doc_prefix(tok) == " "
    for d in range(0, len(enc), 37):
        p = int(enc.person[d])
        name = world.people.names[p]
        question = world.qa([p]).question[0]
        assert name in question
        in_q = _ids(tok, " " + name)
        q_ids = _ids(tok, prompt(question))
        assert doc_starts_with(enc.doc(d).tolist(), in_q)  # the bio opens with the name ...
        assert any(q_ids[i:i + len(in_q)] == in_q for i in range(len(q_ids)))  # ... as asked
    # a tokenizer that adds its own prefix space gets none from us
    class Spm:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [hash(w) for w in s.split()]}
    assert tdata.doc_prefix(Spm()) == ""


def test_value_tok_on_bior_and_non_ascii_text_both_paths(tok, monkeypatch):
    w = make_corpus(CorpusConfig(people=30, seed=2, unknown=5, style="bioR", augment="multi2",
                                 they_fraction=0.3))
    docs = w.bios()
    pre = "Ünïcödé 北京 — "  # shifts char and byte positions apart
    texts = [pre + t if d % 3 == 0 else t for d, t in enumerate(docs.text)]
    spans = docs.spans.copy()
    for d in range(0, len(texts), 3):
        spans[d][spans[d] >= 0] += len(pre)
    docs2 = Docs(texts, docs.person, docs.entry, spans, docs.attributes)
    fast = encode_docs(tok, docs2)  # byte-length path
    assert _check_value_tok(tok, docs2, fast) > 0
    monkeypatch.setattr(tdata, "_byte_lengths", lambda t: None)
    slow = encode_docs(tok, docs2)  # offset-mapping path
    for f in ("ids", "offsets", "value_tok"):
        assert np.array_equal(getattr(fast, f), getattr(slow, f)), f


# ----------------------------------------------------------------------------- doc stream

def test_doc_stream_packs_a_shuffled_epoch_exactly(world, tok, enc):
    eos = tok.eos_token_id
    s = DocStream(enc, L, eos, seed=1)
    D = len(enc)
    for e in (0, 1):
        order = s.order(e)
        assert np.array_equal(order, np.random.default_rng([1, e]).permutation(D))
        want = []
        for d in order.tolist():
            want += enc.doc(d).tolist() + [eos]
        assert s.sequences_per_epoch == len(want) // L
        got = s.sequences(e * s.sequences_per_epoch, s.sequences_per_epoch)
        assert got["input_ids"].shape == (s.sequences_per_epoch, L)
        assert got["input_ids"].dtype == np.int64
        assert np.array_equal(got["labels"], got["input_ids"])
        assert got["input_ids"].reshape(-1).tolist() == want[:s.sequences_per_epoch * L]
    assert not np.array_equal(s.order(0), s.order(1))
    assert not np.array_equal(s.order(0), DocStream(enc, L, eos, seed=2).order(0))
    # global shuffle: a person's five entries are not packed next to each other
    same = (enc.person[s.order(0)][1:] == enc.person[s.order(0)][:-1]).mean()
    assert same < 0.1


def test_whole_doc_packing_never_splits_a_document(tok, enc):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    W = 2 * int(enc.lengths.max()) + 2  # room for two or more documents
    s = DocStream(enc, W, eos, seed=1, whole=True, pad_id=pad)
    for e in (0, 1):
        first = sum(s._packer.epoch_size(i) for i in range(e))
        n = s._packer.epoch_size(e)
        got = s.sequences(first, n)
        ids, lab = got["input_ids"], got["labels"]
        assert ids.shape == (n, W)
        docs = []
        for row_ids, row_lab in zip(ids, lab):
            keep = row_lab != -100
            real = row_ids[keep].tolist()
            assert not (row_ids[~keep] != pad).any()  # the rest is padding, unlabelled
            assert np.array_equal(row_ids[keep], row_lab[keep])
            cur = []  # split the row at its EOS tokens: every piece is one whole document
            for t in real:
                if t == eos:
                    docs.append(cur)
                    cur = []
                else:
                    cur.append(t)
            assert cur == []  # the row ends with a document's EOS
        want = [enc.doc(d).tolist() for d in s.order(e).tolist()]
        assert docs == want  # every document of the epoch, whole, in the shuffled order
    assert (s.sequences(0, 4)["labels"] == -100).any()
    with pytest.raises(FactlabError, match="longer than seq_len"):
        DocStream(enc, int(enc.lengths.max()), eos, whole=True)


def test_named_packing_masks_only_the_leading_fragment(tok, enc):
    eos = tok.eos_token_id
    plain = DocStream(enc, L, eos, seed=1)
    named = DocStream(enc, L, eos, seed=1, mask_head=True)
    n = plain.sequences_per_epoch + 5  # crosses into the second epoch
    a, b = plain.sequences(0, n), named.sequences(0, n)
    assert np.array_equal(a["input_ids"], b["input_ids"])  # same tokens, same order
    starts = set()  # stream positions where a document starts
    for e in (0, 1):
        pos = 0
        for d in plain.order(e).tolist():
            starts.add((e, pos))
            pos += int(enc.lengths[d]) + 1
    masked_rows = 0
    for k in range(n):
        e, j = divmod(k, plain.sequences_per_epoch)
        ids, lab = b["input_ids"][k], b["labels"][k]
        keep = lab != -100
        assert np.array_equal(lab[keep], ids[keep])
        if (e, j * L) in starts:
            assert keep.all()
            continue
        masked_rows += 1
        eos_at = np.flatnonzero(ids == eos)
        cut = int(eos_at[0]) + 1 if len(eos_at) else L  # fragment + its EOS
        assert not keep[:cut].any() and keep[cut:].all()
    assert masked_rows > n // 2
    with pytest.raises(FactlabError, match="mask_head"):
        DocStream(enc, 2 * L, eos, whole=True, mask_head=True)


def test_schedule_switches_streams_at_the_boundary(tok, enc):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    whole = DocStream(enc, 3 * L, eos, seed=1, whole=True, pad_id=pad)
    named = DocStream(enc, 3 * L, eos, seed=2, mask_head=True)
    s = Schedule([whole, named], [7])
    got = s.sequences(3, 10)  # rows 3..6 from whole, then named's rows 0..5
    for key in ("input_ids", "labels"):
        want = np.concatenate([whole.sequences(3, 4)[key], named.sequences(0, 6)[key]])
        assert np.array_equal(got[key], want)
    assert np.array_equal(s.sequences(0, 7)["labels"], whole.sequences(0, 7)["labels"])
    assert np.array_equal(s.sequences(50, 3)["input_ids"], named.sequences(43, 3)["input_ids"])
    with pytest.raises(FactlabError, match="segment lengths"):
        Schedule([whole, named], [7, 3])
    with pytest.raises(FactlabError, match=">= 1"):
        Schedule([whole, named], [0])
    with pytest.raises(FactlabError, match="seq_len"):
        Schedule([whole, DocStream(enc, L, eos)], [4])


@pytest.mark.parametrize("kind", ["doc", "qa", "mix"])
def test_streams_are_randomly_addressable(kind, tok, enc, enc_qa):
    def make():
        ds = DocStream(enc, L, tok.eos_token_id, seed=3)
        qs = QAStream(enc_qa, L, tok.pad_token_id, seed=4)
        return {"doc": ds, "qa": qs, "mix": Mixture([qs, ds], [0.6, 0.4], seed=5)}[kind]

    s = make()
    spe = s.sequences_per_epoch
    N = 3 * spe + 7  # crosses two epoch boundaries
    big = s.sequences(0, N)
    fresh = make()  # different object, reads far first: same answers
    for start, n in [(N - 9, 9), (spe - 3, 7), (0, 1), (2 * spe - 1, spe + 2), (5, 0)]:
        got = fresh.sequences(start, n)
        for key in ("input_ids", "labels"):
            assert got[key].shape == (n, L)
            assert np.array_equal(got[key], big[key][start:start + n]), (start, n, key)
    assert np.array_equal(s.sequences(0, N)["input_ids"], big["input_ids"])  # repeatable
    with pytest.raises(FactlabError):
        s.sequences(-1, 2)


# ----------------------------------------------------------------------------- QA

def test_qa_encoding_has_exact_prompt_completion_boundary(tok, qa, enc_qa):
    eos = tok.eos_token_id
    assert len(enc_qa) == len(qa)
    for q in range(len(qa)):
        ex = enc_qa.example(q).tolist()
        a0 = int(enc_qa.answer_start[q])
        assert tok.decode(ex[:a0]) == prompt(qa.question[q])
        assert tok.decode(ex[a0:-1]) == completion(qa.answer[q])
        assert ex[:a0] == _ids(tok, prompt(qa.question[q]))
        assert ex[a0:-1] == _ids(tok, completion(qa.answer[q]))
        assert ex[-1] == eos and eos not in ex[:-1]
    assert np.array_equal(enc_qa.person, qa.person)
    assert np.array_equal(enc_qa.attribute, qa.attribute)


def test_qa_stream_packs_whole_examples_with_answer_only_labels(tok, qa, enc_qa):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    s = QAStream(enc_qa, L, pad, seed=7)
    by_tokens = {tuple(enc_qa.example(q).tolist()): q for q in range(len(enc_qa))}
    for e in (0, 1):
        start = sum(s.epoch_size(i) for i in range(e))
        n = s.epoch_size(e)
        got = s.sequences(start, n)
        seen = []
        for ids, lab in zip(got["input_ids"].tolist(), got["labels"].tolist()):
            used = len(ids)
            while used and ids[used - 1] == pad:
                used -= 1
            assert all(x == -100 for x in lab[used:])  # padding takes no loss
            assert eos in ids and ids[used - 1] == eos
            cut = 0
            for end in [i + 1 for i, x in enumerate(ids[:used]) if x == eos]:
                seg, seg_lab = tuple(ids[cut:end]), lab[cut:end]
                q = by_tokens[seg]  # a whole example, never a piece of one
                a0 = int(enc_qa.answer_start[q])
                assert all(x == -100 for x in seg_lab[:a0])
                assert seg_lab[a0:] == list(seg[a0:])
                assert tok.decode(seg_lab[a0:]) == completion(qa.answer[q]) + EOS
                seen.append(q)
                cut = end
            # greedy: the next example would not have fitted into the padding
            if len(seen) < len(enc_qa):
                nxt = int(enc_qa.lengths[s.order(e)[len(seen)]])
                assert used + nxt > L
        assert seen == s.order(e).tolist()  # every example once, in the epoch's order
    assert s.order(0).tolist() != s.order(1).tolist()


def test_unpacked_qa_stream_holds_one_example_per_sequence(tok, qa, enc_qa):
    s = QAStream(enc_qa, L, tok.pad_token_id, seed=2, pack=False)
    assert s.sequences_per_epoch == len(enc_qa) == s.epoch_size(1)
    got = s.sequences(len(enc_qa) - 3, 6)  # crosses the epoch boundary
    want = np.concatenate([s.order(0)[-3:], s.order(1)[:3]])
    for row_ids, row_lab, q in zip(got["input_ids"], got["labels"], want.tolist()):
        ex = enc_qa.example(q)
        n = len(ex)
        assert row_ids[:n].tolist() == ex.tolist() and (row_ids[n:] == tok.pad_token_id).all()
        a0 = int(enc_qa.answer_start[q])
        assert (row_lab[:a0] == -100).all() and (row_lab[n:] == -100).all()
        assert row_lab[a0:n].tolist() == ex[a0:].tolist()


def test_too_long_qa_example_raises(tok, enc_qa):
    longest = int(enc_qa.lengths.max())
    with pytest.raises(FactlabError, match="longer than seq_len"):
        QAStream(enc_qa, longest - 1, tok.pad_token_id, seed=0)
    QAStream(enc_qa, longest, tok.pad_token_id, seed=0)  # exactly fits


# ----------------------------------------------------------------------------- mixture

def test_mixture_draws_by_probability_and_keeps_each_source_in_order(tok, enc, enc_qa):
    qs = QAStream(enc_qa, L, tok.pad_token_id, seed=1)
    ds = DocStream(enc, L, tok.eos_token_id, seed=2)
    m = Mixture([qs, ds], [0.8, 0.2], seed=3)
    n = 5000
    got = m.sequences(0, n)
    is_qa = (got["labels"] == -100).any(axis=1)  # bio sequences are trained everywhere
    frac = is_qa.mean()
    assert 0.77 < frac < 0.83
    nq = int(is_qa.sum())
    assert np.array_equal(got["input_ids"][is_qa], qs.sequences(0, nq)["input_ids"])
    assert np.array_equal(got["labels"][is_qa], qs.sequences(0, nq)["labels"])
    assert np.array_equal(got["input_ids"][~is_qa], ds.sequences(0, n - nq)["input_ids"])
    src, idx = m.sources(0, n)
    assert np.array_equal(src == 0, is_qa)
    assert np.array_equal(idx[is_qa], np.arange(nq))
    other = Mixture([qs, ds], [0.8, 0.2], seed=4).sources(0, n)[0]
    assert not np.array_equal(other, src)
    # far reads agree with the same sequences read from the start
    far = m.sequences(Mixture.BLOCK - 5, 10)
    assert np.array_equal(far["input_ids"], got["input_ids"][Mixture.BLOCK - 5:Mixture.BLOCK + 5])
    with pytest.raises(FactlabError, match="sum to 1"):
        Mixture([qs, ds], [0.8, 0.3], seed=0)
    with pytest.raises(FactlabError, match="seq_len"):
        Mixture([qs, DocStream(enc, L // 2, tok.eos_token_id, seed=0)], [0.5, 0.5], seed=0)


def test_mixture_zero_probability_source_is_never_used(tok, enc, enc_qa):
    qs = QAStream(enc_qa, L, tok.pad_token_id, seed=1)
    ds = DocStream(enc, L, tok.eos_token_id, seed=2)
    src, _ = Mixture([qs, ds], [0.0, 1.0], seed=0).sources(0, 3000)
    assert (src == 1).all()


# ----------------------------------------------------------------------------- first token

def test_first_token_targets_in_bios(world, tok, enc):
    docs = world.bios()
    seq_len = 24  # short: values past the window are dropped
    t = first_token_targets(enc, seq_len)
    vt = enc.value_tok
    expected = int(((vt >= 1) & (vt <= seq_len)).sum())
    assert 0 < len(t) == expected < (vt >= 0).sum()
    assert t.input_ids.shape[0] == len(enc) and t.input_ids.shape[1] <= seq_len
    for i in range(len(t)):
        r, p, d, a = int(t.row[i]), int(t.position[i]), int(t.source[i]), int(t.attribute[i])
        assert d == r and p < t.lengths[r] and p == vt[d, a] - 1
        assert t.input_ids[r, :t.lengths[r]].tolist() == enc.doc(d)[:seq_len].tolist()
        s = docs.spans[d, a, 0]
        piece = tok.decode([int(t.target[i])])
        assert piece.lstrip()[0] == docs.text[d][s]
        assert t.person[i] == docs.person[d]
        # the prefix up to and including position p ends right before the value
        assert len(tok.decode(t.input_ids[r, :p + 1].tolist())) <= s + 1  # + the leading space
    sub = first_token_targets(enc, 512, docs=[3, 1])
    assert sub.input_ids.shape[0] == 2 and set(sub.source.tolist()) == {1, 3}
    assert len(sub) == 12


def test_first_token_targets_in_qa(tok, qa, enc_qa):
    t = qa_first_token_targets(enc_qa)
    assert len(t) == len(qa)
    for q in range(len(qa)):
        p = int(t.position[q])
        row = t.input_ids[q, :t.lengths[q]].tolist()
        assert tok.decode(row[:p + 1]) == prompt(qa.question[q])
        assert t.target[q] == row[p + 1]
        assert completion(qa.answer[q]).startswith(tok.decode([int(t.target[q])]))
    assert np.array_equal(t.attribute, qa.attribute)


def test_mixture_runs_keep_whole_batches_from_one_source(tok, enc, enc_qa):
    qs = QAStream(enc_qa, L, tok.pad_token_id, seed=1, pack=False)
    ds = DocStream(enc, L, tok.eos_token_id, seed=2)
    m = Mixture([qs, ds], [0.8, 0.2], seed=3, run=8)
    n = 8 * 600
    src, idx = m.sources(0, n)
    runs = src.reshape(-1, 8)
    assert (runs == runs[:, :1]).all()  # every batch of 8 is one source
    assert 0.74 < (runs[:, 0] == 0).mean() < 0.86
    for s, stream in ((0, qs), (1, ds)):  # each source read in its own order, no gaps
        rows = np.flatnonzero(src == s)
        assert np.array_equal(idx[rows], np.arange(len(rows)))
        got = m.sequences(0, n)["input_ids"][rows]
        assert np.array_equal(got, stream.sequences(0, len(rows))["input_ids"])
    # a read starting inside a run agrees with the read from the start
    assert np.array_equal(m.sources(13, 40)[1], idx[13:53])
    assert np.array_equal(Mixture([qs, ds], [0.8, 0.2], seed=3).sources(0, 8)[0] == 0,
                          Mixture([qs, ds], [0.8, 0.2], seed=3, run=1).sources(0, 8)[0] == 0)
    with pytest.raises(FactlabError, match="run"):
        Mixture([qs, ds], [0.5, 0.5], run=0)
