"""Batched generation with a KV cache: greedy, or sampled with temperature and nucleus (top-p).

Lesson: notebook 01, section "3. Ask questions" (prefill once, then one token per step from the cache).

Prefill runs the prompt embeddings [B, T, H] once (so image features can already be in them) and fills the
cache; each decode step then feeds the B tokens just chosen and extends the padding mask by one column, so the
positions (cumsum(mask) − 1) stay right for left-padded rows.

Sampling at temperature τ and top-p::

    p = softmax(logits / τ);  sort p descending;  keep the smallest prefix whose mass reaches top_p
    (the first token always stays);  renormalise;  draw one token

A row that produced EOS is finished: it gets ``pad_token_id`` from then on, and the loop stops when every row
is finished (unless ``ignore_eos``).

Inside ``with step_hook(fn):`` every generation loop (this one and the static step of
:mod:`vl2lab.model.graph_decode`) calls ``fn(tokens)`` each time it has chosen the next token of every row: once
after the prefill, then after each decode step. That is how :func:`vl2lab.perf.workload.time_steps` times the decode
steps themselves.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["generate", "sample_next", "top_p_filter", "GenerationError", "check_new_tokens", "check_context",
           "check_sampling", "step_hook", "step_done"]

_STEP_HOOKS: list = []                      # the functions of the enclosing ``step_hook`` blocks


class GenerationError(ValueError):
    """A generation request that cannot run as asked (the message says what to change)."""


def check_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` as an int, or one clear error: a whole number (bool excluded) of at least 1 (generation
    always makes a token; the prompt alone is ``model(**batch)``)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r} "
                        f"({type(max_new_tokens).__name__}); pass e.g. max_new_tokens=32")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}: generation makes at least "
                              "one token (for the prompt's logits alone call the model: model(**batch).logits)")
    return int(max_new_tokens)


def check_context(prompt_tokens: Optional[int], max_new_tokens: int, context: Optional[int]) -> None:
    """One GenerationError, before any work, when ``prompt_tokens + max_new_tokens`` positions exceed ``context``
    (the model's ``max_position_embeddings``; None: no limit known). ``prompt_tokens=None``: the prompt is not
    built yet, so only ``max_new_tokens`` (which leaves room for at least one prompt token) is checked."""
    if context is None:
        return
    if prompt_tokens is None:
        if max_new_tokens >= context:
            raise GenerationError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} "
                                  f"positions (max_position_embeddings), which also holds the prompt: ask for at most "
                                  f"{context - 1} new tokens, fewer the longer the prompt")
        return
    total = prompt_tokens + max_new_tokens
    if total > context:
        room = context - prompt_tokens
        fix = (f"ask for at most {room} new tokens, or shorten the prompt" if room >= 1 else
               f"shorten the prompt by at least {1 - room} tokens (shorter text, fewer or smaller images)")
        raise GenerationError(f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
                              f"{total} positions, over the model's context of {context} (max_position_embeddings); "
                              f"{fix}")


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """One clear error for sampling settings :func:`generate` cannot use."""
    if do_sample and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}; use do_sample=False for greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@contextmanager
def step_hook(fn: Callable[[torch.Tensor], None]):
    """Within the block, ``fn(tokens [B])`` runs each time a generation loop has chosen a token for every row."""
    _STEP_HOOKS.append(fn)
    try:
        yield fn
    finally:
        _STEP_HOOKS.remove(fn)


def step_done(tokens: torch.Tensor) -> None:
    """A generation loop has chosen ``tokens`` [B]: call the hooks of the enclosing :func:`step_hook` blocks."""
    for fn in _STEP_HOOKS:
        fn(tokens)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus of mass ``top_p`` and renormalise. probs [B, V] → [B, V]."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p                 # mass strictly before each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token has before = 0: always kept
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from logits [B, V]; temperature 0 (or below 1e-5) is greedy. → [B] int64."""
    if temperature < 1e-5:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, ignore_eos: bool = False) -> torch.Tensor:
    """New token ids [B, max_new_tokens] (``pad_token_id`` after a row's EOS, and in the columns never reached
    because every row had finished).

    ``model`` is a :class:`~vl2lab.model.language.DeepseekLanguageModel` or anything called the same way,
    ``model(input_ids=…, inputs_embeds=…, attention_mask=…, cache=…, num_logits_to_keep=1) → (logits, cache)``;
    it gets a static cache from ``model.new_cache(max_len)`` when it has that method, else ``cache=None`` at the
    prefill and whatever it returned afterwards. EOS defaults to ``model.config.eos_token_id``, pad to EOS.
    ``max_new_tokens`` ≥ 1, and prompt + new tokens within ``model.config.max_position_embeddings`` when the model
    has one (:func:`check_new_tokens`, :func:`check_context`: one clear error before the prefill).
    """
    max_new_tokens = check_new_tokens(max_new_tokens)
    check_sampling(do_sample, temperature, top_p)
    B, T = inputs_embeds.shape[:2]
    check_context(T, max_new_tokens, getattr(getattr(model, "config", None), "max_position_embeddings", None))
    device = inputs_embeds.device
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None \
        else attention_mask.to(device=device, dtype=torch.long)
    cache = model.new_cache(T + max_new_tokens) if hasattr(model, "new_cache") else None

    logits, cache = model(inputs_embeds=inputs_embeds, attention_mask=mask, cache=cache, num_logits_to_keep=1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        last = logits[:, -1].float()                                       # [B, V]
        nxt = sample_next(last, temperature, top_p, generator) if do_sample else last.argmax(-1)
        nxt = torch.where(done, pad, nxt)
        out[:, step] = nxt
        step_done(nxt)
        if not ignore_eos:
            done = done | torch.isin(nxt, eos)
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits, cache = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, num_logits_to_keep=1)
    return out


