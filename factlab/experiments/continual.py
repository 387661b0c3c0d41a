"""One stream, several continual-learning methods, each through the experience driver
from the same base model, with the same steps per experience, evaluated on the same test
facts after every experience.

    res = run_continual(ContinualSettings(base="runs/qs/multi5+permute"), "runs/continual")

    OUT/
      continual.json          the settings (the same settings again resume)
      stream/                 the stream (made from the base when ``stream`` is not given)
      METHOD/                 one driver directory per method: R.json,
                              predictions/t{t}_facts.jsonl, state/, exp{t}-*/
      METHOD/result.json      its metrics (factlab.continual.metrics.summary) and costs

Methods (``METHODS``): ``sequential`` (full finetuning, the lower bound), ``lora``
(sequential LoRA), ``joint`` (one experience over the base and every experience, each
drawn equally often, for T x steps: the upper bound), ``cumulative`` (experience t
retrains on everything so far), ``replay`` (full replay of earlier data), ``reservoir``
(a reservoir buffer), ``generative`` (generative replay), ``ewc``, ``online_ewc``,
``lwf``, the prompt pools ``l2p``, ``dualprompt`` and ``coda`` over the frozen model
(``factlab.continual.prompts``; ``l2p_prefix`` and ``dualprompt_prefix`` as key/value
prefixes of every layer), ``adapters`` / ``adapters_soft`` (one LoRA adapter
per experience, routed per example: ``factlab.continual.router``) and ``olora`` (the
same adapters summed, no router, each new one orthogonal to the earlier: O-LoRA). Every method trains ``steps``
optimizer steps of ``batch_size`` rows per experience (joint: T x steps at once).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from factlab.config import Strict
from factlab.corpus.stream import StreamConfig, kinds_of
from factlab.errors import FactlabError
from factlab.io import atomic_write_text

METHODS = ("sequential", "lora", "joint", "cumulative", "replay", "reservoir", "generative",
           "ewc", "online_ewc", "lwf", "l2p", "dualprompt", "coda", "l2p_prefix",
           "dualprompt_prefix", "adapters", "adapters_soft", "olora")
PROMPT_METHODS = {"l2p": "l2p", "dualprompt": "dual", "coda": "coda", "l2p_prefix": "l2p",
                  "dualprompt_prefix": "dual"}
PREFIX_METHODS = ("l2p_prefix", "dualprompt_prefix")  # key/value prefixes, every layer
ROUTER_METHODS = {"adapters": "hard", "adapters_soft": "soft", "olora": "sum"}


class ReplaySettings(Strict):
    ratio: float = Field(0.5, gt=0, lt=1, description="share of each experience's rows "
                         "drawn from the buffer")
    size: float = Field(0.1, gt=0, description="reservoir: buffer size, examples (>= 1) or "
                        "a fraction of the examples seen (< 1)")
    selection: Literal["random", "recency", "diversity"] = "random"


class EWCSettings(Strict):
    lam: float = Field(100.0, ge=0)
    gamma: float = Field(0.9, gt=0, le=1, description="online EWC's decay")
    samples: int = Field(200, ge=1, description="examples per Fisher estimate")


class LwFSettings(Strict):
    alpha: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)


class GenerativeSettings(Strict):
    gamma: float = Field(0.2, gt=0, le=1, description="pseudo-bios per example of the "
                         "experience (LAMOL: 0.05 or 0.2)")
    weight: float = Field(0.25, ge=0, description="loss weight of the pseudo-bios' tokens")
    temperature: float = Field(1.0, gt=0)


class PromptSettings(Strict):
    """The prompt pools (``factlab.continual.prompts``) of ``l2p``, ``dualprompt`` (top-1
    E-prompt, trained by experience: disjoint masks always) and ``coda`` (``size``
    components split among the experiences); ``l2p_prefix`` and ``dualprompt_prefix`` are
    the same pools as key/value prefixes of the attention (DualPrompt: G on the first half
    of the layers, E on the second; ``g_length`` is taken equal to ``length``)."""

    size: int = Field(10, ge=1, description="prompts (CODA: components) in the pool")
    top: int = Field(5, ge=1, description="L2P: prompts selected per row")
    length: int = Field(5, ge=0, description="virtual tokens per prompt")
    g_length: int = Field(5, ge=0, description="DualPrompt: the shared G-prompt's tokens")
    layer: int | None = Field(None, description="query layer (default: about 2/3 of the "
                              "depth)")
    pool: Literal["name", "mean", "last"] = "name"
    lam: float = Field(0.1, ge=0, description="weight of the key-pull term")
    diversify: bool = Field(False, description="L2P: frequency-penalised selection")
    masks: Literal["none", "disjoint"] = Field("none", description="L2P: experience t "
                                               "selects only its own top prompts in training")
    lr: float = Field(3e-2, gt=0)


class AdapterSettings(Strict):
    """``adapters`` / ``adapters_soft`` (``factlab.continual.router``): one LoRA adapter
    per experience, routed per example from the frozen LM's query; ``olora``: the same
    adapters all summed, no router, each new one pulled orthogonal to the earlier ones
    (``ortho``, O-LoRA's λ1; its paper uses 0.5)."""

    r: int = Field(8, ge=1)
    keys: Literal["examples", "mean"] = Field("examples", description="every training "
                                              "example's query, or one mean per experience")
    pool: Literal["name", "mean", "last"] = "name"
    layer: int | None = None
    modules: Literal["attention", "attention+mlp"] = Field(
        "attention+mlp", description="what each adapter adapts")
    margin: float = Field(0.02, ge=0, description="latest experience within this cosine "
                          "of the best wins")
    temperature: float = Field(0.05, gt=0, description="soft routing's softmax temperature")
    ortho: float = Field(0.5, ge=0, description="olora: weight of Σ ‖A_j A_tᵀ‖²")
    lr: float = Field(1e-2, gt=0)


class LoRASettings(Strict):
    r: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)


