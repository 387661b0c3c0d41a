"""The probe: a frozen causal LM, a low-rank update of its token embedding, and per-task,
per-position norm + linear classifiers on its last hidden layer.

Trainable parameters (paper §5): for each *variant* ``g`` a rank-``r`` update of the
token-embedding matrix, ``E + U_g V_g`` (``U_g``: vocab x r, zero-initialised so training
starts from the model as it is; ``V_g``: r x width); for each task ``t`` and read position
``p`` a norm (LayerNorm for P-probing, BatchNorm for Q-probing) and a linear classifier.

``head="tied"`` replaces the free classifier (one weight row per class, which a few
hundred probe-training people cannot fit for 50 classes) by the backbone's own output
embedding: class ``c`` is scored by the mean output-embedding row of the tokens that write
it, after a learnt width x width map added to the identity (zero-initialised, so training
starts from reading the state as the model's own next-token head does) and a class bias.
The class vectors are fixed buffers copied from the backbone at construction; only the map
and the biases train.

What is shared — the point of this module. The backbone is the expensive part; the heads
are nearly free. Which embedding update a forward pass uses decides what can share it:

- ``per_task`` (default): one update per task (the paper trains a separate probe per
  task), shared by that task's read positions. Causal attention means the hidden state at
  ``p_k`` never depends on tokens after it, so all six positions of a task come from ONE
  pass over the bio. The T embedding variants are folded into the batch dimension:
  ``E[ids]`` is looked up once, the T low-rank deltas are added in one batched matmul,
  and the backbone runs once on ``T x B`` sequences (one call, large GEMMs) instead of T
  calls of ``B``. Tokens after the last read position are cut off before the pass.
- ``per_probe``: one update per (task, position) — fully separate probes, as if each of
  the 66 were trained alone; ``T x P`` variants in one folded pass.
- ``shared``: one update for every task: a single pass over ``B`` sequences serves all
  ``T x P`` classifiers (T times less backbone work than ``per_task``; the update is then
  a compromise between tasks, so accuracies can differ slightly from the per-task probe).

With ``rank=0`` there is no update at all, and one gradient-free pass serves everything.

Tasks trained together do not interact: every parameter belongs to one task (or one
probe), the loss is the *sum* of per-task losses and AdamW is per-parameter, so joint
training equals training each task alone on the same batches (the loop must not clip the
global gradient norm — :meth:`ProbeConfig.train_config` turns clipping off). Only the
``shared`` mode couples tasks, through its one update.

The backbone is held by reference and is *not* a registered submodule: checkpoints and
the saved probe hold only the probe's own parameters (KBs to MBs, not another copy of the
model), and the optimizer cannot see the backbone. Its weights get ``requires_grad=False``
and are never written; ``.to()`` and ``.train()`` on the probe are forwarded to it, so
while the probe trains the backbone runs in train mode (dropout on, as in the paper).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from factlab.errors import FactlabError
from factlab.tokens.streams import IGNORE

VARIANTS = {"shared": lambda T, P: 1, "per_task": lambda T, P: T, "per_probe": lambda T, P: T * P}


class ProbeModel(nn.Module):
    """``forward(input_ids (B, L), positions (B, P)) -> [logits (B, P, C_t) per task]``.

    ``positions`` index the token whose last hidden state is read (-1: absent; its
    logits are computed from position 0 and must be masked by the caller, as
    :func:`probe_loss` and :func:`factlab.probe.run.evaluate_probe` do).
    """

    def __init__(self, backbone, n_classes: Sequence[int], n_positions: int, *,
                 rank: int = 2, norm: str = "layer", embedding: str = "per_task",
                 seed: int = 0, head: str = "linear",
                 class_tokens: Sequence[Sequence[Sequence[int]]] | None = None):
        super().__init__()
        if head not in ("linear", "tied"):
            raise FactlabError(f"head={head!r}: choose linear or tied")
        if embedding not in VARIANTS:
            raise FactlabError(f"embedding={embedding!r}: choose one of {', '.join(VARIANTS)}")
        if norm not in ("layer", "batch"):
            raise FactlabError(f"norm={norm!r}: choose layer or batch")
        if not n_classes or min(n_classes) < 1 or n_positions < 1:
            raise FactlabError("a probe needs at least one task, class and position")
        backbone.requires_grad_(False)
        object.__setattr__(self, "backbone", backbone)  # by reference: see module doc
        emb = backbone.get_input_embeddings().weight
        V, d = emb.shape
        T, P = len(n_classes), int(n_positions)
        self.n_classes, self.n_positions, self.width = [int(c) for c in n_classes], P, d
        self.rank, self.norm = int(rank), norm
        self.embedding = embedding if rank else "shared"  # no update: nothing to vary
        self.n_variants = VARIANTS[self.embedding](T, P)
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        G = self.n_variants
        if self.rank:
            self.emb_u = nn.Parameter(torch.zeros(G, V, self.rank))
            scale = float(emb.detach().float().std())
            self.emb_v = nn.Parameter(torch.randn(G, self.rank, d, generator=g) * scale)
        self.norm_weight = nn.Parameter(torch.ones(T, P, d))
        self.norm_bias = nn.Parameter(torch.zeros(T, P, d))
        if norm == "batch":
            self.register_buffer("running_mean", torch.zeros(T, P * d))
            self.register_buffer("running_var", torch.ones(T, P * d))
        bound = d ** -0.5  # nn.Linear's init
        self.head_kind = head
        self.class_tokens = None
        if head == "linear":
            self.head_weight = nn.ParameterList(
                [nn.Parameter((torch.rand(P, C, d, generator=g) * 2 - 1) * bound)
                 for C in self.n_classes])
        else:
            self.class_tokens = self._check_class_tokens(class_tokens, V)
            out = backbone.get_output_embeddings()
            if out is None or out.weight.shape[-1] != d:
                raise FactlabError("head=tied needs the model's output embedding "
                                   "(an lm_head of the hidden width)")
            w = out.weight.detach().float()
            for t, toks in enumerate(self.class_tokens):
                self.register_buffer(f"class_vectors_{t}", torch.stack(
                    [w[torch.tensor(c, dtype=torch.long)].mean(0) for c in toks]))
            self.tied_map = nn.Parameter(torch.zeros(T, P, d, d))
        self.head_bias = nn.ParameterList(
            [nn.Parameter((torch.rand(P, C, generator=g) * 2 - 1) * bound
                          if head == "linear" else torch.zeros(P, C))
             for C in self.n_classes])
        super()._apply(lambda t: t.to(emb.device))

    # the backbone follows the probe's device and mode -------------------------------
    def _check_class_tokens(self, class_tokens, vocab: int) -> list[list[list[int]]]:
        if class_tokens is None or len(class_tokens) != len(self.n_classes):
            raise FactlabError("head=tied needs each task's class tokens")
        out = []
        for t, (toks, C) in enumerate(zip(class_tokens, self.n_classes)):
            toks = [[int(i) for i in c] for c in toks]
            if len(toks) != C or any(not c or min(c) < 0 or max(c) >= vocab for c in toks):
                raise FactlabError(f"head=tied: task {t} needs {C} classes of token ids "
                                   f"in [0, {vocab}), got {len(toks)}")
            out.append(toks)
        return out

    def _apply(self, fn, recurse=True):
        self.backbone._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(mode)
        return self

    @property
    def n_tasks(self) -> int:
        return len(self.n_classes)

    # ------------------------------------------------------------------ forward
    def features(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states read at ``positions``: (T, B, P, width), float32."""
        T, P, G = self.n_tasks, self.n_positions, self.n_variants
        B = input_ids.shape[0]
        # causal attention: tokens after the last read position change nothing
        last = int(positions.max()) + 1 if positions.numel() else 1
        ids = input_ids[:, :max(last, 1)]
        L = ids.shape[1]
        embed = self.backbone.get_input_embeddings()
        x = embed(ids)  # (B, L, d): looked up once for every variant
        d = x.shape[-1]
        base = self.backbone.base_model
        if self.rank:
            # the G low-rank deltas in one batched matmul, folded into the batch dim
            delta = torch.einsum("gblr,grd->gbld", self.emb_u[:, ids], self.emb_v)
            x = (x.unsqueeze(0) + delta).to(x.dtype).reshape(G * B, L, d)
            h = base(inputs_embeds=x, use_cache=False).last_hidden_state
        else:
            with torch.no_grad():
                h = base(inputs_embeds=x, use_cache=False).last_hidden_state
        h = h.view(G, B, L, d)
        idx = positions.clamp(min=0)
        if self.embedding == "per_probe":  # variant t*P + p reads position p only
            gi = idx.T.repeat(T, 1)  # (G, B)
            f = h.gather(2, gi[:, :, None, None].expand(G, B, 1, d)).squeeze(2)
            f = f.view(T, P, B, d).transpose(1, 2)
        else:
            f = h.gather(2, idx[None, :, :, None].expand(G, B, P, d))
            if G == 1:
                f = f.expand(T, B, P, d)
        return f.float()

    def head(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Task ``t``'s norm + classifier on features (B, P, d) -> logits (B, P, C_t)."""
        B, P, d = x.shape
        if self.norm == "layer":
            x = F.layer_norm(x, (d,))
        else:  # BatchNorm over the batch, one set of statistics per (task, position, dim)
            x = F.batch_norm(x.reshape(B, P * d), self.running_mean[t], self.running_var[t],
                             None, None, self.training, 0.1, 1e-5).view(B, P, d)
        x = x * self.norm_weight[t] + self.norm_bias[t]
        if self.head_kind == "tied":
            x = x + torch.einsum("bpd,pde->bpe", x, self.tied_map[t])
            return x @ getattr(self, f"class_vectors_{t}").T + self.head_bias[t]
        return torch.einsum("bpd,pcd->bpc", x, self.head_weight[t]) + self.head_bias[t]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(input_ids, positions)
        return [self.head(t, f[t]) for t in range(self.n_tasks)]

    # ------------------------------------------------------------------ saving
    def config(self) -> dict:
        return {"n_classes": self.n_classes, "n_positions": self.n_positions,
                "rank": self.rank, "norm": self.norm, "embedding": self.embedding,
                "seed": self.seed, "head": self.head_kind, "class_tokens": self.class_tokens}

    def save_pretrained(self, path, safe_serialization: bool = True, **_) -> None:
        """The probe's own parameters (``probe.safetensors``) and shape
        (``probe_config.json``); never the backbone. The loop's export calls this."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / "probe.safetensors"))
        (path / "probe_config.json").write_text(json.dumps(self.config(), indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, path, backbone) -> ProbeModel:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "probe_config.json").is_file():
            raise FactlabError(f"{path}: not a saved probe (no probe_config.json)")
        cfg = json.loads((path / "probe_config.json").read_text())
        model = cls(backbone, cfg["n_classes"], cfg["n_positions"], rank=cfg["rank"],
                    norm=cfg["norm"], embedding=cfg["embedding"], seed=cfg.get("seed", 0),
                    head=cfg.get("head", "linear"), class_tokens=cfg.get("class_tokens"))
        model.load_state_dict(load_file(str(path / "probe.safetensors")))
        return model


def probe_loss(logits: list[torch.Tensor], positions: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of the mean cross-entropy over that task's valid (row, position)
    pairs: a position must exist and the row must have a label for the task. The sum (not
    a mean over tasks) gives each task the gradient it would get if trained alone."""
    valid = positions >= 0
    total = logits[0].new_zeros((), dtype=torch.float32)
    for t, lg in enumerate(logits):
        y = targets[:, t:t + 1].expand_as(positions)
        y = torch.where(valid & (y >= 0), y, IGNORE)
        n = (y >= 0).sum().clamp(min=1)
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), y.reshape(-1),
                             ignore_index=IGNORE, reduction="sum")
        total = total + ce / n
    return total
