"""Memory tuning: train a ``MemoryModel``'s banks on the one loop until every fact is
recalled exactly.

One fact per sequence (packing would let the model copy an answer from the window), loss
on the answer tokens and EOS only. The fused LM loss already yields, for every row, its
max-token NLL and whether every answer token is its position's argmax
(``LMOutput.row_max_nll`` / ``row_all_argmax``); a fact is **done** when its max-token NLL
is below ``tau`` and every token is the argmax (exactly: greedy decoding reproduces the
answer's tokens). The sampler (``next_batch``, deterministic in the step and the saved
flags) draws facts that are not done, and revisits done ones at rate ``revisit`` so that
they stay done (a revisited fact that slipped is marked not done again); when fewer facts
are left than a batch holds, the batch shrinks (``shrink``) to them plus their share of
revisits, instead of filling up with done facts. The run stops
(``loop.stop()``) when every fact is done, or at the step budget. Exposures per fact are
counted. Flags set from training batches describe the model *before* each update, and a
later update can undo an earlier fact; so when every flag says done, all facts are scored
again on the current model (teacher-forced, ``factlab.evaluate.score``: cheap, no
generation) and the run stops only if they still all are; otherwise the slipped facts go
back into the sampler. State (flags, exposures, last NLL) is plugin state: a killed run
resumes exactly.

With a key gate (``MemoryModel(gate="keys")``) the facts' questions are written into the
gate's codebook at setup (those not already there), so the banks act on them and on
nothing else.

Parameter groups: the value rows (sparse, by the sparse-row optimizer at ``value_lr``),
the routers (dense, ``router_lr``; frozen from the start with ``hash`` routing and after
``pin_steps`` steps with ``pinned``), the gates (dense). Negatives (``negatives``: encoded
QA of facts the bank must not answer, with the backbone's own answers as targets) teach the
gates and banks to leave other questions alone: ``negative_fraction`` of every batch.
"""

from __future__ import annotations

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.train.plugins import Plugin