class ContinualSettings(Strict):
    """``base``: a trained run cell (``factlab run quickstart``'s ``multi5+permute``);
    ``stream``: an existing stream directory (``factlab stream make``), else one is made
    from ``base`` with ``make`` into ``OUT/stream``."""

    base: str | None = None
    stream: str | None = None
    make: StreamConfig = StreamConfig(cohorts=2, people=50, updates=0.1)
    methods: list[str] = ["sequential", "joint", "replay", "ewc", "l2p", "adapters"]
    steps: int = Field(300, ge=1, description="optimizer steps per experience")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    qa_ratio: float = Field(0.3, ge=0, le=1, description="share of rows that are one "
                            "question (the rest: one whole bio)")
    seed: int = 0
    eval_people: int = Field(100, ge=1, description="base-world people per split in the "
                             "test facts (every updated person is added)")
    eval_batch: int = Field(128, ge=1)
    parallel: int = Field(2, ge=1, description="methods trained at once (one thread each)")
    replay: ReplaySettings = ReplaySettings()
    ewc: EWCSettings = EWCSettings()
    lwf: LwFSettings = LwFSettings()
    generative: GenerativeSettings = GenerativeSettings()
    lora: LoRASettings = LoRASettings()
    prompts: PromptSettings = PromptSettings()
    adapters: AdapterSettings = AdapterSettings()
    select: dict[str, list] = Field(
        {"lr": [3e-4, 1e-3], "ewc.lam": [100.0, 10000.0], "lwf.alpha": [0.5, 2.0],
         "prompts.lr": [3e-3, 3e-2], "adapters.lr": [3e-3, 1e-2]},
        description="settings chosen per method on a validation stream (a log grid each; "
                    "{} to use the settings as given)")

    @model_validator(mode="after")
    def _check(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r} (methods: {', '.join(METHODS)})")
        if not self.methods:
            raise ValueError("no methods")
        if self.base is None and self.stream is None:
            raise ValueError("give base=RUN_CELL or stream=STREAM_DIR")
        for k, vals in self.select.items():
            if not vals:
                raise ValueError(f"select.{k}: no candidate values")
            try:
                for v in vals:
                    with_value(self.model_copy(update={"select": {}}), k, v)
            except KeyError:
                raise ValueError(f"select: unknown setting {k!r}") from None
        return self


# ------------------------------------------------------------------------- the stream
def prepare_stream(cfg: ContinualSettings, out: Path):
    """(corpus, stream meta, model dir, tokenizer dir) of the run's stream: ``cfg.stream``,
    or the one made from ``cfg.base`` into ``OUT/stream``. The model is the base cell's
    when ``base`` is given (it wins over the stream's record), else the stream's."""
    from factlab.corpus import load_world
    from factlab.corpus.stream import load_stream, make_stream, save_stream
    from factlab.experiments.run import cell_model

    cell = None
    if cfg.base is not None:
        cell = cell_model(Path(cfg.base))
        if cell is None:
            raise FactlabError(f"continual: base={cfg.base} is not a run cell (no world/)")
    sdir = Path(cfg.stream) if cfg.stream is not None else out / "stream"
    if cfg.stream is not None or (sdir / "stream.json").is_file():
        corpus, meta = load_stream(sdir)
    else:
        corpus = make_stream(load_world(cell[1]), cfg.make)
        meta = save_stream(corpus, sdir, cfg=cfg.make, base=base_meta(cfg.base, cell))
    if cell is not None:
        model, tok = cell[0], cell[2]
    elif (meta.get("base") or {}).get("model"):
        b = meta["base"]
        model, tok = Path(b["model"]), Path(b.get("tokenizer") or b["model"])
    else:
        raise FactlabError(f"continual: the stream {cfg.stream} names no base model; give "
                           f"base=RUN_CELL")
    for p in (model, tok):
        if not Path(p).exists():
            raise FactlabError(f"continual: the base's {p} does not exist")
    return corpus, meta, Path(model), Path(tok)


def base_meta(base, cell) -> dict:
    """What ``stream.json`` records of a base run cell: its directory, model, tokenizer."""
    model, _, tok = cell
    return {"cell": str(Path(base).resolve()), "model": str(Path(model).resolve()),
            "tokenizer": str(Path(tok).resolve())}


