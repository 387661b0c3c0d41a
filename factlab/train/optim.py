"""Parameter groups and the optimizers of the one loop.

A plugin's ``trainable(loop)`` returns parameters, or parameter groups (dicts):

    {"params": [...], "lr": 1e-2, "weight_decay": 0.0, "sparse": True, "name": "bank"}

``lr`` defaults to the run's ``lr``; ``weight_decay`` to the run's on matrices and 0 on
vectors (biases, norms); ``sparse`` marks an embedding-like table updated a few rows at a
time (a memory bank's values, a prompt pool's keys). The groups of every plugin are united
(a parameter claimed twice is an error); with no plugin claiming any, every parameter with
``requires_grad`` trains.

Dense groups go to one optimizer chosen by ``TrainConfig.optimizer`` (fused AdamW,
transformers' Adafactor -- the Lamini paper's -- or SGD). Sparse groups go to a second one
chosen by ``TrainConfig.sparse_optimizer``:

- ``row_adagrad`` (default): Adagrad with one accumulator per *row* (the mean of the
  row's squared gradient), as in DLRM / FBGEMM's row-wise Adagrad. Its state is one float
  per row: 4 MB for a 1M-slot bank, where Adam's two moments would be 2 x N x width floats
  (1 GB at 1M x 128). No maintained CPU package provides it, hence the few lines below.
- ``sparse_adam``: ``torch.optim.SparseAdam`` (dense moments, updated lazily).
- ``sgd``: plain SGD, no state.

Both optimizers step once per optimizer step, each with its own ``LambdaLR`` on the same
warmup/decay schedule (each group's own lr scaled by it). Gradient clipping applies to
dense parameters only: sparse gradients are excluded from the norm (a few hundred touched
rows of a million would otherwise be scaled by the norm of the rest of the model). Both
are checkpointed. Under DDP dense gradients are all-reduced as usual; sparse groups are
refused with more than one process (not implemented: NCCL cannot all-reduce sparse
tensors).
"""

from __future__ import annotations

import torch

from factlab.errors import FactlabError


def param_groups(claimed: list, default_params, cfg) -> list[dict]:
    """Normalise the plugins' ``trainable`` results (``claimed``: list of (plugin name,
    result)) into groups with ``params``, ``lr``, ``weight_decay``, ``sparse``, ``name``."""
    raw: list[tuple[str, dict]] = []
    for who, got in claimed:
        if got is None:
            continue
        if isinstance(got, dict):
            got = [got]
        got = list(got)
        if got and all(isinstance(g, dict) for g in got):
            raw += [(who, dict(g)) for g in got]
        elif any(isinstance(g, dict) for g in got):
            raise FactlabError(f"plugin {who!r}: trainable() mixes parameters and groups")
        else:
            raw.append((who, {"params": got}))
    if not raw:
        raw = [("model", {"params": [p for p in default_params if p.requires_grad]})]
    groups, seen = [], set()
    for who, g in raw:
        unknown = set(g) - {"params", "lr", "weight_decay", "sparse", "name"}
        if unknown:
            raise FactlabError(f"plugin {who!r}: unknown parameter-group key {sorted(unknown)[0]!r}")
        params = list(g["params"])
        for p in params:
            if id(p) in seen:
                raise FactlabError(f"plugin {who!r}: a parameter is claimed by two groups")
            seen.add(id(p))
        if not params:
            continue
        lr = cfg.lr if g.get("lr") is None else float(g["lr"])
        if lr < 0:
            raise FactlabError(f"plugin {who!r}: a group's lr must be >= 0, got {lr}")
        base = {"lr": lr, "sparse": bool(g.get("sparse", False)), "name": g.get("name", who)}
        if base["sparse"] and g.get("weight_decay"):
            raise FactlabError(f"plugin {who!r}: group {base['name']!r}: weight decay on a "
                               f"sparse-row group is not supported (it would touch every row)")
        if base["sparse"] or "weight_decay" in g:
            groups.append({**base, "params": params,
                           "weight_decay": float(g.get("weight_decay", 0.0))})
        else:  # weight decay on matrices only (not biases, norms)
            mats = [p for p in params if p.dim() >= 2]
            vecs = [p for p in params if p.dim() < 2]
            groups += [{**base, "params": ps, "weight_decay": wd}
                       for ps, wd in ((mats, cfg.weight_decay), (vecs, 0.0)) if ps]
    if not groups:
        raise FactlabError("no trainable parameters")
    return groups


def _torch_groups(groups: list[dict]) -> list[dict]:
    return [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in groups]


def dense_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    tg = _torch_groups(groups)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "adamw":
        # fused AdamW (one kernel for all tensors) on CUDA and, since torch 2.4, on CPU
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params) \
            and len({p.device.type for p in params}) == 1
        return torch.optim.AdamW(tg, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # fixed lr under the loop's schedule (not Adafactor's own relative step)
        return Adafactor(tg, lr=cfg.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(tg, lr=cfg.lr, momentum=cfg.momentum)
    raise FactlabError(f"unknown optimizer {cfg.optimizer!r}")


def sparse_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    tg = [{"params": g["params"], "lr": g["lr"]} for g in groups]
    if cfg.sparse_optimizer == "row_adagrad":
        return RowAdagrad(tg, lr=cfg.lr, eps=cfg.eps)
    if cfg.sparse_optimizer == "sparse_adam":
        return torch.optim.SparseAdam(tg, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.sparse_optimizer == "sgd":
        return torch.optim.SGD(tg, lr=cfg.lr)
    raise FactlabError(f"unknown sparse_optimizer {cfg.sparse_optimizer!r}")


class RowAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of a 2-D parameter (see the module doc).

    Accepts sparse (COO, e.g. from ``embedding_bag(..., sparse=True)``) and dense
    gradients; with a dense gradient only rows with a non-zero gradient are touched, so
    untouched slots never move and their accumulator stays as it was. The accumulator is
    fp32 whatever the table's dtype, also after a resume (``load_state_dict`` would cast it
    to the parameter's dtype).
    """

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-10):
        if lr <= 0:
            raise FactlabError(f"RowAdagrad: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    def load_state_dict(self, state_dict):
        # torch casts floating state to the parameter's dtype: keep the fp32 originals
        sums = {int(k): v["sum"].clone() for k, v in state_dict["state"].items() if "sum" in v}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, v in sums.items():
            self.state[params[k]]["sum"] = v.float().to(params[k].device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise FactlabError("RowAdagrad updates 2-D tables (rows x width)")
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    rows, vals = g.indices()[0], g.values()
                else:
                    rows = torch.nonzero(g.abs().sum(1)).flatten()
                    vals = g[rows]
                if rows.numel() == 0:
                    continue
                v = vals.float()
                acc = state["sum"].index_add_(0, rows, v.pow(2).mean(1))
                step = v / (acc[rows].sqrt() + group["eps"])[:, None]
                p.index_add_(0, rows, (-group["lr"] * step).to(p.dtype))
        return None


def state_bytes(optimizers) -> int:
    """Bytes of optimizer state (moments, accumulators) across ``optimizers``."""
    n = 0
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    n += v.numel() * v.element_size()
    return n
