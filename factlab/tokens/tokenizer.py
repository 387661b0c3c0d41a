"""Tokenizers: a byte-level BPE trained on a world's own text, or a local pretrained one.

Why train one: the paper's models see only bios and QA, so a small vocabulary fitted to
that text (a few thousand merges) keeps sequences short and the embedding table small.
Byte-level BPE means nothing is ever out of vocabulary (every byte is a base token), and
``add_prefix_space=False`` keeps the text exactly as rendered, so character spans of
attribute values map onto token offsets without any shift.

No network: tokenizers are trained in-process with HF ``tokenizers`` and loaded from
local directories only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from factlab.errors import FactlabError

EOS = "<|endoftext|>"  # ends every document / QA example; also the bos token
PAD = "<|pad|>"  # fills the tail of packed QA sequences (never trained on)


def _wrap(tok):
    """A ``tokenizers.Tokenizer`` as a transformers fast tokenizer with our specials."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, padding_side="right",
                                   clean_up_tokenization_spaces=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE on ``texts`` and return it as a
    ``transformers.PreTrainedTokenizerFast``.

    Specials: :data:`EOS` (id 0, also ``bos_token``) and :data:`PAD` (id 1). No
    post-processor, so encoding never inserts specials on its own: callers append EOS
    where the data format needs it. Deterministic: the same texts give the same vocab
    and merges (the trainer breaks count ties by token ids, not by hash order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise FactlabError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                           f"(needs at least 258: 256 bytes + 2 specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_strings(texts), trainer=trainer)
    return _wrap(tok)


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise FactlabError(f"train_tokenizer: expected str texts, got {type(t).__name__}")
        yield t


def world_texts(world) -> Iterator[str]:
    """Everything a world's models read: all bios, the P_train QA (prompt + completion)
    and the held-out paraphrase questions, so every question word is in the vocabulary."""
    from factlab.text.qa import completion, prompt, training_qa

    # bios with the space encode_docs puts before them (see tokens.encode.doc_prefix)
    yield from (" " + t for t in world.bios().text)
    train = training_qa(world)
    for q, a in zip(train.question, train.answer):
        yield prompt(q) + completion(a)
    # The paraphrases' wording comes from a handful of templates; one person's full set
    # covers every phrasing (names are already in the bios), and keeps the held-out
    # questions from weighting the merges.
    if len(world.people):
        para = world.qa([0], paraphrase=True, all_paraphrases=True)
        for q in para.question:
            yield prompt(q)


def world_tokenizer(world, vocab_size: int = 4096):
    """A byte-level BPE trained on the texts of ``world`` (see :func:`world_texts`)."""
    return train_tokenizer(world_texts(world), vocab_size=vocab_size)


def load_tokenizer(path):
    """A saved tokenizer (``save_pretrained`` directory or a local model's) loaded offline.

    A tokenizer without a pad token gets ``pad = eos`` (pretrained causal LMs often have
    none). A missing path is a :class:`FactlabError` naming it.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise FactlabError(f"tokenizer not found: {p}")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        raise FactlabError(f"cannot load a tokenizer from {p}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FactlabError(f"tokenizer at {p} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