# ------------------------------------------------------------------------ one method
def _train_cfg(cfg: ContinualSettings, steps: int, lr: float):
    from factlab.train.config import TrainConfig

    return TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, warmup=min(10, steps),
                       weight_decay=0.01, min_lr_ratio=0.1, log_every=50, ckpt_minutes=2.0,
                       seed=cfg.seed)


def method_plugins(method: str, cfg: ContinualSettings, base_data, updated, n_attr: int,
                   judge=None, names=None):
    from factlab.continual.methods import EWC, Cumulative, GenerativeReplay, LwF, Replay
    from factlab.train.plugins import LoRA

    if method in PROMPT_METHODS:
        from factlab.continual.prompts import PromptLearning

        p = cfg.prompts
        kind = PROMPT_METHODS[method]
        return [PromptLearning(kind=kind, size=p.size, top=p.top, length=p.length,
                               g_length=p.length if method in PREFIX_METHODS else p.g_length,
                               layer=p.layer, pool=p.pool,
                               names=names if p.pool == "name" else None, lam=p.lam,
                               diversify=p.diversify and kind == "l2p",
                               masks="disjoint" if kind == "dual" or (
                                   kind == "l2p" and p.masks == "disjoint") else None,
                               seed=cfg.seed,
                               placement="prefix" if method in PREFIX_METHODS else "input")]
    if method in ROUTER_METHODS:
        from factlab.continual.router import ExperienceAdapters

        a = cfg.adapters
        return [ExperienceAdapters(base_data, r=a.r, names=names if a.pool == "name" else None,
                                   pool=a.pool, layer=a.layer, keys=a.keys,
                                   routing=ROUTER_METHODS[method], temperature=a.temperature,
                                   margin=a.margin, modules=a.modules, seed=cfg.seed,
                                   ortho=a.ortho if method == "olora" else 0.0)]
    r, e = cfg.replay, cfg.ewc
    size = int(r.size) if r.size >= 1 else float(r.size)
    return {
        "sequential": [], "joint": [],
        "lora": [LoRA(r=cfg.lora.r, r_embed=0)],
        "cumulative": [Cumulative(base_data, updated)],
        "replay": [Replay(base_data, updated=updated, ratio=r.ratio, seed=cfg.seed,
                          n_attributes=n_attr)],
        "reservoir": [Replay(base_data, updated=updated, ratio=r.ratio, size=size,
                             selection=r.selection, seed=cfg.seed, n_attributes=n_attr)],
        "ewc": [EWC(base_data, lam=e.lam, samples=e.samples)],
        "online_ewc": [EWC(base_data, lam=e.lam, online=True, gamma=e.gamma,
                           samples=e.samples)],
        "lwf": [LwF(alpha=cfg.lwf.alpha, temperature=cfg.lwf.temperature)],
        "generative": [GenerativeReplay(gamma=cfg.generative.gamma, weight=cfg.generative.weight,
                                        temperature=cfg.generative.temperature, seed=cfg.seed,
                                        judge=judge)],
    }[method]


def pseudo_judge(corpus):
    """``judge(texts, t)`` for generative replay: read each pseudo-bio with the world's
    templates (``factlab.text.parse``) and check every fact it states against the world as
    it was before experience t. A fact is **true** when its person is somebody the model had
    met (base world or an earlier cohort) and the value is that person's value then; a
    name nobody has is an invented person; an unknown person's name is counted apart."""
    from factlab.text.parse import BioParser

    w = corpus.world
    parser = None
    index = {n: i for i, n in enumerate(w.people.names)}
    unknown = set(w.unknown.names)

    def judge(texts, t):
        nonlocal parser
        if parser is None:  # compiling every template takes seconds: once, when needed
            parser = BioParser(corpus.templates, w.people.pools)
        n_facts = true = known = invented = unk = unread = 0
        people = set()
        for text in texts:
            facts, u = parser.parse(text.strip())
            unread += u
            for f in facts:
                n_facts += 1
                i = index.get(f.name)
                if i is None or w.arrival[i] >= t:
                    unk += f.name in unknown
                    invented += f.name not in unknown
                    continue
                known += 1
                people.add(i)
                true += f.value == w.value(i, f.attribute, at=t - 1)
        return {"facts": n_facts, "facts_of_known_people": known, "true": true,
                "precision": true / n_facts if n_facts else None,
                "precision_known_people": true / known if known else None,
                "invented_person_facts": invented, "unknown_person_facts": unk,
                "people": len(people), "unread_sentences": unread}

    return judge


