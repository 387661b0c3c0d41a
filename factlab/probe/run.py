"""Run a probe: split the people, build the examples, train the probe on the one training
loop, score it on the held-out people, write ``probe_{kind}.json``.

    OUT/probe_p.json           the results (below)
    OUT/probe_p/               the loop's folder: settings.json, metrics.jsonl,
                               checkpoint/ (probe parameters only), model/ (the probe)

Results: for every task, accuracy on the probe-test people at every read position
(``test``), the same on the probe-train people (``train``, to see over-fitting), the
accuracy at the position right before the task's own value (``own``; with permuted bios
that position moves), and two chance levels: ``chance`` (always answering the most
frequent training class, scored on the test people — the one reports print) and
``uniform`` (1 / number of classes).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from factlab.errors import FactlabError
from factlab.io import atomic_write_text
from factlab.probe.config import ProbeConfig
from factlab.probe.data import ProbeData, ProbeStream, probe_data, split_people

SPLIT_RULE = ("people drawn by a seeded permutation (capped at `people`), the first "
              "`train_fraction` train the probe, the rest score it; every probed person's "
              "bios were in the model's pretraining data")


def model_context(backbone) -> int:
    cfg = backbone.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def evaluate_probe(model, data: ProbeData, rows, batch_size: int = 256):
    """Per-row correctness: ``hits`` and ``valid`` (len(rows), T, P) bool arrays. Rows are
    batched by their last read position (less padding); eval mode (BatchNorm uses its
    running statistics, dropout off)."""
    import torch

    rows = np.asarray(rows, dtype=np.int64)
    T, P = len(data.tasks), data.positions.shape[1]
    hits = np.zeros((len(rows), T, P), dtype=bool)
    valid = np.zeros((len(rows), T, P), dtype=bool)
    device = next(model.parameters()).device
    order = np.argsort(data.positions[rows].max(axis=1), kind="stable")
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, len(rows), batch_size):
                sel = order[lo:lo + batch_size]
                r = rows[sel]
                ids = torch.from_numpy(data.input_ids[r]).to(device)
                pos = torch.from_numpy(data.positions[r]).to(device)
                tg = torch.from_numpy(data.targets[r]).to(device)
                ok = pos >= 0
                for t, lg in enumerate(model(ids, pos)):
                    m = ok & (tg[:, t] >= 0)[:, None]
                    hits[sel, t] = ((lg.argmax(-1) == tg[:, t, None]) & m).cpu().numpy()
                    valid[sel, t] = m.cpu().numpy()
    finally:
        model.train(was)
    return hits, valid


def _acc(hits, valid, axis=0) -> list:
    n = valid.sum(axis=axis)
    h = hits.sum(axis=axis)
    return [None if k == 0 else float(a / k) for a, k in zip(h.tolist(), n.tolist())]


def summarise(data: ProbeData, test, train) -> list[dict]:
    """Per-task results from :func:`evaluate_probe`'s output on the test and train rows."""
    (th, tv), (rh, rv) = test, train
    out = []
    for t, task in enumerate(data.tasks):
        chance, uniform = data.chance(t)
        row = {"name": task.name, "attribute": task.name.split("/")[0], "target": task.target,
               "classes": task.n_classes, "chance": chance, "uniform": uniform,
               "test": _acc(th[:, t], tv[:, t]), "train": _acc(rh[:, t], rv[:, t]),
               "n_test": tv[:, t].sum(axis=0).tolist()}
        if data.order is not None:  # the position right before the task's own value
            own = data.order[data.test] == task.attribute  # (n_test, P)
            m = tv[:, t] & own
            row["own"] = float(th[:, t][m].mean()) if m.any() else None
            # how often p_k is the task's own position (1 at p1 for a single bio's first
            # attribute): reading there is writing the value, not recalling it early
            row["own_share"] = own.mean(axis=0).tolist()
        out.append(row)
    return out


def _settings(cfg: ProbeConfig, data: ProbeData | None) -> dict:
    rec = cfg.model_dump(mode="json")
    if data is not None:  # custom data (e.g. control labels): never reuse other results
        rec["custom_data"] = True
    return rec


def _upgraded(saved: dict, cfg: ProbeConfig) -> dict:
    """Settings saved before a setting existed read as that setting's default (a probe
    finished before ``head`` was added is the linear-head probe it was)."""
    default = ProbeConfig(kind=cfg.kind).resolved().model_dump(mode="json")
    return {**{k: v for k, v in default.items() if k not in saved}, **saved}


