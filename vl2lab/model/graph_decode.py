"""Decoding without the host: a static decode step, captured once as a CUDA graph and replayed per token.

Lesson: notebook 05, sections "2. The ladder, run here" (rung 5) and "3. The ladder on one H200".

Eager decoding pays for every kernel launch from Python, and a DeepSeek-VL2 step launches hundreds of small
kernels (12–30 layers × norm, rope, projections, router, experts, cache write …) whose work at batch 1 is a few
microseconds each: the GPU mostly waits for the CPU. A CUDA graph records the launches of one step once and
replays them with a single call, so the step costs what its kernels cost. A graph replays *the same* kernels on
*the same* addresses, so everything that changes from step to step has to live in device tensors that the step
updates itself:

    state (device tensors, fixed addresses)       one step (no host synchronisation)
    tokens    [B, 1]   last chosen token           key_ok[:, index] = True          the new position becomes visible
    positions [B, 1]   its RoPE position           x = embed(tokens); every layer writes K/V (or the MLA latent)
    index     [1]      cache slot it is written to     at slot `index` with index_copy_ and attends over all
    key_ok    [B, L]   which slots hold real keys      L slots, masked by key_ok
    done      [B]      rows that produced EOS      nxt = argmax(logits) (pad where done); out[:, step] = nxt
    out       [B, N]   the generated tokens        tokens = nxt; positions += 1; index += 1; step += 1

The cache holds L = prompt + new tokens slots (rounded up to a multiple of 128 so that one graph serves nearby
lengths); attending over masked slots gives the same softmax as attending over the written ones (masked scores are
−inf, exp(−inf) = 0). The prefill runs eagerly and fills the same cache buffers the graph reads.

Mode ``"compile"`` first passes each decoder layer through ``torch.compile`` (fuses the norms, RoPE, SwiGLU and
router elementwise work into few kernels), then captures the step. On a CPU there is no graph: the same static
step runs eagerly, which is how the tests check it gives the tokens of :func:`~vl2lab.model.generation.generate`.
Greedy decoding only (sampling draws random numbers on the host's schedule; use the eager path for it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from vl2lab.model.generation import step_done

__all__ = ["IndexCache", "GraphDecoder", "compile_regions", "decoder_for", "ROUND"]

ROUND = 128                     # cache length granularity: one captured graph per (batch, rounded length)


class IndexCache:
    """The interface of :class:`~vl2lab.model.attention.KVCache` (``update``) over its buffers, writing at a
    device-side slot ``index`` [1] and returning the whole buffers (every slot; the mask hides the unused)."""

    def __init__(self, kv, index: torch.Tensor):
        self.kv, self.index = kv, index

    def update(self, layer: int, *new: torch.Tensor) -> tuple:
        bufs = self.kv.buffers[layer]
        for buf, x in zip(bufs, new):                  # buf [..., L, d], x [..., 1, d]; time is dim -2
            buf.index_copy_(buf.dim() - 2, self.index, x)
        return bufs


class GraphDecoder:
    """Greedy generation for one batch size and cache length with a replayed (or, on CPU, eager) static step.

    ``lm`` is a :class:`~vl2lab.model.language.DeepseekLanguageModel` (sharded or not: the step calls its layers,
    so tensor-parallel all-reduces are captured too). ``mode``: ``"graph"`` or ``"compile"`` (torch.compile, then
    the graph)."""

    def __init__(self, lm, batch: int, max_len: int, device, mode: str = "graph",
                 eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: int = 0,
                 ignore_eos: bool = False):
        if mode not in ("graph", "compile"):
            raise ValueError(f"GraphDecoder mode must be 'graph' or 'compile', got {mode!r}")
        self.lm, self.batch, self.max_len, self.device, self.mode = lm, batch, max_len, torch.device(device), mode
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.ignore_eos, self.pad_token_id = ignore_eos or not eos, pad_token_id
        self.kv = lm.new_cache(max_len)
        B, dev = batch, self.device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)          # state: see the module docstring
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_i = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_ok = torch.zeros(B, max_len, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, max_len), pad_token_id, dtype=torch.long, device=dev)
        self._eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self._pad = torch.tensor(pad_token_id, dtype=torch.long, device=dev)
        self.cache = IndexCache(self.kv, self.index)
        self.graph = None
        self.captured = False
        self._layers = list(lm.model.layers)

    # ------------------------------------------------------------------------------------------ the step
    def step(self):
        """One greedy decode step on the device state alone (no host synchronisation, no Python branch on a
        value): this is what :meth:`_capture` records as a CUDA graph and :meth:`replay` replays per token."""
        lm = self.lm
        self.key_ok.index_fill_(1, self.index, True)
        x = lm.layers_forward(lm.embed(self.tokens), self.positions,         # [B, 1, H]; the mask [B, 1, 1, L]:
                              self.key_ok[:, None, None, :], self.cache, self._layers)   # future slots are off
        logits = lm.head(x)[:, -1]                                           # [B, V] fp32
        nxt = torch.where(self.done, self._pad, logits.argmax(-1))           # [B]
        self.out.index_copy_(1, self.step_i, nxt[:, None])
        if not self.ignore_eos:
            self.done.logical_or_(torch.isin(nxt, self._eos))
        self.tokens.copy_(nxt[:, None])
        self.positions.add_(1)
        self.index.add_(1)
        self.step_i.add_(1)

    def _state(self) -> list:
        return [self.tokens, self.positions, self.index, self.step_i, self.key_ok, self.done, self.out]

    def _capture(self) -> None:
        """Warm up (and compile) on a side stream, capture one step, restore the state the warm-up moved."""
        saved = [t.clone() for t in self._state()]
        if self.mode == "compile":
            self._layers = compile_regions(self._layers)
        if self.device.type != "cuda":
            self.step()                                                  # CPU: check it runs; no graph
        else:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()
        for t, s in zip(self._state(), saved):
            t.copy_(s)

    def replay(self) -> None:
        """One decode step."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 max_new_tokens: int) -> torch.Tensor:
        """The greedy tokens [B, max_new_tokens] of :func:`~vl2lab.model.generation.generate` (pad after EOS;
        all ``max_new_tokens`` steps always run: a graph cannot stop early without asking the host)."""
        B, T = inputs_embeds.shape[:2]
        if B != self.batch or T + max_new_tokens > self.max_len:
            raise ValueError(f"this decoder serves batch {self.batch} and {self.max_len} positions; got batch {B} "
                             f"with {T} + {max_new_tokens} positions: use decoder_for(...) for this shape")
        mask = torch.ones(B, T, dtype=torch.long, device=self.device) if attention_mask is None \
            else attention_mask.to(device=self.device, dtype=torch.long)
        self.kv.reset()
        logits, _ = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, cache=self.kv, num_logits_to_keep=1)
        first = logits[:, -1].argmax(-1)                                     # [B]
        self.out.fill_(self.pad_token_id)
        self.out[:, 0] = first
        step_done(first)                                                     # the prefill's token is chosen
        self.done.copy_(torch.isin(first, self._eos) if not self.ignore_eos else torch.zeros_like(self.done))
        self.tokens.copy_(first[:, None])
        self.positions.copy_(mask.sum(-1, keepdim=True))                     # next position = real tokens so far
        self.index.fill_(T)
        self.step_i.fill_(1)
        self.key_ok.zero_()
        self.key_ok[:, :T] = mask.bool()
        if max_new_tokens > 1 and not self.captured:
            self._capture()
            self.captured = True
        for _ in range(max_new_tokens - 1):
            self.replay()
            step_done(self.tokens[:, 0])                                     # (a timing hook runs on the host)
        return self.out[:, :max_new_tokens].clone()


