"""The one forward pass that rollout (recording log-probs) and training share, on the layout of
``rlhf_core.model.batches``: response logits, per-token log-probs and entropy (chunked over the vocabulary),
and the policy + value head (``ActorCritic``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_core.model.batches import TokenBatch


class ValueHead(nn.Module):
    """V(s) = w·h + b on the last hidden state; zero-initialised so the first values are 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T]
        return self.summary(hidden.float()).squeeze(-1)


@dataclass
class ForwardOutput:
    logprobs: torch.Tensor  # [B, R] log π(a_t | s_t) at temperature T
    entropy: torch.Tensor | None  # [B, R]
    values: torch.Tensor | None  # [B, R] V(s_t)


def response_logits(model, batch: TokenBatch, *, output_hidden: bool = False):
    """Logits (and last hidden states) at the positions that predict the response tokens: [B, R, V].

    Models that take ``logits_to_keep`` (most transformers causal LMs) compute the LM head only on the
    last R+1 positions instead of all W: the prompt's logits are never needed, and with a large
    vocabulary they are most of the pass's memory."""
    window = batch.response_width + 1
    kwargs = {"logits_to_keep": window} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                output_hidden_states=output_hidden, use_cache=False, **kwargs)
    logits = batch.gather_response(out.logits[:, -window:, :])
    hidden = batch.gather_response(out.hidden_states[-1][:, -window:, :]) if output_hidden else None
    return logits, hidden


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (looked up through peft/DDP wrappers)."""
    import inspect

    inner = model
    for _ in range(4):  # DDP/FSDP .module, peft get_base_model()
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and isinstance(inner.module, nn.Module):
            inner = inner.module
        else:
            break
    cached = _LOGITS_TO_KEEP.get(type(inner))
    if cached is None:
        cached = _LOGITS_TO_KEEP[type(inner)] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return cached


_LOGITS_TO_KEEP: dict[type, bool] = {}


LOGPROB_CHUNK_ELEMENTS = 1 << 24


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, *,
                   chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T) gathered at ``tokens``, and the per-token entropy.  [B,R,V],[B,R] -> [B,R],[B,R].

        log π(a_t) = z_t[a_t] − logsumexp(z_t),   H_t = −Σ_v π_t(v) log π_t(v),   z_t = logits_t / T  (float32)

    Computed whole, the float32 log-softmax, its exponent and their product are [B·R, V] each and autograd
    keeps them for backward: with a 128k vocabulary they dominate a pass's memory.  Beyond
    ``chunk_elements`` logits (None: ``LOGPROB_CHUNK_ELEMENTS``; 0: never), ``ChunkedTokenLogprobs`` goes
    through the B·R positions in chunks and keeps nothing of size V for backward but ``logits`` itself.  Its
    forward numbers are the same as the whole computation's (the same kernels, row by row)."""
    batch, width, vocab = logits.shape
    chunk_elements = LOGPROB_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if chunk_elements <= 0 or batch * width * vocab <= chunk_elements:
        return _logprobs_and_entropy(logits, tokens, temperature)
    chunk_rows = max(1, chunk_elements // vocab)
    picked, entropy = ChunkedTokenLogprobs.apply(logits.reshape(-1, vocab), tokens.reshape(-1), temperature,
                                                 chunk_rows)
    return picked.view(batch, width), entropy.view(batch, width)


def _logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """The whole computation of ``token_logprobs``: [..., V], [...] -> [...], [...]."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy


class ChunkedTokenLogprobs(torch.autograd.Function):
    """``token_logprobs`` over [N, V] logits in chunks of ``chunk_rows`` rows, saving only the logits.

    Backward recomputes each chunk's log π and uses, with π = softmax(z) and z = logits / T,

        ∂ log π(a) / ∂z_v = 1[v = a] − π(v),        ∂H / ∂z_v = −π(v) · (log π(v) + H),

    each divided by T for the logits, so no [N, V] float32 tensor ever exists (the gradient of the logits,
    in their dtype, is the one tensor of that size)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_rows):
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(picked)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            picked[rows], entropy[rows] = _logprobs_and_entropy(logits[rows], tokens[rows], temperature)
        ctx.save_for_backward(logits, tokens, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, grad_entropy):
        logits, tokens, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            log_probs = torch.log_softmax(logits[rows].float() / ctx.temperature, dim=-1)
            probs = log_probs.exp()
            grad = torch.zeros_like(log_probs)
            if grad_entropy is not None:
                grad -= grad_entropy[rows, None] * probs * (log_probs + entropy[rows, None])
            if grad_picked is not None:
                grad -= grad_picked[rows, None] * probs
                grad.scatter_add_(-1, tokens[rows, None], grad_picked[rows, None])
            grad_logits[rows] = (grad / ctx.temperature).to(logits.dtype)
        return grad_logits, None, None, None


class ActorCritic(nn.Module):
    """A causal-LM policy with a critic: a value head on the policy's backbone, or a separate backbone."""

    def __init__(self, policy, value_head: ValueHead, critic_backbone=None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic_backbone = critic_backbone

    def forward(self, batch: TokenBatch, temperature: float, *, with_values: bool = True) -> ForwardOutput:
        shared = with_values and self.critic_backbone is None
        logits, hidden = response_logits(self.policy, batch, output_hidden=shared)
        logprobs, entropy = token_logprobs(logits, batch.response_ids, temperature)
        values = None
        if with_values:
            if self.critic_backbone is not None:
                out = self.critic_backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           position_ids=batch.position_ids, use_cache=False)
                hidden = batch.gather_response(out.last_hidden_state[:, -(batch.response_width + 1):, :])
            values = self.value_head(hidden)
        return ForwardOutput(logprobs, entropy, values)


def policy_logprobs(policy, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """log π(response | prompt) per token, [B, R]: the same computation ``ActorCritic`` does."""
    logits, _ = response_logits(policy, batch)
    return token_logprobs(logits, batch.response_ids, temperature)[0]
