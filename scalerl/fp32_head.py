"""FP32 LM head: logits and log-probabilities computed in float32 whatever the body's dtype.

Paper, sec. 3.3: the generator and the trainer compute the importance ratio
rho_t = pi_train(y_t) / pi_gen(y_t) from two separately computed log-probabilities; in bf16
the two sides round differently and rho is noisy. Running the LM head (final projection
and log-softmax) in FP32 on BOTH sides raised the fitted asymptote from 0.52 to 0.61.

    hidden = body(input_ids)                       # (B, T, H) in the model dtype (bf16 ok)
    logits = hidden.float() @ W.float().T + b      # (B, T, V) float32; W = lm_head weight
    logp   = log_softmax(logits)                   # float32

With tied embeddings (Qwen2-0.5B, the tiny model) ``W`` is the input embedding matrix;
``model.get_output_embeddings()`` returns the shared module, so nothing special is needed.

Usage::

    logp = token_logprobs(model, input_ids, attention_mask)   # (B, T-1): log p(x_{t+1} | x_<=t)
    logits = fp32_logits(model, hidden)                        # engines' decode steps

Memory: only the realized next token's log-probability is kept; the (B, T, V) logits exist
one chunk at a time (at most ``chunk_size`` positions and ``chunk_tokens`` tokens). With
gradients on, each chunk is activation-checkpointed: backward recomputes its logits instead of
keeping them, so a 65k-token micro-batch on a 152k vocabulary (Qwen3) holds one chunk of fp32
logits (8,192 x 152k x 4 B = 5 GB) instead of all of them (40 GB, twice with the log-softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (V, H) weight and optional (V,) bias (the tied embedding if tied)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, so left- and right-padded rows get the same RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def final_hidden(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The body's last hidden states (B, T, H) in the model dtype, without the LM head."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def fp32_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) in float32 from hidden states (..., H) of any dtype."""
    weight, bias = head_weights(model)
    return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


def _chunk_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fp32_head: bool,
) -> torch.Tensor:
    if fp32_head:
        logits = F.linear(hidden.float(), weight, bias)  # weight/bias already float32
        logp = torch.log_softmax(logits, dim=-1)
    else:
        # The low-precision baseline: projection and log-softmax both in the model dtype.
        logp = torch.log_softmax(F.linear(hidden, weight, bias), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()


def logprobs_from_hidden(
    model,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    fp32_head: bool = True,
    chunk_size: int = 1024,
    chunk_tokens: int = 8192,
) -> torch.Tensor:
    """log p(targets) (B, T) from hidden states (B, T, H) predicting those targets."""
    from torch.utils.checkpoint import checkpoint

    weight, bias = head_weights(model)
    if fp32_head:
        weight, bias = weight.float(), None if bias is None else bias.float()
    step = max(1, min(chunk_size, chunk_tokens // max(1, hidden.shape[0])))
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunks = []
    for t0 in range(0, hidden.shape[1], step):
        args = (hidden[:, t0 : t0 + step], targets[:, t0 : t0 + step], weight, bias, fp32_head)
        if recompute:
            chunks.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(*args))
    return torch.cat(chunks, dim=1)  # (B, T)


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    fp32_head: bool = True,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-probabilities (B, T-1) of the realized next tokens input_ids[:, 1:].

    Entry [b, t] is log pi(input_ids[b, t+1] | input_ids[b, :t+1]). Padded positions get
    whatever the model says about the pad token; mask them with attention_mask[:, 1:].
    """
    hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, H)
    return logprobs_from_hidden(
        model, hidden[:, :-1], input_ids[:, 1:], fp32_head=fp32_head, chunk_size=chunk_size
    )
