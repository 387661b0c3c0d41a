"""Batched generation with a KV cache, and QA exact-match evaluation on top of it.

HF ``model.generate`` already keeps a KV cache; what makes evaluation fast is calling it on
batches rather than one question at a time, and sorting the prompts by token length first
so a batch holds prompts of (nearly) the same length and wastes little on padding.
Prompts are **left**-padded (generation appends on the right; ``generate`` derives the
position ids from the attention mask, so a padded prompt sees the same positions as an
unpadded one). Padding is done here by hand, so the caller's tokenizer is never mutated.
"""

from __future__ import annotations

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.evaluate.metrics import metrics_from_arrays


def _special_ids(model, tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise FactlabError("generation needs an EOS token: the tokenizer and the model "
                           "config have none")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos  # left padding is masked out, so any id works; EOS is always there
    return int(eos), int(pad)


def _completion_text(tokenizer, ids: list[int], eos: int) -> str:
    """Decode generated ids up to (not including) the first EOS, without any clean-up."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16,
             batch_size: int = 64, num_beams: int = 1) -> list[str]:
    """The completion of every prompt (greedy or beam search), in the input order.

    Each string is the raw decoded continuation with the EOS and everything after it
    removed; nothing else is stripped (a QA completion starts with a space).
    """
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise FactlabError("batch_size, num_beams and max_new_tokens must be >= 1")
    prompts = list(prompts)
    if not prompts:
        return []
    eos, pad = _special_ids(model, tokenizer)
    # the tokenizer's own special tokens (a BOS, if its post-processor adds one) are kept,
    # so prompts are encoded exactly as tokenizer(text) encodes them anywhere else
    enc = tokenizer(prompts)["input_ids"]
    lengths = np.array([len(e) for e in enc])
    if (lengths == 0).any():
        i = int(np.flatnonzero(lengths == 0)[0])
        raise FactlabError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
    # longest first: the biggest batch runs first, so an out-of-memory shows at once
    order = np.argsort(-lengths, kind="stable")
    out: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    device = model.device
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = int(lengths[idx].max())
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx.tolist()):  # left padding
                    n = len(enc[i])
                    ids[row, width - n:] = torch.tensor(enc[i], dtype=torch.long)
                    mask[row, width - n:] = 1
                gen = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                    num_return_sequences=1, eos_token_id=eos, pad_token_id=pad,
                    use_cache=True,
                )
                new = gen[:, width:].tolist()
                for row, i in enumerate(idx.tolist()):
                    out[i] = _completion_text(tokenizer, new[row], eos)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def evaluate_qa(model, tokenizer, qa, *, batch_size: int = 64, num_beams: int = 1,
                max_new_tokens: int | None = None,
                prompt_format: str = "plain") -> tuple[dict, list[dict]]:
    """Exact-match QA accuracy: overall, per attribute, and one record per question.

    A prediction is correct only if the whole generated completion (up to EOS) equals
    ``" " + answer``: a prefix of the answer, or extra text before EOS, is wrong.
    ``max_new_tokens`` defaults to the longest gold completion in tokens + 4.
    """
    from factlab.tokens.prompts import completion_text, prompt_text

    golds = [completion_text(a, prompt_format) for a in qa.answer]
    if max_new_tokens is None:
        longest = max((len(t) for t in tokenizer(golds, add_special_tokens=False)["input_ids"]),
                      default=0)
        max_new_tokens = longest + 4
    preds = generate(model, tokenizer, [prompt_text(q, tokenizer, prompt_format)
                                        for q in qa.question],
                     max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams)
    attrs = [qa.attributes[int(a)] for a in np.asarray(qa.attribute).tolist()]
    metrics, correct = metrics_from_arrays(preds, golds, attrs)
    records = [
        {"person": int(p), "attribute": attr, "question": q, "answer": a,
         "prediction": pred, "correct": bool(c)}
        for p, attr, q, a, pred, c in zip(np.asarray(qa.person).tolist(), attrs, qa.question,
                                          qa.answer, preds, correct.tolist())
    ]
    return metrics, records


def qa_evaluator(tokenizer, qa, *, batch_size: int = 64, num_beams: int = 1,
                 prompt_format: str = "plain"):
    """An evaluation set for ``factlab.train.experiences.Driver``: ``fn(model) ->
    (exact match, records)`` over the questions of ``qa``."""
    def evaluate(model):
        metrics, records = evaluate_qa(model, tokenizer, qa, batch_size=batch_size,
                                       num_beams=num_beams, prompt_format=prompt_format)
        return metrics["exact_match"], records

    return evaluate