def _drive(method: str, cfg: ContinualSettings, corpus, tok, model_dir: Path, out: Path,
           progress: bool):
    """Train ``method`` over the stream ``corpus`` through the experience driver in
    ``out``; returns (driver, rows of prediction records by t, plugins, data)."""
    import numpy as np

    from factlab.continual.data import FactStream, experience_data
    from factlab.continual.evaluate import facts_evaluator
    from factlab.corpus.stream import stream_facts
    from factlab.io import read_jsonl
    from factlab.model.load import load_any
    from factlab.train.experiences import Driver, Experience

    model = load_any(model_dir)
    T = len(corpus.experiences)
    facts = stream_facts(corpus, base_people=cfg.eval_people)
    data = [experience_data(corpus, tok, t, prompt_format="plain") for t in range(T + 1)]
    seq_len = _seq_len(data, model)
    if method in PROMPT_METHODS:
        _check_prompt_fit(method, cfg, seq_len, model)
    u = corpus.world.updates
    updated = (u.person.astype(np.int64), u.experience.astype(np.int64)) if len(u) else None
    w = corpus.world
    plugins = method_plugins(method, cfg, data[0], updated, len(corpus.attributes),
                             judge=pseudo_judge(corpus) if method == "generative" else None,
                             names=list(w.people.names) + list(w.unknown.names))
    lr = _lr(method, cfg)
    if method in ROUTER_METHODS:  # wrapped up front: a bad layer fails before row 0
        model = plugins[0].wrap(model, tok)
    if method == "joint":
        parts = [d.current(updated, T) for d in data]
        exps = [Experience("joint", FactStream.union(parts, seq_len, tok, qa_ratio=cfg.qa_ratio,
                                                     seed=cfg.seed),
                           _train_cfg(cfg, T * cfg.steps, lr))]
    else:
        exps = [Experience(f"e{t}-{k}", FactStream(data[t], seq_len, tok, qa_ratio=cfg.qa_ratio,
                                                   seed=cfg.seed + t),
                           _train_cfg(cfg, cfg.steps, lr))
                for t, k in zip(range(1, T + 1), kinds_of(corpus))]
    drv = Driver(model, exps, {"facts": facts_evaluator(tok, facts, batch_size=cfg.eval_batch)},
                 out, plugins=plugins, tokenizer=tok, progress=progress, export=False)
    R = drv.run()
    rows = {}  # t -> records; joint's one experience is row T
    for r in R["rows"]:
        t = r["t"] if method != "joint" else (T if r["t"] else 0)
        rows[t] = list(read_jsonl(out / "predictions" / f"t{r['t']}_facts.jsonl"))
    return drv, rows, plugins, data


def _lr(method: str, cfg: ContinualSettings) -> float:
    if method in ROUTER_METHODS:
        return cfg.adapters.lr
    return cfg.lora.lr if method == "lora" else cfg.prompts.lr if method in PROMPT_METHODS \
        else cfg.lr


def applies(key: str, method: str) -> bool:
    """Does the setting ``key`` (``select``'s dotted keys) change ``method``?"""
    head = key.split(".", 1)[0]
    return {"ewc": method in ("ewc", "online_ewc"), "lwf": method == "lwf",
            "replay": method in ("replay", "reservoir"), "lora": method == "lora",
            "generative": method == "generative", "prompts": method in PROMPT_METHODS,
            "adapters": method in ROUTER_METHODS,
            "lr": method != "lora" and method not in PROMPT_METHODS | ROUTER_METHODS.keys(),
            "qa_ratio": True}.get(head, False)


def with_value(cfg: ContinualSettings, key: str, value) -> ContinualSettings:
    d = cfg.model_dump(mode="json")
    node = d
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    if last not in node:
        raise KeyError(key)
    node[last] = value
    return type(cfg).model_validate(d)


def select(method: str, cfg: ContinualSettings, base_world_dir: Path | None, tok, model_dir,
           out: Path, progress: bool, people: int = 50,
           stream=None) -> tuple[ContinualSettings, dict]:
    """Choose ``method``'s settings listed in ``cfg.select`` on a **validation stream**:
    the base world plus one fresh cohort (seed + 1000, as large as the reported stream's
    cohorts), never the reported stream. Each candidate trains that one experience (same
    steps); the score is the mean of the base world's and the new cohort's exact match
    after it; ties go to the first candidate. Keys are chosen one after the other, each
    with the values chosen before it. Returns (settings with the choices, the record)."""
    from factlab.continual import metrics as M
    from factlab.corpus import load_world
    from factlab.corpus.stream import StreamConfig, make_stream

    keys = [k for k in cfg.select if applies(k, method)]
    if not keys:
        return cfg, {}
    f = out / "select.json"
    if f.is_file():
        rec = json.loads(f.read_text(encoding="utf-8"))
        for k in keys:
            cfg = with_value(cfg, k, rec["chosen"][k])
        return cfg, rec
    if base_world_dir is not None:
        base = load_world(base_world_dir)
    elif stream is not None:  # a user's stream: its own base world
        from factlab.corpus.stream import base_only

        base = base_only(stream)
    else:
        raise FactlabError("continual: select needs the stream's base world")
    val = make_stream(base, StreamConfig(cohorts=1, updates=0, people=people,
                                         seed=cfg.seed + 1000))
    rec = {"validation": "base world + one fresh cohort (seed + 1000)", "scores": {},
           "chosen": {}}
    for k in keys:
        scores = []
        for v in cfg.select[k]:
            c = with_value(cfg, k, v)
            d = out / "select" / f"{k}={v}"
            _, rows, _, _ = _drive(method, c, val, tok, model_dir, d, progress)
            R = M.r_matrix(rows, 1)
            score = float((R[1, 0] + R[1, 1]) / 2)
            scores.append({"value": v, "base": float(R[1, 0]), "new": float(R[1, 1]),
                           "score": score})
        best = max(range(len(scores)), key=lambda i: (scores[i]["score"], -i))
        rec["scores"][k] = scores
        rec["chosen"][k] = scores[best]["value"]
        cfg = with_value(cfg, k, scores[best]["value"])
    atomic_write_text(f, json.dumps(rec, indent=1) + "\n")
    return cfg, rec


