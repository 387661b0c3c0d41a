"""The frozen LM's own representation of an input: the query that prompt pools (L2P,
DualPrompt, CODA-Prompt) and experience routers select by.

The query is a decoder layer's output of the **unprompted, unadapted** backbone, pooled
over one of:

- ``name`` (default): the first span of the input that is an entity's name (the longest
  known name starting at the earliest position). A biography and a question about the same
  person share the name and little else; and in a causal LM the states of the name's
  tokens depend only on what comes before them, so a question's query is the same with or
  without its answer appended (training rows, teacher-forced scoring) as in generation.
  An input with no known name falls back to ``mean`` (counted: :attr:`NameIndex.misses`).
- ``mean``: every attended position (L2P's image-level query, ported; a question's
  query then changes when its answer is appended).
- ``last``: the last attended position.

Padding on either side is handled by the attention mask; position ids are derived from
it, so a row's query does not depend on what else is in its batch.
"""

from __future__ import annotations

import contextlib

import torch

from factlab.errors import FactlabError
from factlab.model.layers import decoder_layers

POOLS = ("name", "mean", "last")


class NameIndex:
    """Token sequences of entity names, as they occur at the start of a text and after a
    space (``ids``: a list of token-id lists; :meth:`from_names` encodes names)."""

    def __init__(self, ids: list[list[int]]):
        self.ids = sorted({tuple(int(x) for x in s) for s in ids if len(s)})
        self.by_first: dict[int, list[tuple]] = {}
        for s in self.ids:
            self.by_first.setdefault(s[0], []).append(s)
        for v in self.by_first.values():
            v.sort(key=len, reverse=True)  # longest first: "Anya Briar" before "Anya"
        self.misses = 0  # inputs where no name was found (pooled by mean instead)

    @classmethod
    def from_names(cls, tokenizer, names) -> NameIndex:
        seqs = []
        for n in names:
            for text in (n, " " + n):
                seqs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return cls(seqs)

    def __len__(self) -> int:
        return len(self.ids)

    def spans(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the first name span of every row (all False: none found)."""
        ids = input_ids.tolist()
        am = attention_mask.tolist()
        out = torch.zeros(input_ids.shape, dtype=torch.bool)
        for r, (row, m) in enumerate(zip(ids, am)):
            L = len(row)
            for i in range(L):
                if not m[i]:
                    continue
                for s in self.by_first.get(row[i], ()):
                    n = len(s)
                    if i + n <= L and tuple(row[i:i + n]) == s and all(m[i:i + n]):
                        out[r, i:i + n] = True
                        break
                if out[r].any():
                    break
        return out.to(input_ids.device)


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not 0 <= int(layer) < n:
        raise FactlabError(f"query layer {layer} is beyond the model's depth: choose one of "
                           f"0..{n - 1}")
    return int(layer)


def default_layer(model) -> int:
    """About 2/3 of the depth (middle to late)."""
    n = len(decoder_layers(model))
    return max(0, min(n - 1, round(2 * n / 3) - 1))


class _Stop(Exception):
    pass


def _unadapted(model):
    """A context where a peft model runs without its adapters (the plain backbone)."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter()
    return contextlib.nullcontext()


@torch.no_grad()
def frozen_query(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 *, layer: int, pool: str = "name", names: NameIndex | None = None
                 ) -> torch.Tensor:
    """(B, d) fp32 query of every row: ``layer``'s output of ``backbone`` pooled by
    ``pool`` (module doc). The forward stops at ``layer``."""
    if pool not in POOLS:
        raise FactlabError(f"query pool {pool!r}: choose one of {', '.join(POOLS)}")
    if pool == "name" and names is None:
        raise FactlabError("query pool 'name' needs the entities' names (a NameIndex)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device)
    blocks = decoder_layers(backbone)
    box = {}

    def grab(module, args, output):
        box["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = blocks[layer].register_forward_hook(grab)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    was = backbone.training
    backbone.eval()
    try:
        with _unadapted(backbone):
            try:
                backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                         use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        backbone.train(was)
    if "h" not in box:
        raise FactlabError("query: the backbone never ran its decoder layer")
    h = box["h"].float()
    m = attention_mask.bool()
    if pool == "last":
        last = (m.long() * torch.arange(m.shape[1], device=m.device)).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    w = m
    if pool == "name":
        s = names.spans(input_ids, attention_mask)
        found = s.any(1)
        names.misses += int((~found).sum())
        w = torch.where(found[:, None], s, m)
    w = w.to(h.dtype)
    return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