class _FromCache:
    """Lets :func:`generate` continue from a cache that already holds the first positions of the prompt: its
    ``new_cache`` hands over that cache, and its first call feeds only the prompt positions not cached yet."""

    def __init__(self, lm, cache):
        self.lm, self.cache, self.config = lm, cache, lm.config

    def new_cache(self, max_len: int):
        if max_len > self.cache.max_len:
            raise ValueError(f"the prefilled cache holds {self.cache.max_len} positions, {max_len} are needed")
        return self.cache

    def __call__(self, input_ids=None, inputs_embeds=None, cache=None, **kw):
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds[:, cache.seq_len:]                # [B, T − cached, H]
        return self.lm(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, **kw)


@torch.no_grad()
def chunked_prefill(model, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    chunk_size: int = 512, max_new_tokens: int = 0, *, num_logits_to_keep: int = 1,
                    max_len: Optional[int] = None, **generate_kwargs):
    """Incremental prefilling: run the prompt through the KV cache ``chunk_size`` positions at a time.

    Lesson: notebook 01, section "The source article's size claims" (fitting small into 40 GB).

    A one-shot prefill holds the activations of all T prompt positions at once (attention scores that
    materialise grow as T², the MoE's gathered inputs and the logits as T). Chunk c = [s, e) attends to the
    cached positions [0, s) and to itself, with the positions written out explicitly::

        positions = cumsum(mask) − 1   (clamped at 0: left padding)      chunk c gets positions[:, s:e]
        logits_c, cache = LM(embeds[:, s:e], mask[:, :e], positions[:, s:e], cache)

    so the transient memory is that of ``chunk_size`` queries against at most T keys, while the cache (static,
    allocated once for the whole sequence) is the same as in one shot. Every position sees exactly the keys it
    sees in one shot, so the results agree up to float rounding (the matmuls have other shapes).

    ``model``: a :class:`~vl2lab.model.language.DeepseekLanguageModel` or a whole ``DeepseekVL2ForCausalLM`` (its
    ``language`` is used; ``inputs_embeds`` then come from ``model.prepare_inputs_embeds(...)``).

    * ``max_new_tokens=0``: prefill all T positions → (logits [B, k, V] fp32 of the last chunk's last
      ``num_logits_to_keep`` positions (0 = all of them, as the official HF forward computes), the cache, sized
      ``max_len`` (default T)).
    * ``max_new_tokens > 0``: the official ``incremental_prefilling`` then ``generate``: the first T − 1
      positions in chunks, then :func:`generate` (with ``generate_kwargs``) runs the last prompt position and
      decodes → new token ids [B, max_new_tokens], the same as ``generate`` with a one-shot prefill.

    The official code also moves the cache to the CPU between chunks; vl2lab's cache is static and stays put.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    lm = getattr(model, "language", model)
    B, T = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    mask = torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None \
        else attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, the prompt embeddings need ({B}, {T})")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)                          # [B, T]
    todo = T if max_new_tokens == 0 else T - 1
    cache = lm.new_cache(max_len or (T + max_new_tokens))
    logits = None
    for s in range(0, todo, chunk_size):
        e = min(s + chunk_size, todo)
        logits, cache = lm(inputs_embeds=inputs_embeds[:, s:e], attention_mask=mask[:, :e],
                           position_ids=positions[:, s:e], cache=cache, num_logits_to_keep=num_logits_to_keep)
    if max_new_tokens == 0:
        return logits, cache
    kw = dict(generate_kwargs)
    if kw.get("pad_token_id") is None and getattr(model, "pad_token_id", None) is not None:
        kw["pad_token_id"] = model.pad_token_id
    return generate(_FromCache(lm, cache), inputs_embeds, mask, max_new_tokens, **kw)
