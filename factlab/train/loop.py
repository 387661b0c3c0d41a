"""The training loop: one for everything.

Reads top to bottom like nanoGPT's train.py: build the optimizer over whatever the plugins
say is trainable, then for each step fetch a deterministic batch (the stream is addressed
by step, so a resumed run sees exactly the data it would have seen), forward/backward with
gradient accumulation, clip, step, log, evaluate, checkpoint. ``accelerate`` provides the
device, mixed precision and DDP; ``torch.compile`` is optional.

Resuming: ``OUT/checkpoint`` holds the weights (safetensors) and ``trainer.pt`` (optimizer,
scheduler, step, RNG, plugin states). Running the same config on the same OUT continues
from there; on CPU with the same seed the result equals an uninterrupted run.
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
from factlab.train.config import TrainConfig
from factlab.train.lm_loss import causal_lm_loss
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
    trained (unwrapped) model and ``OUT/model`` its HF export (plus the tokenizer).
    """

    def __init__(self, model, stream, cfg: TrainConfig, out: str | Path, *,
                 plugins: Sequence[Plugin] = (), evaluate: Callable | None = None,
                 tokenizer=None, accelerator=None, progress: bool = True,
                 flops_per_token: float | None = None, name: str = "train"):
        self.model, self.stream, self.cfg, self.out = model, stream, cfg, Path(out)
        self.plugins, self.evaluate, self.tokenizer = list(plugins), evaluate, tokenizer
        self.accelerator, self.progress, self.name = accelerator, progress, name
        self.flops_per_token = flops_per_token
        self.step = 0
        self.history: list[dict] = []
        self._head = None

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

    def _optimizer(self):
        params = None
        for p in self.plugins:
            params = p.trainable(self) or params
        if params is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        params = list(params)
        if not params:
            raise FactlabError(f"{self.name}: no trainable parameters")
        # weight decay on matrices only (not biases, norms)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused AdamW (one kernel for all tensors) on CUDA and, since torch 2.4, on CPU
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas,
                                 eps=self.cfg.eps, fused=fused)

    # ------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def _save_checkpoint(self, model, opt, sched) -> None:
        from safetensors.torch import save_model

        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = self.out / ".checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(acc.unwrap_model(model), str(tmp / "model.safetensors"))
            torch.save({"step": self.step, "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                        "plugins": {p.name: p.state_dict() for p in self.plugins},
                        "history": self.history}, tmp / "trainer.pt")
            old = self.out / ".checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.ckpt_dir.exists():
                os.replace(self.ckpt_dir, old)
            os.replace(tmp, self.ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _resume(self, model, opt, sched) -> int:
        from safetensors.torch import load_model

        state_file = self.ckpt_dir / "trainer.pt"
        if not state_file.is_file():
            return 0
        load_model(self.accelerator.unwrap_model(model), str(self.ckpt_dir / "model.safetensors"))
        state = torch.load(state_file, weights_only=True, map_location="cpu")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        for p in self.plugins:
            p.load_state_dict(state["plugins"].get(p.name, {}))
        self.history = state["history"]
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
            p.setup(self)
        opt = self._optimizer()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
        model, opt = acc.prepare(self.model, opt)
        start = self._resume(model, opt, sched)
        self.step = start
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out / "tb")) if acc.is_main_process else None
        except Exception:  # tensorboard is an optional extra
            self._tb = None
        fwd = torch.compile(model) if cfg.compile else model
        # the loss on target positions only (factlab.train.lm_loss); compiled models and
        # models without an output-embedding module keep HF's own loss
        self._head = None if cfg.compile else _output_head(acc.unwrap_model(model))

        n_proc, rank = acc.num_processes, acc.process_index
        if cfg.batch_size % (n_proc * cfg.grad_accum):
            raise FactlabError(f"batch_size={cfg.batch_size} must be divisible by processes "
                               f"({n_proc}) x grad_accum ({cfg.grad_accum})")
        per_proc = cfg.batch_size // n_proc
        micro = per_proc // cfg.grad_accum
        seq_len = self.stream.seq_len
        tokens_per_step = cfg.batch_size * seq_len
        peak = peak_flops(acc.device)

        model.train()
        t_last, tok_since = time.perf_counter(), 0
        bar = self._bar(start) if (self.progress and acc.is_main_process) else None
        try:
            for step in range(start, cfg.steps):
                self.step = step
                b = self.stream.sequences(step * cfg.batch_size + rank * per_proc, per_proc)
                batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
                for p in self.plugins:
                    batch = p.next_batch(self, step, batch)
                if not cfg.compile:
                    batch = trim_batch(batch)
                loss_sum = 0.0
                for k in range(cfg.grad_accum):
                    mb = {key: v[k * micro:(k + 1) * micro].to(acc.device)
                          for key, v in batch.items()}
                    sync = k == cfg.grad_accum - 1
                    ctx = acc.no_sync(model) if (not sync and n_proc > 1) else _null()
                    with ctx, acc.autocast():
                        loss, out = self._loss(fwd, mb)
                        for p in self.plugins:
                            extra = p.extra_loss(self, mb, out)
                            if extra is not None:
                                loss = loss + extra
                    if not torch.isfinite(loss):
                        raise FactlabError(f"{self.name}: loss is {loss.item()} at step {step} "
                                           f"(lower lr, check data); last good checkpoint kept")
                    acc.backward(loss / cfg.grad_accum)
                    loss_sum += loss.detach().float().item() / cfg.grad_accum
                grad_norm = None
                if cfg.clip > 0:
                    grad_norm = float(acc.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], cfg.clip))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.step = step + 1
                tok_since += tokens_per_step
                logs = {"step": step + 1, "loss": loss_sum, "lr": sched.get_last_lr()[0]}
                if grad_norm is not None:
                    logs["grad_norm"] = grad_norm
                for p in self.plugins:
                    p.after_step(self, step + 1, logs)
                last = step + 1 == cfg.steps
                if (step + 1) % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    tps = tok_since / max(now - t_last, 1e-9)
                    logs["tokens_per_s"] = tps
                    if peak and self.flops_per_token:
                        logs["mfu"] = tps * self.flops_per_token / (peak * n_proc)
                    t_last, tok_since = now, 0
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                        logs.update(self._evaluate(model))
                    if last:
                        logs.update(self._evaluate(model))
                    self._log(logs)
                elif cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    logs.update(self._evaluate(model))
                    self._log(logs)
                if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and not last:
                    self._save_checkpoint(model, opt, sched)
                if bar is not None:
                    bar[0].update(bar[1], advance=1, loss=f"{loss_sum:.3f}",
                                  tps=f"{logs.get('tokens_per_s', 0):,.0f}")
            if start < cfg.steps or not (self.out / "model").exists():
                self._save_checkpoint(model, opt, sched)
                self._export(model)
        finally:
            if bar is not None:
                bar[0].stop()
            if self._tb is not None:
                self._tb.close()
        self.model = acc.unwrap_model(model)
        return self.history

    def _loss(self, fwd, mb: dict):
        """The micro-batch loss: the first plugin whose ``compute_loss`` returns a tensor
        (e.g. a probe's classifier loss), else the causal-LM loss. Returns (loss, LM output
        or None)."""
        for p in self.plugins:
            loss = p.compute_loss(self, fwd, mb)
            if loss is not None:
                return loss, None
        if self._head is not None:
            return causal_lm_loss(fwd, self._head, mb)
        out = fwd(input_ids=mb["input_ids"], labels=mb["labels"])
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
        """Save the result as a plain HF model directory (safetensors)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        import copy

        m = acc.unwrap_model(model)
        if any(type(p).export is not Plugin.export for p in self.plugins):
            m = copy.deepcopy(m)
            for p in self.plugins:
                m = p.export(self, m)
        tmp = self.out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        final = self.out / "model"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def _bar(self, start: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        prog = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"),
                        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        task = prog.add_task(self.name, total=self.cfg.steps, completed=start, loss="-", tps="-")
        prog.start()
        return prog, task


_LM_KEYS = {"input_ids", "labels", "attention_mask"}


def trim_batch(batch: dict, multiple: int = 8) -> dict:
    """Drop the trailing columns after the last target of any row (rounded up to a
    multiple of ``multiple``). Exact for a causal LM: those positions carry no loss and no
    earlier position attends to them. Whole-document packing at context 128 pads ~40% of
    every row; this cuts most of it. Batches with other keys (plugins' own) are left whole.
    """
    if set(batch) - _LM_KEYS or "labels" not in batch:
        return batch
    labels = batch["labels"]
    cols = torch.nonzero((labels != -100).any(0)).flatten()
    L = labels.shape[1]
    keep = min(L, -(-(int(cols[-1]) + 1) // multiple) * multiple) if len(cols) else min(L, 1)
    if keep == L:
        return batch
    return {k: v[:, :keep].contiguous() for k, v in batch.items()}


def _output_head(model):
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        head = None
    return head if isinstance(head, torch.nn.Module) else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_history(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
