"""Tokens: a tokenizer trained on the world (or a local pretrained one), documents and QA
encoded as flat token arrays, and the randomly addressable streams a training run reads
(globally shuffled bio packing, whole-example QA packing with answer-only labels,
per-sequence mixtures of sources). Pure numpy apart from the tokenizer itself."""

from factlab.tokens.data import (IGNORE, DocStream, EncodedDocs, EncodedQA, FirstTokenTargets,
                                 Mixture, QAStream, Schedule, encode_docs, encode_qa,
                                 first_token_targets, qa_first_token_targets)
from factlab.tokens.tokenizer import (EOS, PAD, load_tokenizer, train_tokenizer, world_texts,
                                      world_tokenizer)

__all__ = ["EOS", "IGNORE", "PAD", "DocStream", "EncodedDocs", "EncodedQA", "FirstTokenTargets",
           "Mixture", "QAStream", "Schedule", "encode_docs", "encode_qa", "first_token_targets",
           "load_tokenizer", "qa_first_token_targets", "train_tokenizer", "world_texts",
           "world_tokenizer"]