class MemoryTuning(Plugin):
    name = "memory"

    def __init__(self, facts, seq_len: int, pad_id: int, *, tau: float = 0.05,
                 revisit: float = 0.1, value_lr: float = 0.05, router_lr: float = 1e-3,
                 gate_lr: float = 1e-3, pin_steps: int = 200, seed: int = 0,
                 negatives=None, negative_fraction: float = 0.0, minutes: float | None = None,
                 shrink: bool = True):
        if not tau > 0:
            raise FactlabError(f"memory tuning: tau must be > 0, got {tau}")
        if not 0 <= revisit < 1 or not 0 <= negative_fraction < 1:
            raise FactlabError("memory tuning: revisit and negative_fraction must be in [0, 1)")
        if negative_fraction and negatives is None:
            raise FactlabError("memory tuning: negative_fraction > 0 needs negatives")
        lens = facts.lengths
        if len(lens) == 0:
            raise FactlabError("memory tuning: no facts")
        if (lens > seq_len).any():
            q = int(np.flatnonzero(lens > seq_len)[0])
            raise FactlabError(f"memory tuning: fact {q} is {int(lens[q])} tokens, longer than "
                               f"the context ({seq_len})")
        self.facts, self.seq_len, self.pad_id = facts, int(seq_len), int(pad_id)
        self.tau, self.revisit, self.seed = float(tau), float(revisit), int(seed)
        self.value_lr, self.router_lr, self.gate_lr = value_lr, router_lr, gate_lr
        self.pin_steps = int(pin_steps)
        self.shrink = bool(shrink)
        self.minutes, self._t0 = minutes, None  # a wall-time budget for the tuning
        self.negatives, self.negative_fraction = negatives, float(negative_fraction)
        n = len(lens)
        self.fid = np.asarray(facts.example_id, dtype=np.int64)
        self._pos = {int(f): i for i, f in enumerate(self.fid.tolist())}
        self.done = np.zeros(n, dtype=bool)
        self.exposures = np.zeros(n, dtype=np.int64)
        self.max_nll = np.full(n, np.inf)
        self.done_at = np.full(n, -1, dtype=np.int64)  # exposures when first done

    # ------------------------------------------------------------------- setup
    def setup(self, loop) -> None:
        from factlab.memory.model import MemoryModel

        if not isinstance(loop.model, MemoryModel):
            raise FactlabError(f"MemoryTuning trains a MemoryModel, got {type(loop.model).__name__}")
        if loop.model.keygate is not None:  # deterministic: a resumed run writes the same
            loop.model.write_keys(self.facts)
            sc = loop.model.question_scores(self.facts)
            shut = int((sc < loop.model.radius).sum())
            if shut:
                raise FactlabError(
                    f"memory tuning: {shut} of {len(sc)} facts' own questions fall outside the "
                    f"key gate's radius {loop.model.radius:.6f} (lowest score {sc.min():.6f}): "
                    f"the bank would never see them; lower the radius")

    def trainable(self, loop):
        m = loop.model
        groups = [{"params": m.value_parameters(), "sparse": True, "lr": self.value_lr,
                   "name": "memory values"}]
        if m.kw["routing"] != "hash":
            groups.append({"params": m.router_parameters(), "lr": self.router_lr,
                           "weight_decay": 0.0, "name": "memory routers"})
        if m.gate:
            groups.append({"params": m.gate_parameters(), "lr": self.gate_lr,
                           "weight_decay": 0.0, "name": "memory gates"})
        return groups

    # ------------------------------------------------------------------ sampler
    def choose(self, step: int, n: int) -> tuple[np.ndarray, int]:
        """(positions of the facts of this step's batch, how many negatives to add)."""
        g = np.random.default_rng([self.seed, step])
        neg = int(g.binomial(n, self.negative_fraction)) if self.negative_fraction else 0
        todo, done = np.flatnonzero(~self.done), np.flatnonzero(self.done)
        m = n - neg
        if len(todo) and self.shrink:  # few facts left: a smaller batch, not one of revisits
            m = max(1, min(m, int(np.ceil(len(todo) / (1 - self.revisit)))))
        k_re = int(g.binomial(m, self.revisit)) if len(done) else 0
        k_re = max(k_re, m - len(todo)) if len(done) else 0  # none done: a smaller batch
        pick = [g.choice(todo, min(m - k_re, len(todo)), replace=False)] if len(todo) else []
        if k_re:
            pick.append(g.choice(done, k_re, replace=k_re > len(done)))
        return np.concatenate(pick).astype(np.int64) if pick else np.zeros(0, np.int64), neg

    def _rows(self, enc, idx, tag: int):
        from factlab.tokens.streams import QAStream

        s = QAStream(enc.take(idx), self.seq_len, self.pad_id, seed=0, pack=False)
        b = s.sequences(0, len(idx))
        b["negative"] = np.full(len(idx), tag, dtype=np.int64)
        return b

    def next_batch(self, loop, step: int, batch: dict) -> dict:
        if loop.model.kw["routing"] == "pinned" and step >= self.pin_steps:
            loop.model.freeze_routing()  # idempotent; a resumed run re-pins here
        n = int(batch["input_ids"].shape[0])
        pos, neg = self.choose(step, n)
        parts = [self._rows(self.facts, pos, 0)]
        if neg:
            g = np.random.default_rng([self.seed, step, 1])
            parts.append(self._rows(self.negatives, g.integers(0, len(self.negatives), neg), 1))
        keys = parts[0].keys()
        return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in keys}

    # -------------------------------------------------------------- bookkeeping
    def extra_loss(self, loop, batch, out):
        if out is None:
            return None
        fact = (batch["negative"] == 0).cpu().numpy()
        ids = batch["example_id"].cpu().numpy()[fact]
        pos = np.array([self._pos[int(f)] for f in ids.tolist()], dtype=np.int64)
        mx = out.row_max_nll().detach().cpu().numpy()[fact]
        ok = out.row_all_argmax().cpu().numpy()[fact]
        np.add.at(self.exposures, pos, 1)
        self.max_nll[pos] = mx
        now = (mx < self.tau) & ok
        first = now & (self.done_at[pos] < 0)
        self.done_at[pos[first]] = self.exposures[pos[first]]
        self.done[pos] = now
        return None

    def verify(self, model) -> np.ndarray:
        """Score every fact on ``model`` now; refresh and return the done flags."""
        from factlab.evaluate.score import score_encoded

        sc = score_encoded(model, self.facts, batch_size=256)
        self.max_nll = sc.max_nll.astype(np.float64)
        self.done = (sc.max_nll < self.tau) & sc.all_argmax
        return self.done

    def after_step(self, loop, step: int, logs: dict) -> None:
        import time

        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self.minutes is not None and time.perf_counter() - self._t0 > 60 * self.minutes:
            loop.stop()
        if self.done.all():
            was = loop.model.training
            self.verify(loop.model)
            loop.model.train(was)
            logs["verified"] = int(self.done.sum())
            if self.done.all():
                loop.stop()
        logs["facts_done"] = int(self.done.sum())
        logs["exposures_mean"] = float(self.exposures.mean())

    def progress_text(self) -> str:
        return (f"facts {int(self.done.sum())}/{len(self.done)} "
                f"exposures {self.exposures.mean():.1f}/fact")

    def summary(self) -> dict:
        return {"facts": int(len(self.done)), "done": int(self.done.sum()),
                "exposures_mean": float(self.exposures.mean()),
                "exposures_max": int(self.exposures.max()),
                "exposures_to_done_mean": float(self.done_at[self.done_at >= 0].mean())
                if (self.done_at >= 0).any() else None}

    def state_dict(self) -> dict:
        return {"done": torch.from_numpy(self.done.copy()),
                "exposures": torch.from_numpy(self.exposures.copy()),
                "max_nll": torch.from_numpy(self.max_nll.copy()),
                "done_at": torch.from_numpy(self.done_at.copy())}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.done = state["done"].numpy().copy()
            self.exposures = state["exposures"].numpy().copy()
            self.max_nll = state["max_nll"].numpy().copy()
            self.done_at = state["done_at"].numpy().copy()
