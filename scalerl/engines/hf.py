"""Transformers generation engine: continuous batching over a shared KV cache, FP32 head.

    engine = TransformersEngine("path/or/hub-id", dtype="float32", max_batch_size=64)
    for group in engine.generate(requests, SamplingSettings(max_new_tokens=128), length=policy):
        ...

The CPU fallback and reference of the vLLM engine (same Completion contract, base.py).

KV layout. One buffer per layer, (B, H, C, D); columns [0, L) are in use. Every row keeps
its sequence's keys right-aligned and contiguous: columns [L - npos[r], L), where npos[r] is
the row's token count, which is also the position of its next token (so padding never
shifts RoPE positions). A decode step appends one column to every row. When a row finishes,
the next waiting sequence takes it at once (continuous batching): its prompt is prefilled
once per group (kept until the group's last sample has a row; redone only if new weights
arrived meanwhile) and its keys are copied, right-aligned, into the rows of its samples.
An interruption phrase is fed through a one-row forward on a copy of that row's keys and
written back the same way. Leading columns no live row uses are dropped now and then.
New weights are copied into the live parameters between steps; the cache is kept.

Sampling uses counter-based noise (SplitMix64 of sample seed, token index and vocabulary
index, then Gumbel-max), so a sample's tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from scalerl.engines.base import (
    Completion,
    Engine,
    EngineError,
    SequenceState,
    draw_requests,
    generation_over,
    open_group,
    resolve_length,
    safetensors_files,
)
from scalerl.fp32_head import fp32_logits
from scalerl.models import copy_present, load_policy, state_misfit

# SplitMix64 constants as signed int64 (torch int64 arithmetic wraps around)
_GOLDEN, _M1, _M2 = (
    c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) noise (N, vocab), a pure function of (seed, step, vocabulary index)."""
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = _splitmix64(_splitmix64(seeds[:, None] ^ _splitmix64(steps[:, None])) + v[None, :])
    return (_srl(z, 40).float() + 0.5) / float(1 << 24)  # (N, V), never 0 or 1