def run_method(method: str, cfg: ContinualSettings, stream_dir: Path, model_dir: Path,
               tok_dir: Path, out: Path, *, progress: bool = True, threads: int | None = None,
               base_world_dir: Path | None = None):
    """Train ``method`` over the stream in ``stream_dir`` into ``out`` (its settings in
    ``cfg.select`` chosen first on a validation stream); returns its result (also written
    to ``out/result.json``). A finished method is read back."""
    import torch

    from factlab.continual import metrics as M
    from factlab.corpus.stream import load_stream
    from factlab.tokens.tokenizer import load_tokenizer

    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    corpus, _ = load_stream(stream_dir)
    tok = load_tokenizer(tok_dir)
    first = corpus.world.ids(arrival=1)
    cfg, chosen = select(method, cfg, base_world_dir, tok, model_dir, out, progress,
                         people=max(len(first), 2) if len(first) else 50, stream=corpus)
    t_sel = time.perf_counter() - t_start
    drv, rows, plugins, data = _drive(method, cfg, corpus, tok, model_dir, out, progress)
    T = len(corpus.experiences)
    values, pools = _value_maps(corpus)
    summary = M.summary(rows, T, values, pools)
    n_train = sum(p.numel() for p in drv.model.parameters() if p.requires_grad)
    lr = _lr(method, cfg)
    res = {"method": method, "T": T, "kinds": kinds_of(corpus), "summary": summary,
           "cost": _cost(method, cfg, drv, plugins, data, n_train, len(corpus.attributes), T),
           "seconds": {"train": drv.seconds["train"], "eval": drv.seconds["eval"],
                       "select": t_sel, "total": time.perf_counter() - t_start},
           "settings": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": lr,
                        "qa_ratio": cfg.qa_ratio, **_method_settings(method, cfg)},
           "select": chosen}
    if method in PROMPT_METHODS:
        res["prompts"] = prompt_report(drv.model, tok, rows[T])
    if method in ROUTER_METHODS and ROUTER_METHODS[method] != "sum":  # olora routes nothing
        res["routing"] = routing_report(drv.model, tok, rows[T], cfg)
    atomic_write_text(done, json.dumps(res, indent=1) + "\n")
    return res


def _method_settings(method: str, cfg: ContinualSettings) -> dict:
    return {"ewc": {"ewc": cfg.ewc.model_dump()}, "online_ewc": {"ewc": cfg.ewc.model_dump()},
            "lwf": {"lwf": cfg.lwf.model_dump()}, "replay": {"replay": cfg.replay.model_dump()},
            "reservoir": {"replay": cfg.replay.model_dump()},
            "lora": {"lora": cfg.lora.model_dump()},
            "generative": {"generative": cfg.generative.model_dump()},
            **{m: {"prompts": cfg.prompts.model_dump()} for m in PROMPT_METHODS},
            **{m: {"adapters": cfg.adapters.model_dump()} for m in ROUTER_METHODS}
            }.get(method, {})


