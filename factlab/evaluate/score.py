"""Teacher-forced scoring of given answers: how likely the model finds each one, and
whether greedy decoding would produce it, without generating.

Each (question, answer) pair is tokenized exactly as training tokenizes it
(:func:`factlab.tokens.encode_qa`: ``prompt(question)`` and ``completion(answer)`` apart,
then EOS), and one forward pass over the whole example reads, at every answer position,
the NLL of the answer token and whether it is the argmax. The answer tokens include the
final EOS, so "every answer token is the argmax" is exactly "greedy decoding reproduces this
tokenization of the answer and stops": memory tuning can call a fact done, and
hallucination calibration, stale-answer rates and locality can rank answers, at the cost
of one forward per batch instead of a generation loop.

Examples are sorted by length and **right**-padded (a causal model's real tokens never see
the padding on their right, and their position ids stay ``0..n-1`` as unpadded), so neither
padding nor batch size changes a number beyond float rounding.

The output head runs only on the answer positions: a forward pre-hook on
``model.get_output_embeddings()`` replaces the (B, L, d) hidden states by the (n, d) rows
that predict an answer token, so a 50k vocabulary costs (n x V) logits, not (B x L x V)
(the same selection as ``factlab/train/lm_loss.py``). A model whose head cannot be hooked
(no ``get_output_embeddings``, or logits that do not come from it) is scored from its full
logits instead; the numbers are the same.

Ties: ``all_argmax`` uses ``torch.argmax``, which returns the lowest id among exactly
tied maxima, as HF greedy decoding does; an answer token exactly tied with a lower id
therefore does not count as the argmax. (Cached decoding and this full forward round
differently, so a near-tie may still go either way; exact ties are vanishingly rare in
fp32.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.tokens import EncodedQA, encode_qa
from factlab.train.lm_loss import output_head


@dataclass
class Scores:
    """Per-example scores of the answer tokens (completion tokens + EOS), input order."""

    nll: np.ndarray  # (N,) float64: total NLL of the answer tokens, EOS included
    max_nll: np.ndarray  # (N,) float64: NLL of the least likely answer token
    n_tokens: np.ndarray  # (N,) int64: answer tokens scored, EOS included
    all_argmax: np.ndarray  # (N,) bool: every answer token is its position's argmax
    # with ``score_encoded(..., argmax=True)``: per example, the argmax token id at each
    # answer position (teacher-forced), for comparing two models token by token
    argmax: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.nll)

    @property
    def logprob(self) -> np.ndarray:
        """Log-probability of the whole answer (EOS included) given the prompt."""
        return -self.nll


@dataclass
class _Pairs:
    """The columns of a QA set that :func:`encode_qa` reads."""

    question: list[str]
    answer: list[str]

    def __len__(self) -> int:
        return len(self.question)

    @property
    def person(self) -> np.ndarray:
        return np.zeros(len(self), np.int32)

    @property
    def attribute(self) -> np.ndarray:
        return np.zeros(len(self), np.int16)


def score_answers(model, tokenizer, questions, answers, *, batch_size: int = 64,
                  prompt_format: str = "plain") -> Scores:
    """Scores of ``answers[i]`` as the answer to ``questions[i]`` (raw question and value
    strings, formatted by ``factlab.text.qa.prompt`` / ``completion`` as in training, or
    the tokenizer's chat template: ``prompt_format``, see ``factlab.tokens.prompts``)."""
    questions, answers = list(questions), list(answers)
    if len(questions) != len(answers):
        raise FactlabError(f"score_answers: {len(questions)} questions but "
                           f"{len(answers)} answers")
    return score_encoded(model, encode_qa(tokenizer, _Pairs(questions, answers), prompt_format),
                         batch_size=batch_size)


def _pad_id(model) -> int:
    """Any id will do (right padding is never attended by real tokens); a real one keeps
    embedding lookups in range."""
    cfg = getattr(model, "config", None)
    for key in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, key, None)
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        if isinstance(v, int) and v >= 0:
            return v
    return 0