def run_probe(backbone, tokenizer, world, cfg: ProbeConfig, out, *, data: ProbeData | None = None,
              progress: bool = True, force: bool = False, name: str | None = None) -> dict:
    """Train and score one probe of ``cfg.kind`` on the frozen ``backbone``; write
    ``OUT/probe_{kind}.json`` and return its content.

    ``data``: prebuilt examples (:func:`prepare`), e.g. with control labels; default: built
    from ``world`` with ``cfg``'s split. A finished probe of the same settings in ``out``
    is returned as it is; an unfinished one resumes; one of other settings is an error
    unless ``force`` (which replaces it). The backbone's parameters are left with
    ``requires_grad=False``.
    """
    from factlab.probe.heads import ProbeModel
    from factlab.probe.plugin import ProbePlugin
    from factlab.train.loop import Loop

    cfg = cfg.resolved()
    out = Path(out)
    work = out / f"probe_{cfg.kind}"
    result_path = out / f"probe_{cfg.kind}.json"
    settings = _settings(cfg, data)
    if force:
        shutil.rmtree(work, ignore_errors=True)
        result_path.unlink(missing_ok=True)
    stamp = work / "settings.json"
    if stamp.is_file() and _upgraded(json.loads(stamp.read_text()), cfg) != settings:
        raise FactlabError(f"{work} holds a probe with other settings; use another --out, "
                           f"or --force to replace it")
    if data is None and result_path.is_file() and stamp.is_file():
        done = json.loads(result_path.read_text())
        if _upgraded(done.get("config") or {}, cfg) == settings:
            return done
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(settings, indent=1) + "\n")
    if data is None:
        data = prepare(world, tokenizer, cfg, model_context(backbone))
    model = ProbeModel(backbone, [t.n_classes for t in data.tasks], data.positions.shape[1],
                       rank=cfg.rank, norm=cfg.norm, embedding=cfg.embedding, seed=cfg.seed,
                       head=cfg.head, class_tokens=[t.class_tokens for t in data.tasks])
    loop = Loop(model, ProbeStream(data, seed=cfg.seed), cfg.train_config(), work,
                plugins=[ProbePlugin()], progress=progress, name=name or f"probe {cfg.kind}")
    t0 = time.perf_counter()
    hist = loop.run()
    seconds = time.perf_counter() - t0
    model = loop.model
    test = evaluate_probe(model, data, data.test, cfg.eval_batch_size)
    train = evaluate_probe(model, data, data.train, cfg.eval_batch_size)
    tasks = summarise(data, test, train)
    P = data.positions.shape[1]
    mean_test = [float(np.mean(v)) if v else None for v in
                 ([t["test"][k] for t in tasks if t["test"][k] is not None] for k in range(P))]
    n_trainable = sum(p.numel() for p in model.parameters())
    result = {
        "kind": cfg.kind,
        "positions": data.position_names,
        "tasks": tasks,
        "mean_test": mean_test,
        "split": {"people": int(len(data)), "train": int(len(data.train)),
                  "test": int(len(data.test)), "seed": cfg.seed,
                  "train_fraction": cfg.train_fraction, "cap": cfg.people, "rule": SPLIT_RULE},
        "config": settings,
        "probe": {"embedding": model.embedding, "variants": model.n_variants,
                  "rank": model.rank, "norm": model.norm, "head": model.head_kind,
                  "trainable_params": int(n_trainable),
                  "backbone_params": int(sum(p.numel() for p in backbone.parameters())),
                  "backbone_frozen": not any(p.requires_grad for p in backbone.parameters())},
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size,
                  "final_loss": hist[-1]["loss"] if hist else None,
                  "seconds": seconds},
    }
    if loop.accelerator.is_main_process:
        atomic_write_text(result_path, json.dumps(result, indent=1) + "\n")
    return result


def prepare(world, tokenizer, cfg: ProbeConfig, context: int) -> ProbeData:
    """The probe examples for ``cfg``: its people split, inputs, positions and targets."""
    cfg = cfg.resolved()
    train, test = split_people(len(world.people), cfg.train_fraction, cfg.seed, cfg.people)
    return probe_data(world, tokenizer, cfg.kind, train, test, context=context,
                      entry=cfg.entry, tasks=cfg.tasks, q_read=cfg.q_read)


# --------------------------------------------------------------------------- recipes

def probe_cell(cell, cell_dir: Path, world, tokenizer, progress: bool = True) -> dict:
    """A recipe cell's ``probe`` step: every kind on the cell's BIO-pretrained model
    (``CELL/pretrain/model``; ``CELL/mixed/model`` for a mixed cell), results in
    ``CELL/probe_{kind}.json``. Returns ``{kind: result}``."""
    from factlab.model.load import load_any as load_model

    stage = "mixed" if cell.regime == "mixed" else "pretrain"
    backbone = load_model(cell_dir / stage / "model")
    return {k: run_probe(backbone, tokenizer, world, cell.probe.config(k), cell_dir,
                         progress=progress, name=f"{cell.name} probe {k}")
            for k in cell.probe.kinds}


# --------------------------------------------------------------------------- CLI

def resolve_target(target, world=None, tokenizer=None) -> dict:
    """What ``factlab probe TARGET`` probes: a recipe run cell (its world, tokenizer and
    pretrained model; results go into the cell) or an HF model directory (``world``
    required; tokenizer from ``tokenizer`` or the model directory; results go next to the
    model). Returns ``{model, world, tokenizer, out}`` paths."""
    p = Path(target)
    if not p.exists():
        raise FactlabError(f"{p}: no such run cell or model directory")
    if not p.is_dir():
        raise FactlabError(f"{p}: expected a run cell or a model directory, got a file")
    if (p / "world" / "manifest.json").is_file():
        model = next((p / s / "model" for s in ("pretrain", "mixed")
                      if (p / s / "model" / "config.json").is_file()), None)
        if model is None:
            raise FactlabError(f"{p}: no pretrained model (expected {p / 'pretrain/model'}; "
                               f"has pretraining finished?)")
        tok = tokenizer or (p / "tokenizer" if (p / "tokenizer").is_dir() else model)
        return {"model": model, "world": Path(world) if world else p / "world",
                "tokenizer": Path(tok), "out": p}
    if any((p / m).is_file() for m in ("config.json", "adapter_config.json",
                                        "factlab_wrapper.json")):  # see model.load.load_any
        if world is None:
            raise FactlabError(f"{p} is a model directory: give its world with --world DIR")
        return {"model": p, "world": Path(world), "tokenizer": Path(tokenizer or p),
                "out": p.parent}
    if (p / "recipe.yaml").is_file():
        cells = sorted(c.name for c in p.iterdir() if (c / "world" / "manifest.json").is_file())
        raise FactlabError(f"{p} is a recipe run; probe one of its cells: "
                           f"{', '.join(str(p / c) for c in cells) or '(none finished)'}")
    raise FactlabError(f"{p}: neither a run cell (no world/manifest.json) nor a model "
                       f"directory (no config.json)")


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"
