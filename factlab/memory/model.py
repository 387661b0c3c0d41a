"""A frozen backbone with product-key memory banks added to some of its layers.

Each bank reads a decoder layer's output hidden states and adds its output to them
(additively, on the residual stream), at the layers given or by default at about 1/4,
1/2 and 3/4 of the depth. Value rows start at zero, so before tuning the wrapped model
equals the backbone exactly. An optional relevance gate (a sigmoid of a linear read of the
hidden state, per position) scales each bank's output: trained with negative examples
(``MemoryTuning(negatives=...)``) it learns to stay shut on questions the bank does not
hold. The backbone is held by reference (``factlab.model.wrapper.FrozenBackbone``) and
never copied; ``save_pretrained`` writes only the banks (+ the backbone's path and hash).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from factlab.errors import FactlabError
from factlab.memory.bank import ProductKeyMemory
from factlab.model.wrapper import FrozenBackbone

# where the decoder layers of each supported family live
_LAYERS = ("gpt_neox.layers", "model.layers", "transformer.h", "model.decoder.layers")


def decoder_layers(model) -> nn.ModuleList:
    for path in _LAYERS:
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod):
            return mod
    mtype = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise FactlabError(f"memory: cannot find the decoder layers of a {mtype!r} model "
                       f"(supported: GPT-NeoX, Llama, Mistral, Qwen2, GPT-2 and others "
                       f"with {' / '.join(_LAYERS)})")


def default_layers(n_layers: int) -> list[int]:
    """About 1/4, 1/2 and 3/4 of the depth (distinct, in range)."""
    return sorted({min(n_layers - 1, max(0, round(f * n_layers) - 1)) for f in (0.25, 0.5, 0.75)})


class MemoryModel(FrozenBackbone):
    def __init__(self, backbone, *, layers: list[int] | None = None, n_keys: int = 256,
                 heads: int = 4, topk: int = 32, key_dim: int = 64, routing: str = "pinned",
                 gate: bool = False, null: float | None = None, seed: int = 0,
                 backbone_path: str | None = None,
                 backbone_train: bool = False):
        super().__init__(backbone, backbone_path=backbone_path, backbone_train=backbone_train)
        blocks = decoder_layers(backbone)
        layers = default_layers(len(blocks)) if layers is None else [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < len(blocks)]
        if bad or not layers or len(set(layers)) != len(layers):
            raise FactlabError(f"memory layers {layers}: need distinct layer indices in "
                               f"[0, {len(blocks)})")
        d = backbone.config.hidden_size
        self.layers, self.gate = layers, bool(gate)
        self.kw = dict(n_keys=n_keys, heads=heads, topk=topk, key_dim=key_dim, routing=routing,
                       null=null)
        self.seed = seed
        self.banks = nn.ModuleList(
            ProductKeyMemory(d, d, seed=seed + 1000 * i, **self.kw) for i in range(len(layers)))
        if self.gate:
            self.gates = nn.ModuleList(nn.Linear(d, 1) for _ in layers)
            for g in self.gates:  # starts half open; zero values keep the output exact
                nn.init.zeros_(g.weight)
                nn.init.zeros_(g.bias)
        self.last_route: dict[int, tuple] = {}
        self.record_routes = False
        dev = next(backbone.parameters()).device
        super()._apply(lambda t: t.to(dev))  # the banks where the backbone is (fp32)
        for i, li in enumerate(layers):
            self.add_hook(blocks[li], functools.partial(self._add, i))

    def _add(self, i, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        bank = self.banks[i]
        if self.record_routes:
            m, scores, idx = bank(h, return_route=True)
            self.last_route[i] = (scores.detach(), idx.detach())
        else:
            m = bank(h)
        if self.gate:
            m = m * torch.sigmoid(self.gates[i](h.to(self.gates[i].weight.dtype)))
        h = h + m.to(h.dtype)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    # --------------------------------------------------------------- parameter groups
    def value_parameters(self) -> list[nn.Parameter]:
        return [b.values.weight for b in self.banks]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for b in self.banks for p in b.router_parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters()) if self.gate else []

    def freeze_routing(self) -> None:
        for b in self.banks:
            b.router_parameters_frozen(True)

    def zero_bank(self) -> None:
        """Erase every stored value (what the bank holds, gone): recall must fall back to
        the backbone's."""
        with torch.no_grad():
            for p in self.value_parameters():
                p.zero_()

    @property
    def slots(self) -> int:
        return sum(b.slots for b in self.banks)

    @torch.no_grad()
    def routes(self, input_ids, attention_mask=None) -> dict[int, torch.Tensor]:
        """The slot indices (T, H, k) every bank selects at every position of a batch."""
        self.record_routes = True
        try:
            self.forward(input_ids=input_ids, attention_mask=attention_mask)
            return {i: r[1].view(*input_ids.shape, *r[1].shape[1:])
                    for i, r in self.last_route.items()}
        finally:
            self.record_routes = False
            self.last_route = {}

    # -------------------------------------------------------------------- persistence
    def wrapper_config(self) -> dict:
        return {"layers": self.layers, "gate": self.gate, "seed": self.seed, **self.kw}
