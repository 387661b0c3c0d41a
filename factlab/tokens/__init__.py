"""Tokens: a tokenizer trained on the world (or a local pretrained one), documents and QA
encoded as ragged token arrays, and the randomly addressable streams a training run reads.
Pure numpy apart from the tokenizer itself.

- ``ragged``: the base of every encoding -- flat ids + offsets + per-item columns
  (``example_id`` among them), with ``take`` and ``concat``.
- ``encode``: ``EncodedDocs`` / ``EncodedQA`` and the functions that tokenize into them.
- ``streams``: ``DocStream`` (globally shuffled bio packing: concatenated, whole, named)
  and ``QAStream`` (whole-example QA packing, answer-only labels); the batch contract
  (``input_ids``, ``labels``, per-row ``example_id``, ``model_inputs``).
- ``mixing``: ``Mixture``, ``Schedule``, ``Tagged`` -- streams of streams keeping every key.
- ``first_token``: first-token targets in bios and QA answers.
"""

from factlab.tokens.encode import EncodedDocs, EncodedQA, doc_prefix, encode_docs, encode_qa
from factlab.tokens.first_token import (FirstTokenTargets, first_token_targets,
                                        qa_first_token_targets)
from factlab.tokens.mixing import Mixture, Schedule, Tagged, batch_keys, model_inputs
from factlab.tokens.ragged import Ragged
from factlab.tokens.streams import IGNORE, MODEL_INPUTS, DocStream, QAStream
from factlab.tokens.tokenizer import (EOS, PAD, load_tokenizer, train_tokenizer, world_texts,
                                      world_tokenizer)

__all__ = ["EOS", "IGNORE", "MODEL_INPUTS", "PAD", "DocStream", "EncodedDocs", "EncodedQA",
           "FirstTokenTargets", "Mixture", "QAStream", "Ragged", "Schedule", "Tagged",
           "batch_keys", "doc_prefix", "encode_docs", "encode_qa", "first_token_targets",
           "load_tokenizer", "model_inputs", "qa_first_token_targets", "train_tokenizer",
           "world_texts", "world_tokenizer"]
