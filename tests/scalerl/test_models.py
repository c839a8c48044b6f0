"""The tiny model builder and the policy loader (hub id or local path through from_pretrained)."""

import json

import pytest
import torch
from transformers import BertConfig

from scalerl.models import ModelLoadError, build_tiny_model, load_policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def test_same_seed_gives_byte_identical_weights(tiny, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def test_tokenizer_is_character_level_with_single_think_and_eos_tokens(tiny):
    _, tok = load_policy(str(tiny))
    text = "Q: 12 + 3?\n<think>a b</think> 15"
    ids = tok(text, add_special_tokens=False).input_ids
    # one token per character, except the two think markers which are one token each
    n_chars = len(text) - len("<think>") - len("</think>")
    assert len(ids) == n_chars + 2
    assert tok.convert_ids_to_tokens(ids).count("<think>") == 1
    assert tok.convert_tokens_to_ids("</think>") in ids
    assert tok.decode(ids) == text
    # EOS is special: it ends generation and disappears from decoded text
    assert tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_load_policy_gives_qwen2_with_tied_head_and_requested_dtype(tiny):
    model, tok = load_policy(str(tiny), dtype="bfloat16")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.head_dim == 64 and model.config.max_position_embeddings == 4096
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist\. Fix: "):
        load_policy(str(tmp_path / "nope"))


def test_encoder_model_is_rejected(tmp_path):
    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"not a causal language model.*Fix: "):
        load_policy(str(tmp_path))


def test_tokenizer_without_eos_is_rejected(tiny, tmp_path):
    import shutil

    broken = shutil.copytree(tiny, tmp_path / "no_eos")
    cfg_path = broken / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"no end-of-sequence token.*Fix: "):
        load_policy(str(broken))


def test_unknown_dtype_is_rejected(tiny):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_policy(str(tiny), dtype="float8")


def test_replacement_characters_are_bytes_that_are_not_utf8_on_their_own(tiny):
    """Why a completion can read "<think>6\ufffd</think>66": non-ASCII text is one token per UTF-8
    byte, so a sampled byte 0x80-0xFF that does not complete a character decodes (like any
    byte-level BPE tokenizer) to U+FFFD. Decoding the whole id list is lossless for valid text:
    a character split over several tokens comes back whole (per-token decoding would not)."""
    from scalerl.models import _bytes_to_unicode

    _, tok = load_policy(str(tiny))
    byte_id = {b: tok.convert_tokens_to_ids(c) for b, c in _bytes_to_unicode().items()}
    text = "é€😀 <think>ü</think>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert "".join(tok.decode([i]) for i in ids[:2]) == "\ufffd\ufffd"  # "é" token by token
    think, end, six = (tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "6"))
    sampled = [think, six, byte_id[0xC7], end, six, six, tok.eos_token_id]
    expected = "<think>" + b"6\xc7".decode("utf-8", "replace") + "</think>66"
    assert expected == "<think>6\ufffd</think>66"
    assert tok.decode(sampled, skip_special_tokens=True) == expected
