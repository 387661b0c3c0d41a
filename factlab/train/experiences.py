"""A sequence of experiences, each trained by one ``Loop``, with every evaluation set
scored before any training and again after each (or every k-th) experience.

    driver = Driver(model, [Experience("cohort1", stream1, cfg1), ...],
                    {"base": eval_base, "cohort1": eval_c1, ...}, OUT, plugins=[...])
    R = driver.run()        # R["rows"][t]["acc"][set]: accuracy after experience t

An evaluation set is a callable ``fn(model) -> (accuracy, records or None)`` (e.g.
``factlab.evaluate.generate.qa_evaluator``); the driver never tells the model which
experience a question came from.

For experience t = 1..T the driver builds a ``Loop`` (``loop.driver`` is the driver,
``loop.experience`` is t), calls every plugin's ``before_experience(loop, t)`` (which may
replace ``loop.stream``: replay, joint, cumulative), runs the loop, calls
``after_experience(loop, t)`` (e.g. EWC's Fisher), and at every ``eval_every``-th
experience and the last saves its state, then scores every set (row t).

    OUT/
      R.json                  sets, experiences, and one row per evaluated t (row 0 first)
      predictions/t{t}_{set}.jsonl   the records each evaluation returned
      state/                  after the last evaluated t: trainable weights (frozen
                              backbone by fingerprint), plugin states after
                              after_experience -- written aside, then renamed
      exp{t}-{name}/          the loop of experience t (metrics.jsonl; its checkpoints
                              while it runs)
      model/                  the final model (export)

Resuming: the state of the last evaluated experience s is loaded and experiences s+1.. are
trained again (deterministically: a loop killed part-way resumes from its own timed
checkpoint); row t is written only after state t, so a killed run resumes at the first
unwritten row. The cheap path for long streams (1,000 single-fact writes): ``eval_every=k``
scores and saves every k-th experience only, loops keep no checkpoint once finished, and
nothing is exported per experience.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from factlab.errors import FactlabError
from factlab.io import atomic_write_text, write_jsonl
from factlab.train.checkpoint import frozen_fingerprint, load_trainable, save_trainable
from factlab.train.config import TrainConfig
from factlab.train.loop import Loop, export_model


@dataclass
class Experience:
    """One experience: what to train on (a stream) and how (its own train config)."""

    name: str
    stream: object
    cfg: TrainConfig


class Driver:
    def __init__(self, model, experiences: Sequence[Experience],
                 evals: Mapping[str, Callable], out: str | Path, *, plugins=(),
                 eval_every: int = 1, tokenizer=None, progress: bool = True,
                 export: bool = True, accelerator=None):
        if not experiences:
            raise FactlabError("a driver needs at least one experience")
        if eval_every < 1:
            raise FactlabError(f"eval_every must be >= 1, got {eval_every}")
        names = [e.name for e in experiences]
        if len(set(names)) != len(names):
            raise FactlabError(f"experience names must be unique, got {names}")
        self.model, self.experiences, self.evals = model, list(experiences), dict(evals)
        self.out, self.plugins, self.eval_every = Path(out), list(plugins), int(eval_every)
        self.tokenizer, self.progress, self.export = tokenizer, progress, export
        self.accelerator = accelerator
        self.R: dict = {}
        self.seconds: dict[str, float] = {"train": 0.0, "eval": 0.0}

    @property
    def T(self) -> int:
        return len(self.experiences)

    def evaluated(self, t: int) -> bool:
        return t == 0 or t == self.T or t % self.eval_every == 0

    # ------------------------------------------------------------------ files
    def _init_R(self) -> dict:
        head = {"sets": list(self.evals), "experiences": [e.name for e in self.experiences],
                "eval_every": self.eval_every}
        f = self.out / "R.json"
        if f.is_file():
            R = json.loads(f.read_text(encoding="utf-8"))
            if {k: R.get(k) for k in head} != head:
                raise FactlabError(f"{self.out} holds a run of other experiences or "
                                   f"evaluation sets; use another directory")
            return R
        return {**head, "rows": []}

    def _write_R(self) -> None:
        rows = self.R["rows"]
        self.R["matrix"] = [[r["acc"][s] for s in self.R["sets"]] for r in rows]
        self.R["t"] = [r["t"] for r in rows]
        atomic_write_text(self.out / "R.json", json.dumps(self.R, indent=1) + "\n")

    def _state_dir(self) -> Path:
        return self.out / "state"

    def _save_state(self, t: int) -> None:
        tmp = self.out / ".state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        params = self._params(t)
        save_trainable(self.model, tmp / "model.safetensors", params)
        torch.save({"t": t, "plugins": {p.name: p.state_dict() for p in self.plugins},
                    "frozen": frozen_fingerprint(self.model, params=params)}, tmp / "driver.pt")
        old = self.out / ".state.old"
        shutil.rmtree(old, ignore_errors=True)
        if self._state_dir().exists():
            os.replace(self._state_dir(), old)
        os.replace(tmp, self._state_dir())
        shutil.rmtree(old, ignore_errors=True)

    def _load_state(self) -> int:
        old = self.out / ".state.old"
        if not self._state_dir().exists() and (old / "driver.pt").is_file():
            os.replace(old, self._state_dir())  # killed between the two renames of a save
        f = self._state_dir() / "driver.pt"
        if not f.is_file():
            return 0
        st = torch.load(f, weights_only=True, map_location="cpu")
        # LoRA and other setup-time wrappers must exist before their weights load
        stub = _Stub(self, min(int(st["t"]) + 1, self.T))
        for p in self.plugins:
            p.setup(stub)
        load_trainable(self.model, self._state_dir() / "model.safetensors", st.get("frozen"),
                       self._params(int(st["t"])))
        for p in self.plugins:
            p.load_state_dict(st["plugins"].get(p.name, {}))
        return int(st["t"])

    def _params(self, upto: int = 1) -> list:
        """What the plugins train (as the loop groups it) in any of experiences 1..``upto``:
        what a state after experience ``upto`` holds. A method whose trainable set changes
        with the experience (a new adapter or new prompt components per experience, the
        earlier ones frozen) keeps every experience's in its states."""
        from factlab.train.optim import param_groups

        out, seen = [], set()
        for t in range(1, max(1, min(upto, self.T)) + 1):
            stub = _Stub(self, t)
            groups = param_groups([(p.name, p.trainable(stub)) for p in self.plugins],
                                  self.model.parameters(), self.experiences[t - 1].cfg)
            for g in groups:
                for q in g["params"]:
                    if id(q) not in seen:
                        seen.add(id(q))
                        out.append(q)
        return out

    # -------------------------------------------------------------------- run
    def _evaluate(self, t: int) -> None:
        t0 = time.perf_counter()
        was = self.model.training
        self.model.eval()
        acc = {}
        try:
            for name, fn in self.evals.items():
                score, records = fn(self.model)
                acc[name] = float(score)
                if records is not None:
                    write_jsonl(self.out / "predictions" / f"t{t}_{name}.jsonl", records)
        finally:
            self.model.train(was)
        dt = time.perf_counter() - t0
        self.seconds["eval"] += dt
        exp = self.experiences[t - 1].name if t else None
        self.R["rows"] = [r for r in self.R["rows"] if r["t"] < t] + \
            [{"t": t, "experience": exp, "acc": acc, "eval_seconds": dt}]
        self._write_R()

    def run(self) -> dict:
        from accelerate import PartialState

        if PartialState().num_processes > 1:
            raise FactlabError("the experience driver runs in one process (its state, rows "
                               "and predictions are not yet written by rank 0 alone)")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "predictions").mkdir(exist_ok=True)
        self.R = self._init_R()
        done = self._load_state()
        written = {r["t"] for r in self.R["rows"]}
        if 0 not in written:
            if done:
                raise FactlabError(f"{self.out}: state after experience {done} but no row 0")
            self._evaluate(0)
        if done and done not in written:  # killed between the state and its row
            self._evaluate(done)
        for t in range(done + 1, self.T + 1):
            exp = self.experiences[t - 1]
            loop = Loop(self.model, exp.stream, exp.cfg, self.out / f"exp{t}-{_safe(exp.name)}",
                        plugins=self.plugins, tokenizer=self.tokenizer, progress=self.progress,
                        accelerator=self.accelerator, name=f"exp {t}/{self.T} {exp.name}",
                        export=False, keep_checkpoint=False)
            loop.driver, loop.experience = self, t
            t0 = time.perf_counter()
            for p in self.plugins:
                p.before_experience(loop, t)
            loop.run()
            self.accelerator = loop.accelerator
            self.model = loop.model
            for p in self.plugins:
                p.after_experience(loop, t)
            self.seconds["train"] += time.perf_counter() - t0
            if self.evaluated(t):
                self._save_state(t)
                self._evaluate(t)
        if self.export and not (self.out / "model").is_dir():
            export_model(self.model, self.out / "model", plugins=self.plugins,
                         tokenizer=self.tokenizer)
        return self.R


class _Stub:
    """What a plugin's ``setup`` / ``trainable`` see when the driver restores state before
    any loop: the driver, the model and the fields of the loop of experience ``t``."""

    def __init__(self, driver: Driver, t: int):
        exp = driver.experiences[t - 1]
        self.driver, self.experience, self.name = driver, t, f"restore {exp.name}"
        self.cfg, self.stream, self.tokenizer = exp.cfg, exp.stream, driver.tokenizer
        self.out = driver.out / f"exp{t}-{_safe(exp.name)}"
        self.accelerator, self.plugins, self.step = driver.accelerator, driver.plugins, 0
        object.__setattr__(self, "_d", driver)

    @property
    def model(self):
        return self._d.model

    @model.setter
    def model(self, m):
        self._d.model = m


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "+-_.=" else "_" for ch in name)
