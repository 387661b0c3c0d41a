"""The causal-LM loss of the one loop, computed only where there is something to learn.

HF causal LMs compute logits at every position, then a cross-entropy whose masked
positions (``labels == -100``: QA prompts, padding of whole-document packing) are thrown
away. Here the output head sees only the hidden states of the positions that carry a
target, so masked positions cost neither the head's matmul nor the softmax — with
answer-only QA finetuning that is most of them, with whole-document packing at context 128
about 40%. The cross-entropy itself is one fused autograd function (log-sum-exp forward,
``softmax - onehot`` backward) instead of ``log_softmax`` + ``nll_loss``, whose backward
fills and re-reads a ``positions x vocabulary`` gradient.

When the head is a plain ``nn.Linear`` (every factlab model and most HF causal LMs), head
and cross-entropy are one autograd function that walks the target rows in chunks of a few
MB: logits, softmax, loss and both gradients (hidden states and head weight) are computed
chunk by chunk while the chunk is in cache, and the ``positions x vocabulary`` logits never
exist whole (at GPT-2's 50k vocabulary that is also most of the activation memory).
Other heads keep the unfused path (the head on the selected rows, then the fused
cross-entropy).

The selection and the fused head run *inside* the model's forward (the head's forward is
swapped for the call), so DDP, ``peft`` wrappers and ``accelerate`` see an ordinary forward
call.

The value equals HF's ``ForCausalLMLoss`` (mean over target tokens of the micro-batch,
labels shifted by one) to float rounding; ``tests/test_lm_loss.py`` checks value and
gradients against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class LMOutput:
    """What ``Plugin.extra_loss`` receives from the default LM loss.

    ``hidden``: (n, d) final hidden states of the n target positions, in batch order;
    ``logits``: (n, V) their logits (computed from ``hidden`` on first use when the head
    was fused into the loss; differentiable either way);
    ``mask``: (B, L) bool, True where position t predicts ``targets[mask]`` (token t+1);
    ``targets``: (n,) the target ids;
    ``nll``: (n,) detached per-position negative log-likelihood (fp32);
    ``argmax``: (n,) bool, the target is the argmax of its position's logits (a tie with
    another token counts as the argmax);
    ``row``: (n,) the micro-batch row each target position belongs to.

    Per-row reductions (:meth:`row_nll`, :meth:`row_max_nll`, :meth:`row_all_argmax`) turn
    these into per-example numbers: with one QA example per row, "every answer token, EOS
    included, is the argmax" is exactly "greedy decoding reproduces this answer", so a
    method can decide that a fact is learned without generating."""

    loss: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    head: torch.nn.Module | None = None
    _logits: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    argmax: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits

    @property
    def row(self) -> torch.Tensor:
        return self.mask.nonzero()[:, 0]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def row_nll(self) -> torch.Tensor:
        """(B,) summed target NLL of every row (0 for a row without targets)."""
        return torch.zeros(self.rows, device=self.nll.device).index_add_(0, self.row, self.nll)

    def row_max_nll(self) -> torch.Tensor:
        """(B,) largest per-token NLL of every row (0 for a row without targets)."""
        out = torch.zeros(self.rows, device=self.nll.device)
        return out.scatter_reduce_(0, self.row, self.nll, reduce="amax", include_self=True)

    def row_all_argmax(self) -> torch.Tensor:
        """(B,) bool: every target of the row is its position's argmax (rows without
        targets: False)."""
        wrong = torch.zeros(self.rows, dtype=torch.long, device=self.nll.device)
        wrong.index_add_(0, self.row, (~self.argmax).long())
        return (wrong == 0) & self.mask.any(1)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target of position t is ``labels[t + 1]``; the last position has none."""
    pad = torch.full_like(labels[:, :1], IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` (n, V) against ``targets`` (n,), all valid."""

    @staticmethod
    def forward(ctx, logits, targets):
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(1, targets[:, None]).squeeze(1)
        n = max(len(targets), 1)
        ctx.save_for_backward(x, lse, targets)
        ctx.n, ctx.dtype = n, logits.dtype
        nll = lse - picked
        top = picked >= x.amax(1)
        ctx.mark_non_differentiable(nll, top)
        return nll.sum() / n, nll, top

    @staticmethod
    def backward(ctx, g, _nll=None, _top=None):
        x, lse, targets = ctx.saved_tensors
        grad = torch.sub(x, lse[:, None]).exp_()  # softmax
        grad.scatter_add_(1, targets[:, None],
                          torch.full((len(targets), 1), -1.0, dtype=grad.dtype,
                                     device=grad.device))
        grad.mul_(g / ctx.n)
        return grad.to(ctx.dtype), None


CHUNK_BYTES = 4 << 20  # fp32 logits per chunk of the fused head: a few MB, cache-sized


def _autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch / unknown device
        pass
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T + bias`` against ``targets``, head included.

    Forward walks the rows in chunks; for each it computes the logits, the loss and the
    gradient ``softmax - onehot`` in place, then ``grad_h = grad @ weight`` and
    ``grad_weight += grad.T @ h``. Backward only scales the saved gradients. The matmuls
    run in the autocast dtype when autocast is on (bf16 on GPUs), softmax in fp32."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        n = h.shape[0]
        dt = _autocast_dtype(h.device.type) or h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)
            b = bias.float() if bias is not None else None
            gh = torch.empty_like(h) if need_h else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w \
                else None
            gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b \
                else None
            nll = torch.empty(n, dtype=torch.float32, device=h.device)
            top = torch.empty(n, dtype=torch.bool, device=h.device)
            for a in range(0, n, chunk):
                hc, tc = h[a:a + chunk].to(dt), targets[a:a + chunk]
                z = (hc @ w.t()).float()
                if b is not None:
                    z += b
                picked = z.gather(1, tc[:, None])
                zmax = z.amax(1, keepdim=True)
                top[a:a + chunk] = (picked >= zmax).squeeze(1)  # free: the max is needed anyway
                z.sub_(zmax).exp_()
                s = z.sum(1, keepdim=True)
                nll[a:a + chunk] = (s.log() + zmax - picked).squeeze(1)
                if not (need_h or need_w or need_b):
                    continue
                z.div_(s)  # softmax; minus onehot below is d(loss_sum)/d(logits)
                z.scatter_add_(1, tc[:, None], torch.full_like(picked, -1.0))
                if gb is not None:
                    gb += z.sum(0)
                g = z.to(dt)
                if gh is not None:
                    gh[a:a + chunk] = g @ w
                if gw is not None:  # the matmul in dt (bf16 on GPUs), accumulated in fp32
                    if dt == torch.float32:
                        gw.addmm_(g.t(), hc)
                    else:
                        gw += (g.t() @ hc).float()
        ctx.save_for_backward(*(x for x in (gh, gw, gb) if x is not None))
        ctx.has = (gh is not None, gw is not None, gb is not None)
        ctx.n, ctx.w_dtype = max(n, 1), weight.dtype
        ctx.mark_non_differentiable(nll, top)
        return nll.sum() / ctx.n, nll, top

    @staticmethod
    def backward(ctx, g, _nll=None, _top=None):
        saved = iter(ctx.saved_tensors)
        gh, gw, gb = (next(saved) if has else None for has in ctx.has)
        scale = g / ctx.n
        return (gh * scale.to(gh.dtype) if gh is not None else None,
                (gw * scale).to(ctx.w_dtype) if gw is not None else None,
                (gb * scale).to(ctx.w_dtype) if gb is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int | None = None, *,
                         per_token: bool = False):
    """Mean token cross-entropy of the linear head ``(weight, bias)`` on hidden states ``h``
    (n, d) against ``targets`` (n,), without materialising the (n, V) logits.
    ``per_token=True`` returns ``(mean, nll (n,), argmax (n,) bool)``, both detached."""
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        if h.is_cuda:
            chunk *= 16
    out = _LinearCrossEntropy.apply(h, weight, bias, targets, int(chunk))
    return out if per_token else out[0]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, per_token: bool = False):
    """Mean token cross-entropy; ``logits`` (n, V), ``targets`` (n,) with no ignored ids.
    ``per_token=True`` returns ``(mean, nll (n,), argmax (n,) bool)``, both detached."""
    out = _CrossEntropy.apply(logits, targets)
    return out if per_token else out[0]


DEFAULT_INPUTS = frozenset({"input_ids", "attention_mask"})


def output_head(model) -> torch.nn.Module | None:
    """The model's output-embedding module (what the target-position selection hooks), or
    None for a model that has none (it then keeps its own loss / full logits)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        head = None
    return head if isinstance(head, torch.nn.Module) else None


def model_kwargs(batch: dict, inputs=DEFAULT_INPUTS) -> dict:
    """The keys of ``batch`` a model's forward receives: those named in ``inputs`` (a
    stream's ``model_inputs``). Labels and bookkeeping columns (example / experience ids)
    never reach the model: nothing tells it which experience a row came from."""
    return {k: batch[k] for k in inputs if k in batch and k != "labels"}


def _fit(mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, L) for hidden states ``h`` (B, P + L, d): a wrapper that prepends P
    positions of its own (prompt tuning, a prompt pool) has no target there."""
    extra = h.shape[1] - mask.shape[1]
    if extra == 0:
        return mask
    if extra < 0:
        raise RuntimeError(f"the model returned {h.shape[1]} positions for {mask.shape[1]} "
                           f"input positions")
    return torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1)


def causal_lm_loss(fwd, head: torch.nn.Module, batch: dict,
                   inputs=DEFAULT_INPUTS) -> tuple[torch.Tensor, LMOutput]:
    """Loss of ``fwd`` (the model, possibly wrapped) on ``batch`` (labels plus the model
    inputs named in ``inputs``, see :func:`model_kwargs`); ``head`` is the unwrapped model's
    output embedding."""
    targets = shifted_targets(batch["labels"])
    mask = targets != IGNORE
    t = targets[mask]
    kwargs = model_kwargs(batch, inputs)
    if type(head) is torch.nn.Linear:
        box = {}

        def fused(h):
            hs = box["hidden"] = h[_fit(mask, h)]
            box["loss"], box["nll"], box["top"] = linear_cross_entropy(
                hs, head.weight, head.bias, t, per_token=True)
            return hs.new_zeros((hs.shape[0], 0))  # stands in for the logits

        before = head.__dict__.get("forward")  # e.g. an accelerate hook's
        head.forward = fused
        try:
            fwd(**kwargs, use_cache=False)
        finally:
            if before is None:
                del head.forward
            else:
                head.forward = before
        if "loss" not in box:
            raise RuntimeError("the model did not call its get_output_embeddings() module on "
                               "the hidden states")
        return box["loss"], LMOutput(box["loss"], box["hidden"], mask, t, head=head,
                                     nll=box["nll"], argmax=box["top"])
    hidden = {}

    def select(module, args):
        h = hidden["h"] = args[0][_fit(mask, args[0])]
        return (h,) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        out = fwd(**kwargs, use_cache=False)
    finally:
        handle.remove()
    logits = out.logits
    if logits.dim() != 2 or logits.shape[0] != t.shape[0]:  # the head was bypassed
        raise RuntimeError(f"output head returned logits of shape {tuple(logits.shape)}, "
                           f"expected ({t.shape[0]}, V): the model does not call its "
                           f"get_output_embeddings() module on the hidden states")
    loss, nll, top = cross_entropy(logits, t, per_token=True)
    return loss, LMOutput(loss, hidden.get("h"), mask, t, head=head, _logits=logits,
                          nll=nll, argmax=top)
