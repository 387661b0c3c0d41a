"""Bits of knowledge a model stores (Physics of Language Models, Part 3.3), as a pure
function of the model's losses on the values it was trained on.

Part 3.3 bounds what a model trained on bioS(N) holds: for attribute k, whose value each
person draws uniformly from D_k possibilities, a model whose summed loss on the value's
tokens is p_k nats (per person, teacher-forced after the text before the value) holds
at least ``N · log2(D_k / e^{p_k}) = N · (log2 D_k − p_k / ln 2)`` bits of it: the value's
entropy minus what the model still does not know (its cross-entropy, in bits). A model
certain of every value stores exactly the world's entropy Σ_k N log2 D_k; one at chance
(uniform over the D_k values, p_k = ln D_k) stores zero; one worse than chance is
counted as zero, not negative. (The paper's name term — the entropy of the names — and
its diversity term for values drawn from a learned vocabulary are left out: bioS names
and values come from fixed pools here.) An attribute that is a function of another
(bioS's company city follows the employer) has D = 1 given it: zero bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from factlab.errors import FactlabError


def bits_stored(value_nll: Mapping[str, np.ndarray], pool_sizes: Mapping[str, int]) -> dict:
    """Bits stored per attribute and in total.

    ``value_nll[a]``: (N,) the model's summed NLL in nats of each person's value of ``a``;
    ``pool_sizes[a]``: D_a, the number of values ``a`` is drawn uniformly from (1 for a
    derived attribute). Returns ``{"attributes": {a: {"bits", "entropy_bits", "people",
    "mean_nll_nats"}}, "bits": total, "entropy_bits": total, "fraction": bits / entropy}``.
    """
    out: dict = {"attributes": {}}
    total = entropy = 0.0
    for a, nll in value_nll.items():
        if a not in pool_sizes:
            raise FactlabError(f"capacity: no pool size for attribute {a!r}")
        d = int(pool_sizes[a])
        if d < 1:
            raise FactlabError(f"capacity: attribute {a!r} has pool size {d}; need >= 1")
        x = np.asarray(nll, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all() or (x < 0).any():
            raise FactlabError(f"capacity: the losses of {a!r} must be finite and >= 0 "
                               f"(summed NLL in nats)")
        n = len(x)
        h = n * math.log2(d)
        bits = max(0.0, h - float(x.sum()) / math.log(2))
        out["attributes"][a] = {"bits": bits, "entropy_bits": h, "people": n,
                                "mean_nll_nats": float(x.mean()) if n else None}
        total += bits
        entropy += h
    out.update(bits=total, entropy_bits=entropy,
               fraction=total / entropy if entropy > 0 else None)
    return out


def bits_per_parameter(bits: float, parameters: int) -> float:
    """Part 3.3's unit: about 2 bits per parameter at 1,000 exposures, 1 at 100."""
    if parameters < 1:
        raise FactlabError(f"capacity: parameters must be >= 1, got {parameters}")
    return float(bits) / int(parameters)
