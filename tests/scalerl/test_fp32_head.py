"""FP32 LM head: log-probabilities against a float64 reference computed in the test."""

import pytest
import torch

from scalerl.fp32_head import final_hidden, fp32_logits, logprobs_from_hidden, token_logprobs
from scalerl.models import build_tiny_model, load_policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Untied head with a bias-free projection: the tied case is the default tiny model.
    root = tmp_path_factory.mktemp("fp32")
    return {
        "tied": build_tiny_model(root / "tied", seed=3),
        "untied": build_tiny_model(root / "untied", seed=4, tie_word_embeddings=False),
    }


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # a right-padded row
    return ids, mask


def _reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """log_softmax(h W^T)[target] in float64, written out."""
    logits = hidden.double() @ weight.double().T  # (B, T, V)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_fp32_head_matches_float64_where_bf16_head_does_not(tiny, kind):
    model, _ = load_policy(str(tiny[kind]), dtype="bfloat16")
    ids, mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        hidden = final_hidden(model, ids, mask)  # (B, T, H) bf16
        weight = model.get_output_embeddings().weight  # bf16 values, shared if tied
        ref = _reference_logprobs(hidden[:, :-1], weight, ids[:, 1:])
        fp32 = token_logprobs(model, ids, mask, fp32_head=True)
        bf16 = token_logprobs(model, ids, mask, fp32_head=False)
    assert fp32.shape == (3, 39) and fp32.dtype == torch.float32
    valid = mask[:, 1:].bool()
    err_fp32 = (fp32.double() - ref).abs()[valid].max().item()
    err_bf16 = (bf16.double() - ref).abs()[valid].max().item()
    assert err_fp32 < 1e-6
    assert err_bf16 > 100 * err_fp32


def test_tied_head_uses_the_input_embedding(tiny):
    model, _ = load_policy(str(tiny["tied"]))
    ids, mask = _batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        hidden = final_hidden(model, ids, mask)
        emb = model.get_input_embeddings().weight
        ref = _reference_logprobs(hidden[:, :-1], emb, ids[:, 1:])
        got = token_logprobs(model, ids, mask)
        logits = fp32_logits(model, hidden)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.double(), hidden.double() @ emb.double().T, atol=1e-5, rtol=0)


def test_fp32_head_agrees_with_the_model_forward_in_float32(tiny):
    model, _ = load_policy(str(tiny["tied"]))
    ids, mask = _batch(model.config.vocab_size, seed=2)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[
            ..., 0
        ]
        got = token_logprobs(model, ids, mask)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(got.double()[valid], expected[valid], atol=1e-4, rtol=0)


def test_chunking_does_not_change_the_result_and_gradients_flow(tiny):
    model, _ = load_policy(str(tiny["untied"]))
    ids, mask = _batch(model.config.vocab_size, seed=3)
    hidden = final_hidden(model, ids, mask)
    whole = logprobs_from_hidden(model, hidden[:, :-1], ids[:, 1:], chunk_size=4096)
    chunked = logprobs_from_hidden(model, hidden[:, :-1], ids[:, 1:], chunk_size=7)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    chunked.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_backward_keeps_no_logits_and_matches_the_plain_head_gradient(tiny):
    """Each head chunk is recomputed in backward: no (B, T, V) tensor is saved for it, and the
    head's gradient equals that of the plain full-logits formula written out here."""
    model, _ = load_policy(str(tiny["untied"]))
    V = model.config.vocab_size
    assert model.config.hidden_size != V
    ids, mask = _batch(V, seed=5)
    with torch.no_grad():
        hidden = final_hidden(model, ids, mask)[:, :-1].detach()
    weight = model.get_output_embeddings().weight
    saved_last_dims = []

    def pack(t):
        saved_last_dims.append(t.shape[-1] if t.dim() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = logprobs_from_hidden(model, hidden, ids[:, 1:], chunk_size=5)
    assert V not in saved_last_dims, saved_last_dims
    got.sum().backward()
    grad = weight.grad.clone()
    weight.grad = None
    logits = hidden.float() @ weight.float().T  # (B, T, V)
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    expected.sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, weight.grad, atol=1e-5, rtol=1e-5)