_COMPILED = [0]                 # modules passed to compile_regions so far in this process


def compile_regions(modules) -> list:
    """``torch.compile`` each module (regional compilation: the decoder layers are identical, so after the first
    one the compiler's caches make the others cheap). Each layer indexes its own cache buffers, which costs one
    recompilation per layer, and so does every new shape or implementation choice (another decoder: batch size,
    ``MLAttention.impl``): the recompile limit is raised to allow them all (past it a layer would run eagerly)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    _COMPILED[0] += len(modules)
    need = 2 * _COMPILED[0] + 8
    cfg.cache_size_limit = max(cfg.cache_size_limit, need)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * need)
    return [torch.compile(m, dynamic=False) for m in modules]


def decoder_for(lm, batch: int, length: int, device, mode: str = "graph", eos_token_id=None, pad_token_id: int = 0,
                ignore_eos: bool = False) -> GraphDecoder:
    """The :class:`GraphDecoder` kept on the language model ``lm`` (in ``lm._graph_decoders``) for these settings,
    ``length`` positions rounded up to :data:`ROUND` and the model's implementation choices (a captured graph bakes
    in the ``impl`` of its experts and MLA layers), made (and captured) on first use."""
    max_len = -(-length // ROUND) * ROUND
    store = lm.__dict__.setdefault("_graph_decoders", {})
    eos = tuple([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or ())
    impls = tuple(sorted({(type(m).__name__, m.impl) for m in lm.modules()
                          if isinstance(getattr(m, "impl", None), str)}))          # Experts, MLAttention
    key = (batch, max_len, mode, str(device), eos, pad_token_id, bool(ignore_eos), impls)
    if key not in store:
        store[key] = GraphDecoder(lm, batch, max_len, device, mode, list(eos), pad_token_id, ignore_eos)
    return store[key]