def _seq_len(data, model) -> int:
    """Rows just long enough for the longest bio (with its EOS) or question: one example
    per row, as the quickstart trained (bios whole at context 128)."""
    longest = max(int(x.lengths.max()) + 1 for d in data for x in (d.docs, d.qa)
                  if x is not None and len(x))
    n = -(-longest // 8) * 8
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and longest > ctx:
        raise FactlabError(f"continual: the longest example is {longest} tokens, longer than "
                           f"the model's context ({ctx})")
    return min(n, ctx) if ctx else n


def prompt_positions(method: str, p: PromptSettings) -> int:
    """Positions a method's prompts add to every row (input prompts or a prefix)."""
    return {"l2p": p.top * p.length, "dualprompt": p.g_length + p.length,
            "coda": p.length, "l2p_prefix": p.top * p.length,
            "dualprompt_prefix": p.length}[method]


def _check_prompt_fit(method: str, cfg: ContinualSettings, seq_len: int, model) -> None:
    P = prompt_positions(method, cfg.prompts)
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and seq_len + P > ctx:
        raise FactlabError(f"{method}: {P} prompt positions (prompts.top x prompts.length) "
                           f"+ the longest example ({seq_len} positions) exceed the model's "
                           f"context ({ctx}); shorten the prompts")


def prompt_report(model, tok, records: list[dict]) -> dict:
    """A prompt pool's usage histogram (training selections per experience) and, on the
    test facts, the prompt matching rate by label (CODA: the components' mean weight)."""
    import torch

    from factlab.continual.prompts import matching_rate, selections
    from factlab.tokens.prompts import prompt_text

    texts = [prompt_text(r["question"], tok, "plain") for r in records]
    sel = selections(model, tok, texts)
    out = {"usage": model.usage.tolist(), "prompt_positions": model.n_virtual,
           "query_layer": model.layer, "kind": model.kind}
    if model.kind == "coda":
        out["mean_alpha"] = sel.mean(0).tolist()
        return out
    exp = [int(r["experience"]) if r["label"] in ("new", "updated") else 0 for r in records]
    labels = [r["label"] for r in records]
    out["matching_rate"] = matching_rate(sel, model.usage, exp)
    out["matching_rate_by_label"] = {
        lab: matching_rate(sel[[i for i, x in enumerate(labels) if x == lab]], model.usage,
                           [exp[i] for i, x in enumerate(labels) if x == lab])
        for lab in ("new", "updated")}
    # which prompts the base world's (experience-0) facts select: no prompt trained on them
    base = [i for i, x in enumerate(labels) if x == "invariant"]
    if base:
        h = torch.bincount(sel[base].reshape(-1), minlength=model.size)
        out["invariant_selection"] = h.tolist()
    return out


def _true_experience(r: dict) -> int:
    """The experience whose module should answer a test fact: its cohort's or its update's
    (new, updated facts); the base world (0) for invariant and unknown people's facts."""
    return int(r["experience"]) if r["label"] in ("new", "updated") else 0


def routing_report(model, tok, records: list[dict], cfg: ContinualSettings) -> dict:
    """Routing accuracy against the true experience (by label), and exact match with an
    oracle router (the true experience of every question) beside the learned router's."""
    from factlab.continual.router import route
    from factlab.evaluate.generate import generate
    from factlab.evaluate.metrics import exact_match
    from factlab.tokens.prompts import completion_text, prompt_text

    texts = [prompt_text(r["question"], tok, "plain") for r in records]
    true = [_true_experience(r) for r in records]
    got = route(model, tok, texts)
    labels = [r["label"] for r in records]

    def by_label(flags):
        out = {}
        for lab in ("invariant", "updated", "new", "unknown"):
            x = [f for f, la in zip(flags, labels) if la == lab]
            out[lab] = sum(x) / len(x) if x else None
        return out

    hit = [g == t for g, t in zip(got, true)]
    routed = [p["prediction"] == completion_text(p["answer"], "plain") for p in records]
    was = model.routing
    model.set_oracle(tok(texts)["input_ids"], true)
    model.routing = "oracle"
    try:
        golds = [completion_text(r["answer"], "plain") for r in records]
        longest = max(len(x) for x in tok(golds, add_special_tokens=False)["input_ids"])
        preds = generate(model, tok, texts, max_new_tokens=longest + 4,
                         batch_size=cfg.eval_batch)
        oracle = exact_match(preds, golds).tolist()
    finally:
        model.routing = was
    known = [la != "unknown" for la in labels]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"routing_accuracy": mean(hit), "routing_accuracy_by_label": by_label(hit),
            "routing_accuracy_known": mean([h for h, k in zip(hit, known) if k]),
            "routing_accuracy_by_experience": {
                str(e): mean([h for h, t, k in zip(hit, true, known) if k and t == e])
                for e in sorted({t for t, k in zip(true, known) if k})},
            "routed_to": {str(e): got.count(e) for e in sorted(set(got))},
            "misrouted": [{"question": r["question"], "label": r["label"], "true": t,
                           "routed": g} for r, g, t in zip(records, got, true)
                          if g != t and r["label"] != "unknown"][:10],
            "exact_match_router": mean([c for c, k in zip(routed, known) if k]),
            "exact_match_oracle": mean([c for c, k in zip(oracle, known) if k]),
            "exact_match_router_by_label": by_label(routed),
            "exact_match_oracle_by_label": by_label(oracle)}


def _value_maps(corpus):
    """attribute -> {value: people holding it (at the end)}, attribute -> its pool."""
    w = corpus.world
    codes = w.codes_at(w.last_experience)
    values, pools = {}, {}
    for a, name in enumerate(w.attributes):
        pool = list(w.people.pools[a])
        pools[name] = pool
        m: dict = {}
        for p, c in enumerate(codes[:, a].tolist()):
            if c >= 0:
                m.setdefault(pool[c], set()).add(p)
        values[name] = m
    return values, pools


