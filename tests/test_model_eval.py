"""Model building (factlab.model) and evaluation (factlab.evaluate).

Everything is built in-process: a byte-level BPE trained on a tiny world's text, tiny
random-init models, and one tiny model trained for a few dozen steps on a handful of QA
strings so that its generations depend on the prompt.
"""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from factlab.errors import FactlabError
from factlab.evaluate import (accuracy_by_attribute, attribute_mean, evaluate_qa, exact_match,
                              first_token_accuracy, generate, metrics_from_predictions)
from factlab.model import SIZES, build_model, flops_per_token, load_model
from factlab.text.qa import completion, prompt
from factlab.corpus import CorpusConfig, make_corpus

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts, vocab_size=600):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


@pytest.fixture(scope="module")
def world():
    return make_corpus(CorpusConfig(people=40, seed=5, unknown=0))


@pytest.fixture(scope="module")
def tok(world):
    texts = list(world.bios().text)
    qa = world.qa()
    texts += [prompt(q) + completion(a) for q, a in zip(qa.question, qa.answer)]
    return train_tokenizer(texts)


def tiny(tok, arch="gpt2-rope", seed=0, size="tiny"):
    return build_model(arch, size, len(tok), 64, bos_id=tok.eos_token_id,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=seed)


@pytest.fixture(scope="module")
def trained(world, tok):
    """A tiny model fitted (briefly) to the QA of two people: 12 strings."""
    qa = world.qa(world.train_ids[:2])
    texts = [prompt(q) + completion(a) + EOS for q, a in zip(qa.question, qa.answer)]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    model = tiny(tok, seed=1)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, qa


# ---------------------------------------------------------------------------- model

def test_gpt2_rope_is_sequential_partial_rotary(tok):
    model = tiny(tok)
    cfg = model.config
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert cfg.use_parallel_residual is False
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.rope_parameters["rope_theta"] == 10000
    assert cfg.hidden_dropout == 0 and cfg.attention_dropout == 0
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size,
            cfg.intermediate_size) == (2, 2, 64, 256)
    assert cfg._attn_implementation == "sdpa"
    head = 64 // 2
    layer = model.gpt_neox.layers[0]
    assert layer.attention.rotary_ndims == head // 4
    # rotary frequencies: head/4 dims rotate, base 10000
    inv = model.gpt_neox.rotary_emb.inv_freq
    rot = head // 4
    assert torch.allclose(inv, 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot))

    # behaviour: the MLP's LayerNorm reads x + attn(x) (sequential), not x (parallel)
    seen = {}
    layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", kw.get(
        "hidden_states", a[0] if a else None)), with_kwargs=True)
    layer.attention.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))
    layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("ln2", a[0]))
    ids = torch.tensor([tok("Anya was born on October 2, 1996.").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert torch.allclose(seen["ln2"], seen["x"] + seen["attn"], atol=1e-6)
    assert not torch.allclose(seen["ln2"], seen["x"], atol=1e-3)


def test_seed_determines_weights(tok):
    a, b, c = tiny(tok, seed=0), tiny(tok, seed=0), tiny(tok, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["gpt_neox.embed_in.weight"], sc["gpt_neox.embed_in.weight"])
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    # the caller's RNG is not consumed by building a model
    torch.manual_seed(7)
    x = torch.rand(3)
    torch.manual_seed(7)
    tiny(tok)
    assert torch.equal(torch.rand(3), x)


def test_llama_and_sizes(tok):
    m = tiny(tok, arch="llama", seed=2)
    assert type(m).__name__ == "LlamaForCausalLM"
    assert (m.config.num_hidden_layers, m.config.hidden_size, m.config.intermediate_size) == (2, 64, 256)
    assert m.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tok))
    custom = tiny(tok, size={"layers": 3, "heads": 4, "width": 64})
    assert custom.config.num_hidden_layers == 3 and custom.config.num_attention_heads == 4
    assert set(SIZES) >= {"tiny", "small", "gpt2-small", "gpt2-302m"}
    assert SIZES["gpt2-302m"] == {"layers": 12, "heads": 20, "width": 1280}
    with pytest.raises(FactlabError, match="huge.*tiny.*small"):
        tiny(tok, size="huge")
    with pytest.raises(FactlabError, match="gpt3.*gpt2-rope.*llama"):
        tiny(tok, arch="gpt3")
    with pytest.raises(FactlabError, match="depth"):
        tiny(tok, size={"layers": 2, "heads": 2, "width": 64, "depth": 3})


