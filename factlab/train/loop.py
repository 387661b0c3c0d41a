"""The training loop: one for everything.

Reads top to bottom like nanoGPT's train.py: build the optimizer over whatever the plugins
say is trainable, then for each step fetch a deterministic batch (the stream is addressed
by step, so a resumed run sees exactly the data it would have seen), forward/backward with
gradient accumulation, clip, step, log, evaluate, checkpoint. ``accelerate`` provides the
device, mixed precision and DDP; ``torch.compile`` is optional.

Resuming: ``OUT/checkpoint`` holds the trainable weights (safetensors; a frozen backbone
is recorded by its fingerprint, not written again, see ``factlab.train.checkpoint``) and
``trainer.pt`` (optimizers, schedulers, step, RNG, plugin states). Checkpoints are written
every ``ckpt_minutes`` of training (default 2) and/or every ``ckpt_every`` steps, and at the
end. Running the same config on the same OUT continues from there; on CPU with the same
seed the result equals an uninterrupted run.

The batch contract: a stream returns ``input_ids`` and ``labels`` (B, L) and any number of
1-D per-row columns (``example_id``, ``experience``, ...). Only the keys the stream names
in ``model_inputs`` (default ``input_ids``, ``attention_mask``) reach the model's forward;
the rest is bookkeeping that plugins read (``extra_loss`` gets the whole micro-batch).
``next_batch`` may return more rows than it was given: every row is trained, split over
the ``grad_accum`` micro-batches. ``loop.stop()`` ends the run after the current step and
still checkpoints and exports; a resumed stopped run stays stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.io import atomic_write_text, dumps
from factlab.train.checkpoint import frozen_fingerprint, load_trainable, save_trainable
from factlab.train.config import TrainConfig
from factlab.train.lm_loss import DEFAULT_INPUTS, causal_lm_loss, model_kwargs, output_head
from factlab.train.optim import dense_optimizer, param_groups, sparse_optimizer, state_bytes
from factlab.train.plugins import Plugin

# dense bf16 peak FLOP/s for MFU (per device)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine (or linear) decay from 1 to ``min_lr_ratio``, or constant."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "linear":  # the paper's probes: lr linear to 0
        return 1.0 - (1 - cfg.min_lr_ratio) * min(t, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPU: fp32. bf16 autocast measured 3-7x slower than fp32 on a 2-core Xeon without
    # AMX/avx512_bf16 (small model: 5.4k vs 0.8-1.5k tokens/s); ask for bf16 explicitly
    # on CPUs that have those units.
    return "no"


class Loop:
    """Train ``model`` on ``stream`` (anything with ``sequences(start, n)`` and ``seq_len``).

    ``evaluate(loop, step) -> dict`` runs every ``eval_every`` steps and at the end; its
    numbers are logged with an ``eval/`` prefix. After :meth:`run`, ``loop.model`` is the
    trained (unwrapped) model and ``OUT/model`` its export (plus the tokenizer) unless
    ``export=False`` (the experience driver's cheap path). ``loop.experience`` is the index
    of the experience being trained when a driver runs the loop (else None), and
    ``loop.driver`` the driver.
    """

    def __init__(self, model, stream, cfg: TrainConfig, out: str | Path, *,
                 plugins: Sequence[Plugin] = (), evaluate: Callable | None = None,
                 tokenizer=None, accelerator=None, progress: bool = True,
                 flops_per_token: float | None = None, name: str = "train",
                 export: bool = True, keep_checkpoint: bool = True):
        self.model, self.stream, self.cfg, self.out = model, stream, cfg, Path(out)
        self.plugins, self.evaluate, self.tokenizer = list(plugins), evaluate, tokenizer
        self.accelerator, self.progress, self.name = accelerator, progress, name
        self.flops_per_token = flops_per_token
        self.export, self.keep_checkpoint = export, keep_checkpoint
        self.step = 0
        self.history: list[dict] = []
        self.stopped = False
        self.experience: int | None = None
        self.driver = None
        self.groups: list[dict] = []
        self.params: list = []  # every parameter of the groups: what checkpoints hold
        self.optimizers: list = []
        self._head = None
        self._stop = False

    def stop(self) -> None:
        """End the run after the current optimizer step (e.g. every fact is learned); it
        still checkpoints and exports, and a resume of it does not train on."""
        self._stop = True

    # ------------------------------------------------------------------ setup
    def _accelerator(self):
        from accelerate import Accelerator

        if self.accelerator is None:
            from accelerate.state import AcceleratorState

            # accelerate keeps one global state per process; a later loop with another
            # precision (e.g. fp32 probe after bf16 pretraining) resets it, keeping the
            # process group (PartialState) intact
            AcceleratorState._reset_state(reset_partial_state=False)
            self.accelerator = Accelerator(mixed_precision=_precision(self.cfg),
                                           cpu=not torch.cuda.is_available())
        return self.accelerator

    def _optimizers(self):
        """The plugins' parameter groups, united, stepped by a dense and (for groups
        marked sparse) a sparse-row optimizer; see ``factlab.train.optim``."""
        try:
            self.groups = param_groups([(p.name, p.trainable(self)) for p in self.plugins],
                                       self.model.parameters(), self.cfg)
        except FactlabError as e:
            raise FactlabError(f"{self.name}: {e}") from None
        dense = [g for g in self.groups if not g["sparse"]]
        sparse = [g for g in self.groups if g["sparse"]]
        opts = []
        if dense:
            opts.append(dense_optimizer(dense, self.cfg))
        if sparse:
            if self.accelerator.mixed_precision == "fp16":
                raise FactlabError(f"{self.name}: sparse parameter groups are not supported "
                                   f"under fp16 (one loss scaler would unscale them twice); "
                                   f"use precision=bf16 or no")
            if self.accelerator.num_processes > 1:
                raise FactlabError(f"{self.name}: sparse parameter groups "
                                   f"({', '.join(g['name'] for g in sparse)}) are not "
                                   f"supported with more than one process")
            opts.append(sparse_optimizer(sparse, self.cfg))
        return opts

    # ------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def _save_checkpoint(self, model, opts, scheds) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = self.out / ".checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_trainable(acc.unwrap_model(model), tmp / "model.safetensors", self.params)
            torch.save({"step": self.step, "optimizers": [o.state_dict() for o in opts],
                        "schedulers": [s.state_dict() for s in scheds],
                        "torch_rng": torch.get_rng_state(),
                        "plugins": {p.name: p.state_dict() for p in self.plugins},
                        "history": self.history, "stopped": self.stopped,
                        "frozen": self._fingerprint(model)}, tmp / "trainer.pt")
            old = self.out / ".checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.ckpt_dir.exists():
                os.replace(self.ckpt_dir, old)
            os.replace(tmp, self.ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self._last_ckpt = time.perf_counter()

    def _fingerprint(self, model) -> dict:
        """The frozen part does not change during a run: hash it once (0.35 s per 135M
        fp32 parameters), when first needed."""
        if self._frozen is None:
            self._frozen = frozen_fingerprint(self.accelerator.unwrap_model(model),
                                              params=self.params)
        return self._frozen

    def _resume(self, model, opts, scheds) -> int:
        old = self.out / ".checkpoint.old"
        if not self.ckpt_dir.exists() and (old / "trainer.pt").is_file():
            os.replace(old, self.ckpt_dir)  # killed between the two renames of a save
        state_file = self.ckpt_dir / "trainer.pt"
        if not state_file.is_file():
            return 0
        state = torch.load(state_file, weights_only=True, map_location="cpu")
        load_trainable(self.accelerator.unwrap_model(model), self.ckpt_dir / "model.safetensors",
                       state.get("frozen"), self.params)
        opt_states = state["optimizers"] if "optimizers" in state else [state["optimizer"]]
        sched_states = state["schedulers"] if "schedulers" in state else [state["scheduler"]]
        if len(opt_states) != len(opts):
            raise FactlabError(f"{self.ckpt_dir}: the checkpoint has {len(opt_states)} "
                               f"optimizers, this run builds {len(opts)}")
        for o, st in zip(opts, opt_states):
            o.load_state_dict(st)
        for sc, st in zip(scheds, sched_states):
            sc.load_state_dict(st)
        torch.set_rng_state(state["torch_rng"])
        for p in self.plugins:
            p.load_state_dict(state["plugins"].get(p.name, {}))
        self.history = state["history"]
        self.stopped = bool(state.get("stopped", False))
        self._rewrite_metrics()
        return int(state["step"])

    def _rewrite_metrics(self) -> None:
        if self.accelerator.is_main_process:
            atomic_write_text(self.out / "metrics.jsonl",
                              "".join(dumps(h) + "\n" for h in self.history))

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(dumps(row) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, row["step"])

    # ------------------------------------------------------------------- run
    def run(self) -> list[dict]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        acc = self._accelerator()
        torch.manual_seed(cfg.seed)
        for p in self.plugins:
            p.setup(self)  # idempotent: a driver runs one loop per experience
        self.model.zero_grad(set_to_none=True)  # nothing left from an earlier loop
        opts = self._optimizers()
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, cfg)) for o in opts]
        model, *opts = acc.prepare(self.model, *opts)
        self.params = [p for g in self.groups for p in g["params"]]
        self._frozen = None  # the frozen part's fingerprint, computed at the first save
        self._last_ckpt = time.perf_counter()
        self._stop, self.stopped = False, False
        start = self._resume(model, opts, scheds)
        self.step = start
        self.optimizers = opts
        if start == 0 and acc.is_main_process:  # a fresh start: no rows of an earlier try
            atomic_write_text(self.out / "metrics.jsonl", "")
        dense_params = [p for g in self.groups if not g["sparse"] for p in g["params"]]
        inputs = frozenset(getattr(self.stream, "model_inputs", DEFAULT_INPUTS))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out / "tb")) if acc.is_main_process else None
        except Exception:  # tensorboard is an optional extra
            self._tb = None
        fwd = torch.compile(model) if cfg.compile else model
        # the loss on target positions only (factlab.train.lm_loss); compiled models and
        # models without an output-embedding module keep HF's own loss
        self._head = None if cfg.compile else output_head(acc.unwrap_model(model))

        n_proc, rank = acc.num_processes, acc.process_index
        if cfg.batch_size % (n_proc * cfg.grad_accum):
            raise FactlabError(f"batch_size={cfg.batch_size} must be divisible by processes "
                               f"({n_proc}) x grad_accum ({cfg.grad_accum})")
        per_proc = cfg.batch_size // n_proc
        seq_len = self.stream.seq_len
        peak = peak_flops(acc.device)

        model.train()
        t_last, tok_since = time.perf_counter(), 0
        bar = self._bar(start) if (self.progress and acc.is_main_process) else None
        try:
            for step in range(start, cfg.steps if not self.stopped else start):
                self.step = step
                b = self.stream.sequences(step * cfg.batch_size + rank * per_proc, per_proc)
                batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
                for p in self.plugins:
                    batch = p.next_batch(self, step, batch)
                if not cfg.compile:
                    batch = trim_batch(batch, keys=getattr(self.stream, "sequence_keys", ()))
                rows = _rows(batch)
                if rows < cfg.grad_accum:
                    raise FactlabError(f"{self.name}: a batch of {rows} rows cannot be split "
                                       f"into grad_accum={cfg.grad_accum} micro-batches")
                # every row is trained, also those a plugin's next_batch added
                bounds = np.linspace(0, rows, cfg.grad_accum + 1).round().astype(int)
                weights = _micro_weights(batch, bounds)
                loss_sum = 0.0
                for k in range(cfg.grad_accum):
                    lo, hi = int(bounds[k]), int(bounds[k + 1])
                    mb = {key: v[lo:hi].to(acc.device) for key, v in batch.items()}
                    sync = k == cfg.grad_accum - 1
                    ctx = acc.no_sync(model) if (not sync and n_proc > 1) else _null()
                    with ctx, acc.autocast():
                        loss, out = self._loss(fwd, mb, inputs)
                        for p in self.plugins:
                            extra = p.extra_loss(self, mb, out)
                            if extra is not None:
                                loss = loss + extra
                    if not torch.isfinite(loss):
                        raise FactlabError(f"{self.name}: loss is {loss.item()} at step {step} "
                                           f"(lower lr, check data); last good checkpoint kept")
                    acc.backward(loss * weights[k])
                    loss_sum += loss.detach().float().item() * weights[k]
                grad_norm = None
                if cfg.clip > 0 and dense_params:  # sparse rows stay out of the norm
                    grad_norm = float(acc.clip_grad_norm_(dense_params, cfg.clip))
                for o in opts:
                    o.step()
                for sc in scheds:
                    sc.step()
                for o in opts:
                    o.zero_grad(set_to_none=True)
                # and every other parameter's: one with requires_grad that no optimizer
                # steps must not carry gradients into a later experience that trains it
                model.zero_grad(set_to_none=True)
                self.step = step + 1
                tok_since += rows * n_proc * seq_len  # sequence positions, as before trimming
                logs = {"step": step + 1, "loss": loss_sum, "lr": scheds[0].get_last_lr()[0]}
                if grad_norm is not None:
                    logs["grad_norm"] = grad_norm
                for p in self.plugins:
                    p.after_step(self, step + 1, logs)
                stop = self._agree(self._stop)
                last = step + 1 == cfg.steps or stop
                if (step + 1) % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    tps = tok_since / max(now - t_last, 1e-9)
                    logs["tokens_per_s"] = tps
                    if peak and self.flops_per_token:
                        logs["mfu"] = tps * self.flops_per_token / (peak * n_proc)
                    if not self.history:
                        logs["optimizer_state_bytes"] = state_bytes(opts)
                    t_last, tok_since = now, 0
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                        logs.update(self._evaluate(model))
                    if last:
                        logs.update(self._evaluate(model))
                    self._log(logs)
                elif cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    logs.update(self._evaluate(model))
                    self._log(logs)
                if bar is not None:
                    bar[0].update(bar[1], advance=1, loss=f"{loss_sum:.3f}",
                                  tps=f"{logs.get('tokens_per_s', 0):,.0f}",
                                  extra=" ".join(t for t in (pl.progress_text()
                                                             for pl in self.plugins) if t))
                if stop:
                    self.stopped = True
                    break
                due = (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or \
                    (cfg.ckpt_minutes and (step + 1) % cfg.log_every == 0 and self._agree(
                        time.perf_counter() - self._last_ckpt >= 60 * cfg.ckpt_minutes))
                if due and not last:
                    self._save_checkpoint(model, opts, scheds)
            finished_now = self.step > start
            if self.keep_checkpoint and (finished_now or not
                                         (self.out / "checkpoint" / "trainer.pt").is_file()):
                self._save_checkpoint(model, opts, scheds)
            if self.export and (finished_now or not (self.out / "model").exists()):
                self._export(model)
            if not self.keep_checkpoint and acc.is_main_process:
                # the experience driver keeps the state it needs; a killed loop still
                # resumed from its timed checkpoints until here
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        finally:
            if bar is not None:
                bar[0].stop()
            if self._tb is not None:
                self._tb.close()
        self.model = acc.unwrap_model(model)
        # a shared accelerator (the experience driver's) would keep every experience's
        # optimizers, and their state, alive: let go of this run's
        for attr, mine in (("_optimizers", opts), ("_models", [model])):
            held = getattr(acc, attr, None)
            if isinstance(held, list):
                held[:] = [x for x in held if not any(x is m for m in mine)]
        self.optimizers = []
        return self.history

    def _agree(self, flag: bool) -> bool:
        """``flag`` on any process -> True on all (a stop or a timed checkpoint must be
        the same decision on every rank)."""
        if self.accelerator.num_processes == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _loss(self, fwd, mb: dict, inputs=DEFAULT_INPUTS):
        """The micro-batch loss: the first plugin whose ``compute_loss`` returns a tensor
        (e.g. a probe's classifier loss), else the causal-LM loss over the model inputs
        ``inputs``. Returns (loss, LM output or None)."""
        for p in self.plugins:
            loss = p.compute_loss(self, fwd, mb)
            if loss is not None:
                return loss, None
        if self._head is not None:
            return causal_lm_loss(fwd, self._head, mb, inputs)
        out = fwd(**model_kwargs(mb, inputs), labels=mb["labels"])
        return out.loss, out

    def _evaluate(self, model) -> dict:
        if self.evaluate is None:
            return {}
        was = model.training
        model.eval()
        try:
            res = self.evaluate(self, self.step) or {}
        finally:
            model.train(was)
        return {f"eval/{k}": v for k, v in res.items()}

    def _export(self, model) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            export_model(self.accelerator.unwrap_model(model), self.out / "model",
                         plugins=self.plugins, loop=self, tokenizer=self.tokenizer)

    def _bar(self, start: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        prog = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"),
                        TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"),
                        TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        task = prog.add_task(self.name, total=self.cfg.steps, completed=start, loss="-", tps="-",
                             extra="")
        prog.start()
        return prog, task


_SEQ_KEYS = frozenset({"input_ids", "labels", "attention_mask"})


def _micro_weights(batch: dict, bounds) -> list[float]:
    """Each micro-batch's share of the step's loss: its share of the target tokens, so
    that the step's objective is the mean over all target tokens whatever ``grad_accum``
    (answers of uneven length, rows a plugin added); equal shares when there are no
    labels (a plugin's own loss). Per process: under DDP each rank weighs its own."""
    k = len(bounds) - 1
    if "labels" not in batch or k == 1:
        return [1.0 / k] * k
    per_row = (batch["labels"][:, 1:] != -100).sum(1)
    counts = [int(per_row[int(bounds[i]):int(bounds[i + 1])].sum()) for i in range(k)]
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / k] * k


def _rows(batch: dict) -> int:
    return int(next(iter(batch.values())).shape[0])


def trim_batch(batch: dict, multiple: int = 8, keys=()) -> dict:
    """Drop the trailing columns after the last target of any row (rounded up to a
    multiple of ``multiple``). Exact for a causal LM: those positions carry no loss and no
    earlier position attends to them. Whole-document packing at context 128 pads ~40% of
    every row; this cuts most of it. 1-D per-row columns are kept as they are; the
    sequence keys (``input_ids``, ``labels``, ``attention_mask`` and a stream's
    ``sequence_keys``) are cut; a batch with any other 2-D key is left whole.
    """
    seq = _SEQ_KEYS | frozenset(keys)
    if "labels" not in batch or any(k not in seq and v.dim() != 1 for k, v in batch.items()):
        return batch
    labels = batch["labels"]
    cols = torch.nonzero((labels != -100).any(0)).flatten()
    L = labels.shape[1]
    keep = min(L, -(-(int(cols[-1]) + 1) // multiple) * multiple) if len(cols) else min(L, 1)
    if keep == L:
        return batch
    return {k: v[:, :keep].contiguous() if v.dim() > 1 else v for k, v in batch.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def export_model(model, dest: str | Path, *, plugins=(), loop=None, tokenizer=None) -> None:
    """Save ``model`` with its ``save_pretrained`` into ``dest`` (atomically: a temp dir,
    then a rename): a plain HF directory, a peft adapter or a factlab wrapper directory
    (``factlab.model.load.load_any`` opens each). A plugin's ``export`` returns what to
    save instead, without changing the model being trained (no copy of it is made)."""
    dest = Path(dest)
    m = model
    for p in plugins:
        m = p.export(loop, m)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def load_history(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
