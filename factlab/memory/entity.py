"""The entity gate: open the bank when a question is about a stored *entity* and asks a
stored *relation*, however it is phrased.

The key gate (``memory/gate.py``) keys each fact by one state, the last token of its
question, and opens only within a radius of it: a paraphrase of a stored question is
farther from its own key than a never-stored name asked the stored question is from some
key, so no radius tells them apart (``docs/memory.md``, measured on SmolLM2: 0% of
paraphrases open). The entity gate splits the decision in two, the way the probe in
``docs/memory.md`` ("Entity, then relation") measured it:

1. **Entity.** Each fact's key is the backbone's state at the last token of its subject's
   name in the stored question, at an early-middle layer (``entity_layer``; by default 0.3 of
   the depth, where the name's state still identifies the person: later it
   does not), centred by the stored keys' mean. A query's entity score for relation r at
   position t is the best cosine of any of its positions <= t with any key of relation r.
2. **Relation.** At the deepest layer (``relation_layer``), a logistic-regression test per
   stored relation, fitted at write time on the last-token states of the stored questions
   and of the same questions about other names (positive) against other relations asked
   about other names and general questions (negative).

The gate decides only where an answer begins: at a position whose last tokens are the
prompt format's end-of-question marker (``suffix``: ``"\nAnswer:"``, or the chat
template's assistant header), the same tokens for every phrasing. There it opens if, for
some relation r, both the entity score is >= ``radius`` and the relation test passes its
threshold; the fact read is the key that gave the entity score (with key routing, its own
value rows, offset from that position), so a paraphrase reaches the stored question's
rows at the same offsets. (Measured without the marker rule on SmolLM2: 9% of
paraphrases opened early, at their "?", and read their rows misaligned.) It opens only in
a fresh forward (a prompt), never during the cached steps of generation. Thresholds come
from validation prompts only (:func:`write_entity_gate`).

The logistic regression is fitted here with L-BFGS in torch (a few hundred states by the
width; scikit-learn is not a dependency for one convex fit).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from factlab.errors import FactlabError


class EntityGate(nn.Module):
    """Entity keys (one per stored fact, each tagged with its relation) and one relation
    test per stored relation. All state is buffers: saved with the model."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, dim))  # centred, L2-normalised
        self.register_buffer("key_rel", torch.zeros(0, dtype=torch.long))
        self.register_buffer("centre", torch.zeros(dim))
        self.register_buffer("radius", torch.tensor(1.0))
        # relation tests: logit_r(h) = ((h - mu) / sd) . W_r + b_r, pass if >= thr_r
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.register_buffer("W", torch.zeros(0, dim))
        self.register_buffer("b", torch.zeros(0))
        self.register_buffer("thr", torch.zeros(0))
        # the prompt format's end-of-question tokens: the only positions the gate opens at
        self.register_buffer("suffix", torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def relations(self) -> int:
        return int(self.W.shape[0])

    # --------------------------------------------------------------------- writing
    def add(self, states: torch.Tensor, rel) -> None:
        """Store entity keys: ``states`` (n, dim) at the names' last tokens, ``rel`` (n,)
        the relation of each fact. The centre is the first write's mean (kept after, so
        that earlier keys stay comparable)."""
        x = states.detach().float().to(self.keys.device)
        rel = torch.as_tensor(np.asarray(rel), dtype=torch.long, device=self.keys.device)
        if len(rel) != len(x):
            raise FactlabError(f"entity gate: {len(x)} keys but {len(rel)} relations")
        if not len(self) and len(x) > 1:
            self.centre = x.mean(0)
        self.keys = torch.cat([self.keys, F.normalize(x - self.centre, dim=-1)])
        self.key_rel = torch.cat([self.key_rel, rel])

    def fit_relations(self, states: torch.Tensor, labels, l2: float = 1e-2,
                      steps: int = 200) -> None:
        """One-vs-rest logistic regressions: ``labels[i]`` is the relation index of
        state i, or -1 for none of them. Classes are weighted to balance."""
        x = states.detach().float().cpu()
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        R = int(y.max()) + 1 if len(y) else 0
        if R < 1:
            raise FactlabError("entity gate: no positive questions to fit the relation test on")
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-4)
        z = (x - mu) / sd
        W, b = torch.zeros(R, x.shape[1]), torch.zeros(R)
        for r in range(R):
            t = (y == r).float()
            if t.sum() == 0 or t.sum() == len(t):
                raise FactlabError(f"entity gate: relation {r} has no "
                                   f"{'positive' if t.sum() == 0 else 'negative'} questions")
            wt = torch.where(t > 0, 0.5 / t.sum(), 0.5 / (1 - t).sum())
            w = torch.zeros(x.shape[1], requires_grad=True)
            c = torch.zeros(1, requires_grad=True)
            opt = torch.optim.LBFGS([w, c], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

            def closure(w=w, c=c, t=t, wt=wt):
                opt.zero_grad()
                loss = (wt * F.binary_cross_entropy_with_logits(z @ w + c, t,
                                                                reduction="none")).sum() \
                    + 0.5 * l2 * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
            W[r], b[r] = w.detach(), c.detach()
        dev = self.keys.device
        self.mu, self.sd, self.W, self.b = mu.to(dev), sd.to(dev), W.to(dev), b.to(dev)
        self.thr = torch.zeros(R, device=dev)

    def at_suffix(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: positions whose last ``len(suffix)`` tokens are the suffix."""
        k = len(self.suffix)
        B, T = ids.shape
        ok = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
        if k == 0 or T < k:
            return ok
        suf = self.suffix.to(ids.device)
        m = torch.ones(B, T - k + 1, dtype=torch.bool, device=ids.device)
        for j in range(k):
            m &= ids[:, j:T - k + 1 + j] == suf[j]
        ok[:, k - 1:] = m
        return ok

    def set_thresholds(self, radius: float, thr) -> None:
        self.radius = torch.tensor(float(radius), device=self.keys.device)
        self.thr = torch.as_tensor(np.asarray(thr, dtype=np.float32), device=self.keys.device)

    # --------------------------------------------------------------------- reading
    def entity_scores(self, h: torch.Tensor, chunk: int = 16384):
        """For every position of ``h`` (..., dim): the best cosine with any key of each
        relation, (..., R), and that key's index (-1 where a relation has no key)."""
        lead, R = h.shape[:-1], self.relations
        x = F.normalize(h.reshape(-1, h.shape[-1]).float() - self.centre, dim=-1)
        best = torch.full((x.shape[0], R), -1.0, device=h.device)
        arg = torch.full((x.shape[0], R), -1, dtype=torch.long, device=h.device)
        for s in range(0, len(self), chunk):
            c = x @ self.keys[s:s + chunk].T  # (N, k)
            rel = self.key_rel[s:s + chunk]
            for r in range(R):
                cols = (rel == r).nonzero().squeeze(-1)
                if not len(cols):
                    continue
                v, i = c.index_select(1, cols).max(-1)
                better = v > best[:, r]
                best[:, r] = torch.where(better, v, best[:, r])
                arg[:, r] = torch.where(better, cols[i] + s, arg[:, r])
        return best.view(*lead, R), arg.view(*lead, R)

    def relation_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., R): each relation test's logit at every position."""
        return ((h.float() - self.mu) / self.sd) @ self.W.T + self.b

    def decide(self, ent_best, ent_arg, logits):
        """Per position (B, T): does the gate open there, and with which key. ``ent_best``
        / ``ent_arg`` are already the running best over earlier positions."""
        ok = (ent_best >= self.radius) & (logits >= self.thr)  # (B, T, R)
        margin = torch.where(ok, logits - self.thr, torch.full_like(logits, -float("inf")))
        r = margin.argmax(-1, keepdim=True)
        return ok.any(-1), ent_arg.gather(-1, r).squeeze(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
        for k in ("keys", "key_rel", "W", "b", "thr", "suffix"):  # sizes are the saved ones
            v = state_dict.get(prefix + k)
            if v is not None:
                setattr(self, k, torch.empty_like(v, device=getattr(self, k).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)


def running_best(best: torch.Tensor, arg: torch.Tensor):
    """Running max over positions (dim 1) of ``best`` (B, T, R), with the matching
    ``arg``."""
    v, at = best.cummax(dim=1)
    return v, arg.gather(1, at)


def threshold_above(negatives, positives_min: float | None = None, margin: float = 0.0):
    """A threshold just above the highest validation negative, ``margin`` of the way to
    the lowest positive (or to 1 for cosines when ``positives_min`` is None)."""
    s = np.asarray(negatives, dtype=np.float64)
    if not len(s):
        raise FactlabError("entity gate: no validation negatives to set a threshold from")
    top = float(s.max())
    hi = 1.0 if positives_min is None else float(positives_min)
    return top + max(0.0, margin * (hi - top)) + 1e-6


def format_suffix(tokenizer, prompt_format: str = "plain") -> list[int]:
    """The tokens every prompt of this format ends with, whatever the question (the
    common suffix of a few unlike questions' prompts)."""
    from factlab.tokens.encode import _encode_ids
    from factlab.tokens.prompts import prompt_text

    probes = ["What is it?", "Tell me the colour of the sky.", "x y z", "Who?"]
    flat, lens = _encode_ids(tokenizer, [prompt_text(q, tokenizer, prompt_format)
                                         for q in probes])
    seqs = np.split(flat, np.cumsum(lens)[:-1])
    k = 0
    while k < min(map(len, seqs)) and len({int(x[-1 - k]) for x in seqs}) == 1:
        k += 1
    if not k:
        raise FactlabError(f"gate=entity: prompts of format {prompt_format!r} end in no common "
                           f"tokens; the gate could not tell where an answer begins")
    return [int(t) for t in seqs[0][len(seqs[0]) - k:]]


def subject_end_tokens(tokenizer, questions, names, prompt_format: str = "plain") -> np.ndarray:
    """The index, within each prompt's tokens (as ``encode_qa`` makes them), of the last
    token of the subject's name in it (-1 where the name is not in the question)."""
    from factlab.tokens.prompts import prompt_text

    bt = getattr(tokenizer, "backend_tokenizer", None)
    out = np.full(len(questions), -1, dtype=np.int64)
    for i, (q, nm) in enumerate(zip(questions, names)):
        p = prompt_text(q, tokenizer, prompt_format)
        at, inner = p.rfind(q), q.rfind(nm)
        if at < 0 or inner < 0:
            continue
        end = at + inner + len(nm)  # one past the name's last character
        if bt is not None:
            offs = bt.encode(p, add_special_tokens=False).offsets
        else:
            try:
                offs = tokenizer(p, add_special_tokens=False,
                                 return_offsets_mapping=True)["offset_mapping"]
            except (NotImplementedError, ValueError, KeyError) as e:
                raise FactlabError("gate=entity needs a fast tokenizer (character offsets "
                                   "locate each fact's subject)") from e
        starts = [s for s, _ in offs]
        out[i] = int(np.searchsorted(np.asarray(starts), end, side="left")) - 1
    return out


def write_entity_gate(m, tok, facts, names, *, fit_positive=None,
                      fit_negative=(), entity_negative=(), prompt_format: str = "plain",
                      entity_margin: float = 0.0, relation_margin: float = 0.0,
                      entity_quantile: float = 1.0) -> dict:
    """Write ``facts`` (a ``QA``; ``names[facts.person[i]]`` the subject of fact i) into
    the entity gate of ``m`` (``MemoryModel(gate="entity")``), fit its relation tests and
    set its thresholds:

    - entity keys: the states at each fact's name's last token;
    - relation tests: positive = the stored questions and ``fit_positive`` (the stored
      relations asked about other names; its ``attribute`` indexes ``facts.attributes``),
      at the prompt's last token; negative = every QA of
      ``fit_negative`` (other relations, general questions) at its last token;
    - thresholds, on validation prompts only: the entity radius just above the best entity
      score of any ``entity_negative`` prompt (never-stored names, general questions; with
      ``entity_quantile`` < 1, above that quantile of them instead), the
      relation thresholds just above the relation test's negatives.

    Then every stored question must open the gate at its prompt's last token with its own
    key (else the bank would never see it): checked, a clear error if not. Returns the
    thresholds and counts for the report."""
    from factlab.memory.model import prompt_tokens
    from factlab.tokens.encode import encode_qa

    if m.entgate is None:
        raise FactlabError("write_entity_gate: the memory model has no entity gate "
                           "(gate='entity')")
    if len(m.entgate):
        raise FactlabError("write_entity_gate: keys are already stored (one write only)")
    if not 0 < entity_quantile <= 1:
        raise FactlabError(f"gate=entity: entity_quantile must be in (0, 1], got "
                           f"{entity_quantile}")
    present = sorted(set(np.asarray(facts.attribute).tolist()))
    rel_of = {a: r for r, a in enumerate(present)}
    enc = encode_qa(tok, facts, prompt_format)
    if len(enc) * m.span > m.banks[0].slots:
        raise FactlabError(f"memory bank full: {len(enc):,} stored questions x span {m.span} "
                           f"slots need more than the bank's {m.banks[0].slots:,} (raise n_keys)")
    prompts = prompt_tokens(enc)
    subj = subject_end_tokens(tok, facts.question, [names[int(p)] for p in facts.person],
                              prompt_format)
    if (subj < 0).any():
        i = int(np.flatnonzero(subj < 0)[0])
        raise FactlabError(f"gate=entity: fact {i}'s question {facts.question[i]!r} does not "
                           f"contain its subject {names[int(facts.person[i])]!r}")
    rel = np.array([rel_of[int(a)] for a in facts.attribute])
    el, rl = m.entity_layer, m.key_layer
    suffix = format_suffix(tok, prompt_format)
    k = len(suffix)
    if any(len(p) < k or p[len(p) - k:].tolist() != suffix for p in prompts):
        raise FactlabError(f"gate=entity: a stored prompt does not end with the "
                           f"{prompt_format} format's end-of-question tokens {suffix}")
    m.entgate.suffix = torch.tensor(suffix, dtype=torch.long, device=m.entgate.keys.device)
    # --- the relation tests, on each prompt's last token (the only place the gate opens):
    # the stored questions first, then the stored relations about other names, then the
    # negatives
    P, Y = list(prompts), list(rel)
    n_fit_pos = 0
    if fit_positive is not None and len(fit_positive):
        keep = [i for i in range(len(fit_positive)) if int(fit_positive.attribute[i]) in rel_of]
        fp = prompt_tokens(encode_qa(tok, fit_positive, prompt_format))
        P += [fp[i] for i in keep]
        Y += [rel_of[int(fit_positive.attribute[i])] for i in keep]
        n_fit_pos = len(keep)
    n_neg = 0
    for qa in fit_negative:
        neg = prompt_tokens(encode_qa(tok, qa, prompt_format))
        P += neg
        Y += [-1] * len(neg)
        n_neg += len(neg)
    Y = np.asarray(Y)
    states = m.layer_states(P, {rl: [[len(p) - 1] for p in P]})[rl]
    m.entgate.fit_relations(states, Y)
    logits = m.entgate.relation_logits(states.to(m.entgate.W.device)).cpu()
    thr, neg_open = [], []
    n_stored = len(prompts)  # the first rows of the fit: the stored questions
    for r in range(len(present)):
        pos = logits[torch.as_tensor(Y == r), r]
        neg = logits[torch.as_tensor(Y != r), r]
        t = threshold_above(neg.numpy(), float(pos.min()), relation_margin)
        # every stored question must open: the threshold never rises above the lowest of
        # them (then some fit negatives pass too: reported)
        own = logits[:n_stored][torch.as_tensor(rel == r), r]
        t = min(t, float(own.min()) - 1e-4)
        thr.append(t)
        neg_open.append(float((neg >= t).float().mean()))
    # --- entity keys, at the names' last tokens
    ek = m.layer_states(prompts, {el: [np.array([int(e)]) for e in subj]})[el]
    m.entgate.add(ek, rel)
    # --- the entity radius: above every validation negative's best score
    neg_prompts = [p for qa in entity_negative for p in prompt_tokens(encode_qa(tok, qa,
                                                                          prompt_format))]
    if not neg_prompts:
        raise FactlabError("gate=entity: no validation prompts to set the entity radius on")
    ent_neg = m.entity_scores(neg_prompts)
    top = [float(np.quantile(ent_neg, entity_quantile))] if entity_quantile < 1 else ent_neg
    radius = min(threshold_above(top, None, entity_margin), 1.0 - 1e-5)
    m.entgate.set_thresholds(radius, thr)
    # --- every stored question opens at its last token, on its own key
    at, kid = m.openings(prompts)
    last = np.array([len(p) - 1 for p in prompts])
    bad = np.flatnonzero((at != last) | (kid != np.arange(len(prompts))))
    if len(bad):
        i = int(bad[0])
        raise FactlabError(
            f"gate=entity: {len(bad)} of {len(prompts)} stored questions do not open the gate "
            f"at their last token with their own key (first: {facts.question[i]!r} opens at "
            f"{int(at[i])} of {int(last[i])}, key {int(kid[i])}); the bank would not read "
            f"them (duplicate subjects, or a relation test that fires early)")
    return {"radius": float(m.entgate.radius),  # as stored (fp32)
            "relation_thresholds": [float(t) for t in m.entgate.thr],
            "relations": [facts.attributes[a] for a in present],
            "entity_negatives_max": float(ent_neg.max()),
            "relation_fit_negatives_open": neg_open,
            "fit": {"positives": len(prompts) + n_fit_pos, "negatives": n_neg}}
