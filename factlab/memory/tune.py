"""Memory tuning: train a ``MemoryModel``'s banks on the one loop until every fact is
recalled exactly.

One fact per sequence (packing would let the model copy an answer from the window), loss
on the answer tokens and EOS only. The fused LM loss already yields, for every row, its
max-token NLL and whether every answer token is its position's argmax
(``LMOutput.row_max_nll`` / ``row_all_argmax``); a fact is **done** when its max-token NLL
is below ``tau`` and every token is the argmax (exactly: greedy decoding reproduces the
answer's tokens). With ``tau_margin`` < 1 the sampler trains each fact to below
``tau * tau_margin`` (its training flag), so that later updates of shared rows that nudge
it up leave it under ``tau``; the stopping check is always against ``tau``. The sampler (``next_batch``, deterministic in the step and the saved
flags) draws facts that are not done, and revisits done ones at rate ``revisit`` so that
they stay done (a revisited fact that slipped is marked not done again); when fewer facts
are left than a batch holds, the batch shrinks (``shrink``) to them plus their share of
revisits, instead of filling up with done facts. The run stops
(``loop.stop()``) when every fact is done, or at the step budget. Exposures per fact are
counted, and every step adds a row to the trace (``trace_rows``: mean exposures, the
fractions done and greedy-right, percentiles of the facts' max-token NLL). Flags set
from training batches describe the model *before* each update, and a later update can
undo an earlier fact; so when every flag says done, all facts are scored again on the
current model (teacher-forced, ``factlab.evaluate.score``: cheap, no
generation) and the run stops only if they still all are (and at the budget's last step,
time or steps, they are scored once more, so the flags a run ends with are the final
model's); otherwise the slipped facts go
back into the sampler, and the next check waits at least as many steps as one pass over
the facts in scope takes at the full batch (near the end, facts whose loss sits at ``tau``
flip between done and not; re-scoring all of them after every step cost 2,000 facts more
than half of a 10-minute run). State (flags, exposures, last NLL) is plugin state: a killed run
resumes exactly.

With a key gate (``MemoryModel(gate="keys")``) the facts' questions are written into the
gate's codebook at setup (those not already there), so the banks act on them and on
nothing else.

Parameter groups: the value rows (sparse, by the sparse-row optimizer at ``value_lr``),
the routers (dense, ``router_lr``; frozen from the start with ``hash`` routing and after
``pin_steps`` steps with ``pinned``), the gates (dense). Negatives (``negatives``: encoded
QA of facts the bank must not answer, with the backbone's own answers as targets) teach the
gates and banks to leave other questions alone: ``negative_fraction`` of every batch.

Sequential writes (lifelong editing, ``writes=[positions of write 1, write 2, ...]``): the
plugin runs under the experience driver, one experience per write. Experience t writes
its facts' keys, then trains only them (``replay=True``: done facts of every earlier write
are revisited too, and retrained if they slipped); the routers count steps over the whole
stream (pinned after ``pin_steps`` steps in all), and with ``radius_from`` (the key-layer
states of validation questions the bank must not answer) the key gate's radius is chosen
again after each write against the keys stored so far (``pick_radius``): it only rises,
so a stored question never falls outside it.
"""

from __future__ import annotations

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.train.plugins import Plugin


TRACE_COLUMNS = ("step", "exposures_mean", "seen", "done", "argmax", "nll_p10", "nll_p50",
                 "nll_p90", "nll_max")