def sample_tokens(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs) from float32 logits (N, V); logprobs of the sampling distribution.

    temperature 0 is greedy (logprobs then of the temperature-1 distribution).
    """
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logp.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    z = logits / temperature
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1])))
    tokens = (logp + gumbel).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


class _KVStore:
    """Per-layer key/value buffers (B, H, C, D) with right-aligned rows (module docstring)."""

    def __init__(self, n_layers: int, rows: int, heads: int, head_dim: int, dtype, device):
        self.shape = (rows, heads, 0, head_dim)
        self.dtype, self.device, self.n_layers = dtype, device, n_layers
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.npos = torch.zeros(rows, dtype=torch.long, device=device)  # tokens per row

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    def _realloc(self, capacity: int, shift: int) -> None:
        """New capacity; old columns [0, L) move to [shift, shift + L)."""
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = torch.zeros(
                    (old.shape[0], old.shape[1], capacity, old.shape[3]),
                    dtype=self.dtype,
                    device=self.device,
                )
                new[:, :, shift : shift + self.length] = old[:, :, : self.length]
                buf[i] = new
        self.length += shift

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more columns (doubling, so appends are amortized O(1))."""
        cap = self.k[0].shape[2]
        if self.length + extra > cap:
            self._realloc(max(2 * cap, self.length + extra, 64), 0)

    def cache(self) -> Cache:
        return Cache(layers=[_StoreLayer(self, i) for i in range(self.n_layers)])

    def attention_mask(self, q: int) -> torch.Tensor:
        """(B, L + q) mask: each row's own right-aligned keys plus the q new columns."""
        cols = torch.arange(self.length + q, device=self.device)
        return (cols[None, :] >= (self.length - self.npos)[:, None]).long()

    def read_row(self, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row r's keys/values per layer, (1, H, npos, D)."""
        c = int(self.npos[r])
        sl = slice(self.length - c, self.length)
        return [
            (self.k[i][r : r + 1, :, sl], self.v[i][r : r + 1, :, sl]) for i in range(self.n_layers)
        ]

    def write_rows(self, rows: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Place (1, H, m, D) keys/values right-aligned in ``rows``, growing left if needed."""
        m = kv[0][0].shape[2]
        if m > self.length:
            self._realloc(max(self.k[0].shape[2], m) + (m - self.length), m - self.length)
        idx = torch.tensor(rows, device=self.device)
        for i, (k, v) in enumerate(kv):
            self.k[i][idx, :, self.length - m : self.length] = k
            self.v[i][idx, :, self.length - m : self.length] = v
        self.npos[idx] = m

    def compact(self) -> None:
        """Drop leading columns that no row uses once they are a quarter of the cache."""
        unused = self.length - int(self.npos.max()) if self.rows else self.length
        if unused >= max(64, self.length // 4):
            for buf in (self.k, self.v):
                for i, old in enumerate(buf):
                    buf[i] = old[:, :, unused : self.length].clone()
            self.length -= unused

    def select_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]
        self.npos = self.npos.index_select(0, idx)


class _StoreLayer(DynamicLayer):
    """A transformers cache layer that writes into a _KVStore at column L."""

    def __init__(self, store: _KVStore, idx: int) -> None:
        super().__init__()
        self.store, self.idx, self.is_initialized = store, idx, True

    def update(self, key_states, value_states, *args, **kwargs):
        s, q = self.store, key_states.shape[-2]
        k, v = s.k[self.idx], s.v[self.idx]
        k[:, :, s.length : s.length + q] = key_states
        v[:, :, s.length : s.length + q] = value_states
        return k[:, :, : s.length + q], v[:, :, : s.length + q]

    def get_seq_length(self) -> int:
        return self.store.length


class TransformersEngine(Engine):
    """Continuous-batching generation with transformers; see the module docstring."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 64,
        fp32_head: bool = True,
        version: int = 0,
    ) -> None:
        self.model, self.tokenizer = load_policy(model_path, dtype=dtype, device=device)
        cfg = self.model.config.get_text_config()
        if getattr(cfg, "use_sliding_window", False):
            raise EngineError(
                f"{model_path} uses sliding-window attention, which this engine's cache "
                "does not implement. Fix: use the vLLM engine for this model."
            )
        self.device, self.fp32_head, self.max_batch_size = device, fp32_head, max_batch_size
        self.context_len = int(cfg.max_position_embeddings)
        self.version = version
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)

    def _new_store(self, rows: int) -> _KVStore:
        dtype = next(self.model.parameters()).dtype
        return _KVStore(*self._kv_shape[:1], rows, *self._kv_shape[1:], dtype, self.device)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, version: int, path: str | Path) -> None:
        """Copy a published checkpoint (safetensors) into the live parameters, in place; a
        version of a LoRA run (scalerl/lora.py: its adapter/ directory) goes into adapters that
        peft injects into the model at the first such load, the base staying as loaded."""
        from safetensors.torch import load_file

        from scalerl import lora

        adapter = lora.adapter_dir(path)
        if adapter is not None:
            if not lora.has_adapters(self.model):
                from peft import LoraConfig, inject_adapter_in_model

                config = LoraConfig.from_pretrained(str(adapter))
                config.modules_to_save = None  # fully trained modules: copied in place
                inject_adapter_in_model(config, self.model)
                self.model.eval()
            trained = lora.read_adapter_config(adapter).get("modules_to_save") or []
            lora.mark_trained(self.model, trained, str(path))
            lora.copy_adapter(self.model, lora.read_adapter(adapter), f"the adapter in {path}")
            self.version = version
            return

        files = safetensors_files(path)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        params = dict(self.model.named_parameters())  # tied weights appear once
        tied = (
            {"lm_head.weight"} if self.model.config.get_text_config().tie_word_embeddings else set()
        )
        misfit = state_misfit(params, tensors, extra_ok=tied)
        if misfit:
            raise EngineError(
                f"weights in {path} do not fit the loaded model ({misfit}). "
                "Fix: publish a full checkpoint of the same architecture."
            )
        copy_present(params, tensors)
        self.version = version

    def close(self) -> None:
        self.model = None

    # -- forward passes --------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.fp32_head:
            return fp32_logits(self.model, hidden)
        return self.model.get_output_embeddings()(hidden).float()

    def _forward(self, store: _KVStore, input_ids: torch.Tensor, position_ids: torch.Tensor):
        """Run the body on (B, q) tokens appended to ``store``; return last-token logits."""
        q = input_ids.shape[1]
        store.reserve(q)
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=store.attention_mask(q),
            position_ids=position_ids,
            past_key_values=store.cache(),
            use_cache=True,
        )
        store.length += q
        return self._logits(out.last_hidden_state[:, -1])  # (B, V) float32

    def _extend(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, tokens: list[int]):
        """One-row forward of ``tokens`` after ``prefix`` keys; (logits (1, V), row keys)."""
        tmp = self._new_store(1)
        start = 0
        if prefix is not None:
            start = prefix[0][0].shape[2]
            tmp.write_rows([0], prefix)
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None, :]
        tmp.npos[0] = start
        logits = self._forward(tmp, ids, pos)
        tmp.npos[0] = start + len(tokens)
        return logits, tmp.read_row(0)

    # -- the loop --------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(self, requests, sampling, length, weights):
        """(Engine.generate) The continuous-batching loop; see the module docstring."""
        if self.model is None:
            raise EngineError("engine is closed. Fix: create a new TransformersEngine.")
        policy = resolve_length(length, sampling, {self.tokenizer.eos_token_id})
        store = self._new_store(self.max_batch_size)
        slots: list[SequenceState | None] = [None] * self.max_batch_size
        pending: list[list[int]] = [[] for _ in slots]  # tokens sampled, not yet in the cache
        waiting: deque[SequenceState] = deque()
        # a group's members are admitted as rows free up, often a few at a time: its prompt's
        # prefill (version, logits, keys) is kept until the last member is in, not redone
        prefilled: dict[int, tuple[int, torch.Tensor, list]] = {}
        unadmitted: dict[int, int] = {}
        source = iter(requests)
        exhausted = False

        def open_one(request):
            group, seqs, done_group = open_group(
                request, self.tokenizer, sampling, policy, self.context_len
            )
            if seqs:
                unadmitted[id(group)] = len(seqs)
            return group, seqs, done_group

        def sample(rows_seqs: list[SequenceState], logits: torch.Tensor) -> list:
            seeds = torch.tensor([s.seed for s in rows_seqs], device=self.device)
            steps = torch.tensor([len(s.token_ids) for s in rows_seqs], device=self.device)
            tokens, logps = sample_tokens(
                logits, seeds, steps, sampling.temperature, sampling.top_p
            )
            return [
                (t, s.add_sampled(t, lp, self.version))
                for s, t, lp in zip(rows_seqs, tokens.tolist(), logps.tolist(), strict=True)
            ]

        def finished(r: int) -> list[Completion] | None:
            seq, slots[r], pending[r] = slots[r], None, []
            store.npos[r] = 0
            return seq.group.finish(seq.completion(self.tokenizer))

        while True:
            if weights is not None and (new := weights.poll()) is not None:
                self.load_weights(*new)
            # 1) admit waiting sequences into free rows; one prefill per prompt group
            free = [r for r, s in enumerate(slots) if s is None]
            held = False
            if not exhausted:  # HOLD: nothing to start now; step what is live, ask again
                exhausted, held, opened = draw_requests(source, len(free), waiting, open_one)
                yield from opened
            admitted: dict[int, list[tuple[int, SequenceState]]] = {}
            for r in free[: len(waiting)]:
                seq = waiting.popleft()
                admitted.setdefault(id(seq.group), []).append((r, seq))
            now = time.time()
            for gid, members in admitted.items():
                cached = prefilled.get(gid)
                if cached is not None and cached[0] == self.version:
                    logits, kv = cached[1:]
                else:  # first members, or new weights since: prefill with the loaded version
                    logits, kv = self._extend(None, members[0][1].prompt_ids)
                unadmitted[gid] -= len(members)
                if unadmitted[gid]:
                    prefilled[gid] = (self.version, logits, kv)
                else:
                    del unadmitted[gid]
                    prefilled.pop(gid, None)
                rows = [r for r, _ in members]
                store.write_rows(rows, kv)
                for (r, seq), (t, d) in zip(
                    members,
                    sample([s for _, s in members], logits.expand(len(members), -1)),
                    strict=True,
                ):
                    seq.started_at = now
                    slots[r], pending[r] = seq, [t, *d.inject]
                    if d.finish and (group := finished(r)) is not None:
                        yield group
            # 2) interruptions: feed [sampled token, phrase...] through a one-row forward
            for r, seq in enumerate(slots):
                if seq is not None and len(pending[r]) > 1:
                    logits, kv = self._extend(store.read_row(r), pending[r])
                    store.write_rows([r], kv)
                    ((t, d),) = sample([seq], logits)
                    pending[r] = [t, *d.inject]
                    if d.finish and (group := finished(r)) is not None:
                        yield group
            # 3) one decode step for every live row
            live = [r for r, s in enumerate(slots) if s is not None]
            if not live:
                if generation_over(exhausted, waiting, held):
                    return
                continue
            ids = torch.tensor(
                [[pending[r][0] if slots[r] else self.pad_id] for r in range(store.rows)]
            )
            logits = self._forward(store, ids.to(self.device), store.npos[:, None].clone())
            store.npos[torch.tensor(live, device=self.device)] += 1
            results = sample([slots[r] for r in live], logits[live])
            for r, (t, d) in zip(live, results, strict=True):
                pending[r] = [t, *d.inject]
                if d.finish and (group := finished(r)) is not None:
                    yield group
            # 4) housekeeping: drop unused columns; shrink the batch when draining
            store.compact()
            n_live = sum(s is not None for s in slots)
            if exhausted and not waiting and 0 < n_live <= store.rows // 2:
                keep = [r for r, s in enumerate(slots) if s is not None]
                store.select_rows(keep)
                slots = [slots[r] for r in keep]
                pending = [pending[r] for r in keep]