def test_flops_per_token(tok):
    m = tiny(tok)
    n = sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()
    assert flops_per_token(m, 64) == 6 * n + 12 * 2 * 64 * 64


def test_save_load_roundtrip(tok, tmp_path):
    model = tiny(tok, seed=3)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "m")
    ids = torch.tensor([tok("What is the birth city of Anya?\nAnswer:").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    with pytest.raises(FactlabError, match="nope"):
        load_model(tmp_path / "nope")


# ----------------------------------------------------------------------- generation

def one_at_a_time(model, tok, prompts, max_new_tokens):
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p).input_ids])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        out.append(tok.decode(new, clean_up_tokenization_spaces=False))
    return out


def test_batched_generation_equals_one_at_a_time(trained, world, tok):
    model, qa = trained
    other = world.qa(world.test_ids[:2])
    prompts = ([prompt(q) for q in qa.question[::2]] + [prompt(q) for q in other.question[::3]]
               + ["She", "What is the birth date of", prompt(qa.question[1])])
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert len(set(lengths)) >= 4  # really different lengths -> real left padding
    ref = one_at_a_time(model, tok, prompts, 10)
    assert len(set(ref)) >= 4  # the model's outputs depend on the prompt
    assert tok.padding_side == "right"
    for bs in (3, 64):
        assert generate(model, tok, prompts, max_new_tokens=10, batch_size=bs) == ref
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was
    beams = generate(model, tok, prompts, max_new_tokens=10, batch_size=4, num_beams=2)
    assert len(beams) == len(prompts) and all(isinstance(b, str) for b in beams)
    assert generate(model, tok, []) == []


def test_exact_match_is_whole_string():
    preds = [" Princeton, NJ", " Princeton", " Princeton, NJ, USA", "Princeton, NJ", " Meta"]
    golds = [" Princeton, NJ"] * 4 + [" Meta Platforms"]
    assert exact_match(preds, golds).tolist() == [True, False, False, False, False]
    acc = accuracy_by_attribute([True, False, True, True], ["b", "a", "a", "b"])
    assert acc == {"b": 1.0, "a": 0.5} and list(acc) == ["b", "a"]
    assert attribute_mean(acc) == 0.75
    recs = [{"prediction": p, "answer": g[1:], "attribute": "x", "correct": True}
            for p, g in zip(preds, golds)]
    m = metrics_from_predictions(recs)  # the stored "correct" flag is not trusted
    assert m["exact_match"] == 0.2 and m["n"] == 5 and m["per_attribute"] == {"x": 0.2}


def test_evaluate_qa_and_recomputed_metrics(trained, world, tok):
    model, qa_train = trained
    qa = world.qa(np.concatenate([world.train_ids[:2], world.test_ids[:1]]))
    metrics, recs = evaluate_qa(model, tok, qa, batch_size=5)
    assert metrics["n"] == len(qa) == len(recs) == 18
    assert [r["question"] for r in recs] == qa.question  # original order
    for r, p, a in zip(recs, qa.person.tolist(), qa.attribute.tolist()):
        assert r["person"] == p and r["attribute"] == qa.attributes[a]
        assert r["correct"] == (r["prediction"] == " " + r["answer"])
    assert 0 < metrics["exact_match"] < 1  # fitted people right, an unseen one not all
    assert set(metrics["per_attribute"]) == set(qa.attributes)
    assert metrics == metrics_from_predictions(recs)
    expected = np.mean([r["correct"] for r in recs])
    assert metrics["exact_match"] == pytest.approx(expected)


# ------------------------------------------------------------------- first token

def test_first_token_accuracy_matches_hand_argmax(trained, tok):
    model, _ = trained
    texts = ["What is the birth city of", "She was born", "Which university did",
             "He worked at a company in New York"]
    seqs = [np.array(tok(t).input_ids) for t in texts]
    positions, targets, expected = [], [], []
    rng = np.random.default_rng(0)
    for s in seqs:
        with torch.no_grad():
            arg = model(torch.tensor(s[None])).logits[0].argmax(-1).numpy()
        p = rng.choice(len(s), size=min(3, len(s)), replace=False)
        right = rng.random(len(p)) < 0.5
        t = np.where(right, arg[p], (arg[p] + 1) % len(tok))
        positions.append(p)
        targets.append(t)
        expected.extend(right.tolist())
    got = first_token_accuracy(model, seqs, positions, targets, batch_size=2)
    assert got.dtype == bool and got.tolist() == expected
    assert 0 < sum(expected) < len(expected)
    with pytest.raises(FactlabError):
        first_token_accuracy(model, seqs[:1], [np.array([len(seqs[0])])], [np.array([1])])