class MemoryTuning(Plugin):
    name = "memory"

    def __init__(self, facts, seq_len: int, pad_id: int, *, tau: float = 0.05,
                 revisit: float = 0.1, value_lr: float = 0.05, router_lr: float = 1e-3,
                 gate_lr: float = 1e-3, pin_steps: int = 200, seed: int = 0,
                 expert_lr: float = 0.01,
                 negatives=None, negative_fraction: float = 0.0, minutes: float | None = None,
                 shrink: bool = True, writes=None, replay: bool = False, radius_from=None,
                 radius_margin: float = 0.5, tau_margin: float = 1.0):
        if not tau > 0:
            raise FactlabError(f"memory tuning: tau must be > 0, got {tau}")
        if not 0 < tau_margin <= 1:
            raise FactlabError(f"memory tuning: tau_margin must be in (0, 1], got {tau_margin}")
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
        self.tau_margin = float(tau_margin)
        self.value_lr, self.router_lr, self.gate_lr = value_lr, router_lr, gate_lr
        self.expert_lr = float(expert_lr)
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
        self.argmax = np.zeros(n, dtype=bool)  # every answer token the argmax (greedy-right)
        self.trace: list[list[float]] = []  # one row per step: TRACE_COLUMNS
        self.writes = None if writes is None else [np.asarray(w, dtype=np.int64) for w in writes]
        if self.writes is not None:
            flat = np.concatenate(self.writes) if self.writes else np.zeros(0, np.int64)
            if not self.writes or any(len(w) == 0 for w in self.writes) or \
                    sorted(flat.tolist()) != list(range(n)):
                raise FactlabError("memory tuning: writes must split the facts' positions "
                                   "into non-empty parts, each fact in exactly one")
        self.replay, self.radius_from = bool(replay), radius_from
        self.radius_margin = float(radius_margin)
        self.write = 0  # the write being trained (0: all facts at once)
        self.active = np.ones(n, dtype=bool)  # the facts of this write
        self.written = np.ones(n, dtype=bool)  # every fact written so far
        self.steps_total = 0  # optimizer steps over all writes (pinning counts these)
        self.completed = 0  # writes finished (the driver's experiences)
        self.next_verify = 0  # the first step (over all writes) a re-scoring may run
        self._batch_rows = 1  # rows of a full batch (the loop's), for the gap between checks
        self._model = None

    @property
    def scope(self) -> np.ndarray:
        """The facts this write trains and checks: its own, with ``replay`` every one
        written so far."""
        return self.written if self.replay else self.active

    def _activate(self, t: int) -> None:
        if not 1 <= t <= len(self.writes):
            raise FactlabError(f"memory tuning: experience {t} of {len(self.writes)} writes")
        self.write = t
        self.active[:] = False
        self.active[self.writes[t - 1]] = True
        self.written[:] = False
        self.written[np.concatenate(self.writes[:t])] = True

    # ------------------------------------------------------------------- setup
    def setup(self, loop) -> None:
        from factlab.memory.model import MemoryModel

        if not isinstance(loop.model, MemoryModel):
            raise FactlabError(f"MemoryTuning trains a MemoryModel, got {type(loop.model).__name__}")
        self._model = loop.model
        enc = self.facts
        if self.writes is not None:
            if not getattr(loop, "experience", None):
                raise FactlabError("memory tuning with writes runs under the experience "
                                   "driver (one experience per write)")
            self._activate(int(loop.experience))
            enc = self.facts.take(self.writes[self.write - 1])
        eg = getattr(loop.model, "entgate", None)
        if eg is not None and len(eg) != len(enc):
            raise FactlabError(f"memory tuning: the entity gate holds {len(eg)} keys for "
                               f"{len(enc)} facts; write them first (memory.entity."
                               f"write_entity_gate), one write of every fact")
        if loop.model.keygate is not None:  # deterministic: a resumed run writes the same
            loop.model.write_keys(enc)
            if self.radius_from is not None:  # against the keys stored so far
                from factlab.memory.gate import pick_radius

                # more keys, a higher nearest-key cosine for every negative: it only rises
                # (the max keeps it so through float rounding of the growing products)
                neg = loop.model.keygate.match(self.radius_from).cpu().numpy()
                r = pick_radius(neg, self.radius_margin)
                loop.model.radius = max(r, loop.model.radius) if self.write > 1 else r
            sc = loop.model.question_scores(enc)
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
        if m.expert_parameters():  # PEER's down vectors, at their own (small) lr: the
            # values' lr on them swings every selected expert's activation (it diverged)
            groups.append({"params": m.expert_parameters(), "sparse": True,
                           "lr": self.expert_lr, "name": "memory experts"})
        if m.kw["routing"] not in ("hash", "key"):  # key routing has no router
            groups.append({"params": m.router_parameters(), "lr": self.router_lr,
                           "weight_decay": 0.0, "name": "memory routers"})
        if m.gate:
            groups.append({"params": m.gate_parameters(), "lr": self.gate_lr,
                           "weight_decay": 0.0, "name": "memory gates"})
        return groups

    # ------------------------------------------------------------------ sampler
    def choose(self, step: int, n: int) -> tuple[np.ndarray, int]:
        """(positions of the facts of this step's batch, how many negatives to add)."""
        g = np.random.default_rng([self.seed, step] if not self.write else
                                  [self.seed, self.write, step])
        neg = int(g.binomial(n, self.negative_fraction)) if self.negative_fraction else 0
        scope = self.scope
        todo, done = np.flatnonzero(scope & ~self.done), np.flatnonzero(scope & self.done)
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
        if loop.model.kw["routing"] == "pinned" and self.steps_total + step >= self.pin_steps:
            loop.model.freeze_routing()  # idempotent; a resumed run re-pins here
        n = int(batch["input_ids"].shape[0])
        self._batch_rows = n
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
        now = (mx < self.tau * self.tau_margin) & ok
        first = now & (self.done_at[pos] < 0)
        self.done_at[pos[first]] = self.exposures[pos[first]]
        self.done[pos] = now
        self.argmax[pos] = ok
        return None

    def verify(self, model) -> np.ndarray:
        """Score the facts in scope (every fact, unless writes are sequential) on
        ``model`` now; refresh their done flags and return them."""
        from factlab.evaluate.score import score_encoded

        idx = np.flatnonzero(self.scope)
        enc = self.facts if len(idx) == len(self.done) else self.facts.take(idx)
        sc = score_encoded(model, enc, batch_size=256)
        self.max_nll[idx] = sc.max_nll.astype(np.float64)
        ok = (sc.max_nll < self.tau) & sc.all_argmax
        # all under tau: done. Else the slipped facts, and with tau_margin < 1 those within
        # the margin too, go back to the sampler (trained to under tau * tau_margin)
        self.done[idx] = ok if ok.all() else \
            (sc.max_nll < self.tau * self.tau_margin) & sc.all_argmax
        self.argmax[idx] = sc.all_argmax
        return ok

    def after_step(self, loop, step: int, logs: dict) -> None:
        import time

        if self._t0 is None:
            self._t0 = time.perf_counter()
        over = self.minutes is not None and time.perf_counter() - self._t0 > 60 * self.minutes
        if over:
            loop.stop()
        # the budget's last step (time or steps): the flags are refreshed on the final
        # model, so that "done" in the summary and in the saved state is what greedy
        # decoding of the tuned model gives, not a training batch's view of an earlier one
        last = over or step + 1 >= loop.cfg.steps
        at = self.steps_total + step
        if (self.done[self.scope].all() and at >= self.next_verify) or last:
            was = loop.model.training
            ok = self.verify(loop.model)
            loop.model.train(was)
            logs["verified"] = int(ok.sum())
            if ok.all():
                loop.stop()
            elif last:
                self.done[np.flatnonzero(self.scope)] = ok
            else:  # one pass over the scope at the full batch before the next check
                self.next_verify = at + max(1, -(-len(ok) // self._batch_rows))
        logs["facts_done"] = int(self.done.sum())
        logs["exposures_mean"] = float(self.exposures.mean())
        self._record(self.steps_total + step)

    def _record(self, step: int) -> None:
        """The trace's row for this step, over the facts in scope: mean exposures, the
        fractions seen / done / greedy-right (all argmax, from the loss), and percentiles
        of the max-token NLL of the facts seen (each fact's latest)."""
        sc = self.scope
        nll = self.max_nll[sc]
        seen = np.isfinite(nll)
        q = np.percentile(nll[seen], [10, 50, 90]).tolist() if seen.any() else [np.nan] * 3
        self.trace.append([float(step), float(self.exposures[sc].mean()), float(seen.mean()),
                           float(self.done[sc].mean()), float(self.argmax[sc].mean()), *q,
                           float(nll[seen].max()) if seen.any() else np.nan])

    def trace_rows(self, limit: int = 400) -> list[dict]:
        """The trace as dicts, at most ``limit`` rows (evenly spaced, the last kept)."""
        t = self.trace
        if len(t) > limit:
            keep = np.unique(np.linspace(0, len(t) - 1, limit).round().astype(int))
            t = [t[i] for i in keep]
        return [dict(zip(TRACE_COLUMNS, r)) for r in t]

    def after_experience(self, loop, t: int) -> None:
        self.steps_total += int(loop.step)
        self.completed = int(t)

    def progress_text(self) -> str:
        w = f"write {self.write}/{len(self.writes)} " if self.writes is not None else ""
        return (f"{w}facts {int(self.done.sum())}/{len(self.done)} "
                f"exposures {self.exposures.mean():.1f}/fact")

    def summary(self) -> dict:
        return {"facts": int(len(self.done)), "done": int(self.done.sum()),
                "exposures_mean": float(self.exposures.mean()),
                "exposures_max": int(self.exposures.max()),
                "exposures_to_done_mean": float(self.done_at[self.done_at >= 0].mean())
                if (self.done_at >= 0).any() else None}

    def state_dict(self) -> dict:
        st = {"done": torch.from_numpy(self.done.copy()),
              "exposures": torch.from_numpy(self.exposures.copy()),
              "max_nll": torch.from_numpy(self.max_nll.copy()),
              "done_at": torch.from_numpy(self.done_at.copy()),
              "argmax": torch.from_numpy(self.argmax.copy()),
              "trace": torch.tensor(self.trace, dtype=torch.float64).reshape(
                  -1, len(TRACE_COLUMNS)),
              "steps_total": torch.tensor(self.steps_total),
              "completed": torch.tensor(self.completed),
              "next_verify": torch.tensor(self.next_verify)}
        kg = getattr(self._model, "keygate", None)
        if kg is not None:  # the codebook is a buffer (in the trainable state); its radius
            st["radius"] = torch.tensor(kg.radius, dtype=torch.float64)  # is not
        return st

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.done = state["done"].numpy().copy()
            self.exposures = state["exposures"].numpy().copy()
            self.max_nll = state["max_nll"].numpy().copy()
            self.done_at = state["done_at"].numpy().copy()
            if "argmax" in state:  # checkpoints written before the trace have neither
                self.argmax = state["argmax"].numpy().copy()
                self.trace = state["trace"].tolist()
            self.steps_total = int(state.get("steps_total", torch.tensor(0)))
            self.completed = int(state.get("completed", torch.tensor(0)))
            self.next_verify = int(state.get("next_verify", torch.tensor(0)))
            kg = getattr(self._model, "keygate", None)
            if kg is not None and "radius" in state:
                kg.radius = float(state["radius"])