def _cost(method, cfg, drv, plugins, data, n_train, n_attr, T) -> dict:
    """What the method costs beyond sequential finetuning."""
    from factlab.continual.methods import EWC, GenerativeReplay, LwF, Replay
    from factlab.continual.prompts import PromptLearning, PromptPool
    from factlab.continual.router import ExperienceAdapters
    from factlab.model.layers import decoder_layers

    c = {"trainable_params": int(n_train), "added_params_per_experience": 0,
         "buffer_examples": 0, "buffer_tokens": 0, "buffer_facts": 0,
         "extra_forward_per_row": 0.0, "extra_backward_examples": 0,
         "steps": cfg.steps * T, "rows": cfg.steps * T * cfg.batch_size}
    for p in plugins:
        if isinstance(p, PromptLearning) and isinstance(drv.model, PromptPool):
            m = drv.model
            depth = len(decoder_layers(m.backbone))
            c.update(extra_forward_per_row=(m.layer + 1) / depth,
                     prompt_positions=m.n_virtual, pool_params=int(n_train),
                     prompt_placement=m.placement)
            if m.kind == "coda":  # each experience adds its own components
                c["added_params_per_experience"] = int(n_train // m.experiences)
        if isinstance(p, ExperienceAdapters):
            added = [a["params"] for t, a in sorted(p.added.items()) if t > 0]
            c.update(added_params_per_experience=int(added[-1]) if added else 0,
                     adapters=len(added), adapter_params_total=int(sum(added)),
                     router_keys=int(sum(a["keys"] for a in p.added.values())),
                     extra_forward_per_row=0.0 if drv.model.routing == "sum" else
                     (drv.model.layer + 1) / len(decoder_layers(drv.model.backbone)))
        if isinstance(p, Replay):
            st = p.buffer_stats
            c.update(buffer_examples=st.get("examples", 0), buffer_tokens=st.get("tokens", 0),
                     buffer_facts=st.get("facts", 0))
        if isinstance(p, EWC):
            n_anchor = T if not p.online else 1  # base + experiences 1..T-1
            c.update(extra_backward_examples=int(p.samples * T),
                     ewc_stored_tensors=int(2 * n_train * n_anchor))
        if isinstance(p, GenerativeReplay):
            c.update(pseudo_bios=int(sum(x["generated"] for x in p.stats.values())),
                     pseudo_tokens=int(sum(x["tokens"] for x in p.stats.values())),
                     generative=p.stats)
        if isinstance(p, LwF):
            c.update(extra_forward_per_row=1.0, teacher_params=int(sum(
                q.numel() for q in drv.model.parameters())))
    if method == "lora":  # one adapter, trained through the stream
        c["adapter_params"] = int(n_train)
    if method == "cumulative":
        c["examples_seen_last"] = int(sum(len(d) for d in data))
    return c


def _chance(corpus, cfg: ContinualSettings) -> float | None:
    """A uniform guess over each attribute's pool: its expected exact match on the new and
    updated test facts (what row 0 should show on facts it cannot know)."""
    from factlab.corpus.stream import stream_facts

    f = stream_facts(corpus, base_people=cfg.eval_people)
    pools = {a: len(p) for a, p in zip(corpus.attributes, corpus.world.people.pools)}
    x = [1 / pools[r["attribute"]] for r in f.records() if r["label"] in ("new", "updated")]
    return sum(x) / len(x) if x else None


# -------------------------------------------------------------------------- the run
def _method_worker(args):
    method, cfg_json, stream_dir, model_dir, tok_dir, out, base_world = args
    cfg = ContinualSettings.model_validate(cfg_json)
    return run_method(method, cfg, Path(stream_dir), Path(model_dir), Path(tok_dir), Path(out),
                      progress=False, threads=1,
                      base_world_dir=Path(base_world) if base_world else None)


def _same(old: dict, new: dict) -> bool:
    """Is a run with the settings ``old`` (as stored) the run of ``new``? Compared on the
    keys ``old`` has: a later factlab that only adds settings (with their defaults)
    resumes an earlier run; methods may be added to a run."""
    from factlab.experiments.run import _subset

    return _subset(old, new)


def _run_jobs(jobs: list, parallel: int, progress: bool) -> list[dict]:
    """``_method_worker`` jobs, ``parallel`` at a time in their own processes (one thread
    each), or in this process."""
    if parallel > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        print(f"training {len(jobs)} methods, {min(parallel, len(jobs))} at a time",
              flush=True)
        with ProcessPoolExecutor(min(parallel, len(jobs)),
                                 mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(_method_worker, jobs))
    return [run_method(m, ContinualSettings.model_validate(c), Path(sd), Path(md), Path(td),
                       Path(o), progress=progress, base_world_dir=Path(bw) if bw else None)
            for m, c, sd, md, td, o, bw in jobs]


def run_continual(cfg: ContinualSettings, out, *, progress: bool = True) -> dict:
    """Every method of ``cfg`` over one stream; returns (and writes) the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "continual.json"
    mine = cfg.model_dump(mode="json")
    if marker.is_file():
        old = json.loads(marker.read_text(encoding="utf-8"))
        old.pop("methods", None)
        if not _same(old, mine):
            raise FactlabError(f"{out} holds a continual run of other settings; use another "
                               f"--out (or --force)")
    atomic_write_text(marker, json.dumps(mine, indent=1) + "\n")
    t0 = time.perf_counter()
    corpus, meta, model_dir, tok_dir = prepare_stream(cfg, out)
    sdir = Path(cfg.stream) if cfg.stream is not None else out / "stream"
    cell = (meta.get("base") or {}).get("cell") or cfg.base
    bw = str(Path(cell) / "world") if cell and (Path(cell) / "world").is_dir() else None
    jobs = [(m, mine, str(sdir), str(model_dir), str(tok_dir), str(out / m), bw)
            for m in cfg.methods]
    results = _run_jobs(jobs, cfg.parallel, progress)
    res = {"settings": mine, "stream": meta, "methods": results, "chance": _chance(corpus, cfg),
           "seconds": time.perf_counter() - t0}
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    return res


# -------------------------------------------------------------- seeds and orders
class ContinualFullSettings(ContinualSettings):
    """``factlab run continual-full``: every method over ``len(seeds) x len(orders)``
    streams (each seed draws other cohorts, updated people and training order; each
    order puts the experiences' kinds in another sequence), settings chosen once per
    method on the validation stream, mean ± spread per metric."""

    methods: list[str] = list(METHODS)
    seeds: list[int] = [0, 1, 2]
    orders: list[list[Literal["cohort", "update"]]] = [["cohort", "cohort", "update"],
                                                       ["update", "cohort", "cohort"]]


def _select_worker(args):
    method, cfg_json, model_dir, tok_dir, out, base_world = args
    import torch

    from factlab.tokens.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    cfg = ContinualSettings.model_validate(cfg_json)
    _, rec = select(method, cfg, Path(base_world), load_tokenizer(tok_dir), Path(model_dir),
                    Path(out), False, people=cfg.make.people)
    return method, rec


FULL_METRICS = (("A_T (with base)", "matrix_summary", "average_accuracy_with_base"),
                ("A_T", "matrix_summary", "average_accuracy"),
                ("learning acc.", "matrix_summary", "learning_accuracy"),
                ("forgetting", "matrix_summary", "forgetting"),
                ("BWT", "matrix_summary", "bwt"),
                ("base retention R[T,0]", "ckl", "invariant_retention"),
                ("update success", "ckl", "update_success"),
                ("stale rate", "ckl", "stale_rate"),
                ("new acquisition", "ckl", "new_acquisition"),
                ("FUAR", "ckl", "fuar"),
                ("confident on unknown", "hallucination", "confident_unknown_rate"),
                ("AUROC known/unknown", "hallucination", "auroc"))


def aggregate(cells: list[dict]) -> dict:
    """method -> metric -> {mean, std, n, values} over the cells' results."""
    import numpy as np

    out: dict = {}
    for cell in cells:
        for m in cell["methods"]:
            row = out.setdefault(m["method"], {})
            for label, group, key in FULL_METRICS:
                v = (m["summary"].get(group) or {}).get(key)
                row.setdefault(label, []).append(v)
    for method, row in out.items():
        for label, vals in row.items():
            x = np.array([v for v in vals if v is not None], dtype=float)
            row[label] = {"mean": float(x.mean()) if len(x) else None,
                          "std": float(x.std(ddof=1)) if len(x) > 1 else None,
                          "n": int(len(x)), "values": vals}
    return out


def run_continual_full(cfg: ContinualFullSettings, out, *, progress: bool = True) -> dict:
    """Select each method's settings once, then run every (seed, order) stream."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = cfg.model_dump(mode="json")
    marker = out / "continual_full.json"
    old = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    if old is not None:
        old.pop("methods", None)  # methods may be added to a run
    if old is not None and not _same(old, mine):
        raise FactlabError(f"{out} holds a continual-full run of other settings; use another "
                           f"--out (or --force)")
    atomic_write_text(marker, json.dumps(mine, indent=1) + "\n")
    t0 = time.perf_counter()
    from factlab.experiments.run import cell_model

    if cfg.base is None:
        raise FactlabError("continual-full: give base=RUN_CELL (its world seeds every stream)")
    cell = cell_model(Path(cfg.base))
    if cell is None:
        raise FactlabError(f"continual-full: base={cfg.base} is not a run cell (no world/)")
    model_dir, world_dir, tok_dir = cell
    base_cfg = ContinualSettings.model_validate(
        {k: v for k, v in mine.items() if k not in ("seeds", "orders")})
    chosen: dict = {}
    need = [m for m in cfg.methods if any(applies(k, m) for k in cfg.select)]
    jobs = [(m, base_cfg.model_dump(mode="json"), str(model_dir), str(tok_dir),
             str(out / "select" / m), str(world_dir)) for m in need]
    if jobs:
        print(f"choosing settings of {', '.join(need)} on the validation stream", flush=True)
        if cfg.parallel > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(cfg.parallel, len(jobs)),
                                     mp_context=mp.get_context("spawn")) as ex:
                chosen = dict(ex.map(_select_worker, jobs))
        else:
            chosen = dict(map(_select_worker, jobs))
    cells = []
    for order in cfg.orders:
        for seed in cfg.seeds:
            name = f"s{seed}-" + "-".join(k[0] for k in order)
            cell_cfg = base_cfg.model_copy(update={
                "select": {}, "seed": seed,
                "make": base_cfg.make.model_copy(update={"seed": seed, "order": list(order)})})
            cdir = out / "cells" / name
            cdir.mkdir(parents=True, exist_ok=True)
            _, stream, model_dir, tok_dir = prepare_stream(cell_cfg, cdir)
            jobs = []
            for m in cfg.methods:
                c = cell_cfg
                for k, v in (chosen.get(m) or {}).get("chosen", {}).items():
                    c = with_value(c, k, v)
                jobs.append((m, c.model_dump(mode="json"), str(cdir / "stream"), str(model_dir),
                             str(tok_dir), str(cdir / m), None))
            print(f"[{name}] {len(jobs)} methods", flush=True)
            results = _run_jobs(jobs, cfg.parallel, progress)
            results.sort(key=lambda m: cfg.methods.index(m["method"]))
            cells.append({"name": name, "seed": seed, "order": list(order), "stream": stream,
                          "methods": results})
    res = {"settings": mine, "select": chosen, "cells": cells, "aggregate": aggregate(cells),
           "seconds": time.perf_counter() - t0}
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    return res