def _answer_logits(model, head, ids, mask, sel):
    """(n, V) logits of the positions ``sel`` (B, L) bool; through the hooked head when it
    can be, else None."""
    if head is None:
        return None

    def select(module, args):
        h = args[0]
        if h.dim() != 3 or h.shape[0] != sel.shape[0] or h.shape[1] < sel.shape[1]:
            return None  # not the final hidden states: leave it alone (checked below)
        s = sel
        if h.shape[1] > sel.shape[1]:  # a wrapper prepended positions (a prompt pool)
            s = torch.cat([sel.new_zeros((sel.shape[0], h.shape[1] - sel.shape[1])), sel], 1)
        return (h[s],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        handle.remove()
    n = int(sel.sum())
    return logits if logits.dim() == 2 and logits.shape[0] == n else None


def score_encoded(model, enc: EncodedQA, *, batch_size: int = 64,
                  argmax: bool = False) -> Scores:
    """Scores of pre-encoded examples (``enc.example(q)`` = prompt, answer tokens, EOS;
    the answer starts at ``enc.answer_start[q]``); ``argmax``: also each answer position's
    argmax token (``Scores.argmax``)."""
    if batch_size < 1:
        raise FactlabError("batch_size must be >= 1")
    N = len(enc)
    lengths = np.asarray(enc.lengths, dtype=np.int64)
    start = np.asarray(enc.answer_start, dtype=np.int64)
    if N and (start < 1).any():
        q = int(np.flatnonzero(start < 1)[0])
        raise FactlabError(f"example {q} has an empty prompt: its first answer token has no "
                           f"position to be predicted from")
    if N and (start >= lengths).any():
        q = int(np.flatnonzero(start >= lengths)[0])
        raise FactlabError(f"example {q} has no answer tokens")
    nll = np.zeros(N, np.float64)
    max_nll = np.zeros(N, np.float64)
    n_tokens = lengths - start
    all_argmax = np.zeros(N, bool)
    ids_out: list[np.ndarray] | None = [np.zeros(0, np.int64)] * N if argmax else None
    if N == 0:
        return Scores(nll, max_nll, n_tokens, all_argmax, ids_out)
    pad = _pad_id(model)
    head = output_head(model)
    order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows at once
    was_training = model.training
    model.eval()
    device = model.device
    try:
        with torch.inference_mode():
            for lo in range(0, N, batch_size):
                idx = order[lo:lo + batch_size].tolist()
                width = int(lengths[idx[0]])
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                sel = torch.zeros((len(idx), width), dtype=torch.bool)
                for row, q in enumerate(idx):  # right padding
                    n = int(lengths[q])
                    ids[row, :n] = torch.from_numpy(enc.example(q).astype(np.int64))
                    mask[row, :n] = 1
                    sel[row, int(start[q]) - 1:n - 1] = True  # position t predicts t + 1
                # the answer tokens, row-major like ``sel``: each row's are ids[row, a:n]
                targets = ids[:, 1:][sel[:, :-1]]
                ids, mask = ids.to(device), mask.to(device)
                dsel, targets = sel.to(device), targets.to(device)
                logits = _answer_logits(model, head, ids, mask, dsel)
                if logits is None:  # unhookable head: full logits, then the rows
                    head = None
                    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    logits = full[dsel]
                x = logits.float()
                tok_nll = torch.logsumexp(x, dim=-1) - x.gather(1, targets[:, None])[:, 0]
                top = x.argmax(dim=-1)
                hit = top == targets
                if ids_out is not None:  # row-major like ``sel``: row r's n_tokens[q] ids
                    parts = np.split(top.cpu().numpy(), np.cumsum(n_tokens[idx])[:-1])
                    for q, a in zip(idx, parts):
                        ids_out[q] = a
                rows = torch.repeat_interleave(
                    torch.arange(len(idx)), torch.from_numpy(n_tokens[idx])).to(device)
                B = len(idx)
                tot = torch.zeros(B, dtype=torch.float64, device=device)
                tot.index_add_(0, rows, tok_nll.double())
                mx = torch.full((B,), -torch.inf, dtype=torch.float64, device=device)
                mx.scatter_reduce_(0, rows, tok_nll.double(), reduce="amax")
                miss = torch.zeros(B, dtype=torch.long, device=device)
                miss.index_add_(0, rows, (~hit).long())
                nll[idx] = tot.cpu().numpy()
                max_nll[idx] = mx.cpu().numpy()
                all_argmax[idx] = (miss == 0).cpu().numpy()
    finally:
        model.train(was_training)
    return Scores(nll, max_nll, n_tokens, all_argmax, ids_out)
