"""The causal-LM loss of the one loop, computed only where there is something to learn.

HF causal LMs compute logits at every position, then a cross-entropy whose masked
positions (``labels == -100``: QA prompts, padding of whole-document packing) are thrown
away. Here the output head sees only the hidden states of the positions that carry a
target, so masked positions cost neither the head's matmul nor the softmax — with
answer-only QA finetuning that is most of them, with whole-document packing at context 128
about 40%. The cross-entropy itself is one fused autograd function (log-sum-exp forward,
``softmax - onehot`` backward) instead of ``log_softmax`` + ``nll_loss``, whose backward
fills and re-reads a ``positions x vocabulary`` gradient.

The selection runs *inside* the model's forward (a pre-hook on its output embedding), so
DDP, ``peft`` wrappers and ``accelerate`` see an ordinary forward call.

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

    ``logits``: (n, V) logits of the n target positions only, in batch order;
    ``mask``: (B, L) bool, True where position t predicts ``targets[mask]`` (token t+1);
    ``targets``: (n,) the target ids."""

    loss: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor


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
        return (lse - picked).sum() / n

    @staticmethod
    def backward(ctx, g):
        x, lse, targets = ctx.saved_tensors
        grad = torch.sub(x, lse[:, None]).exp_()  # softmax
        grad.scatter_add_(1, targets[:, None],
                          torch.full((len(targets), 1), -1.0, dtype=grad.dtype,
                                     device=grad.device))
        grad.mul_(g / ctx.n)
        return grad.to(ctx.dtype), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; ``logits`` (n, V), ``targets`` (n,) with no ignored ids."""
    return _CrossEntropy.apply(logits, targets)


class _SelectRows:
    """Forward pre-hook on the output head: keep only the rows of ``mask``."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, module, args):
        h = args[0]
        return (h[self.mask],) + tuple(args[1:])


def causal_lm_loss(fwd, head: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, LMOutput]:
    """Loss of ``fwd`` (the model, possibly wrapped) on ``batch`` (input_ids, labels and
    optionally attention_mask); ``head`` is the unwrapped model's output embedding."""
    targets = shifted_targets(batch["labels"])
    mask = targets != IGNORE
    kwargs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    handle = head.register_forward_pre_hook(_SelectRows(mask))
    try:
        out = fwd(**kwargs, use_cache=False)
    finally:
        handle.remove()
    logits = out.logits
    t = targets[mask]
    if logits.dim() != 2 or logits.shape[0] != t.shape[0]:  # the head was bypassed
        raise RuntimeError(f"output head returned logits of shape {tuple(logits.shape)}, "
                           f"expected ({t.shape[0]}, V): the model does not call its "
                           f"get_output_embeddings() module on the hidden states")
    loss = cross_entropy(logits, t)
    return loss, LMOutput(loss, logits, mask, t)
