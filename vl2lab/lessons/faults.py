"""A rank that dies mid-generation, the way a crash or the out-of-memory killer ends it, for notebook 04's fault demo.

Lesson: notebook 04, section "9. Bad input and faults".
"""
from __future__ import annotations

import os
from typing import Optional

from vl2lab.inputs.tiling import open_image
from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.groups import rank_world
from vl2lab.parallel.load import load_sharded

__all__ = ["die_after_first_token"]


def die_after_first_token(snapshot_path: str, dying_rank: int = 1, prompt: str = "Describe the image.",
                          image_path: Optional[str] = None, moe: str = "tp", dtype: str = "float32",
                          max_new_tokens: int = 8, exit_code: int = 3, group=None) -> dict:
    """Rank function: the deployment of :func:`deploy`, except that rank ``dying_rank`` ends its process with
    ``os._exit(exit_code)`` as soon as the first token is chosen (when the second forward starts), the way a
    crash or the out-of-memory killer ends it: no exception, no status file. The other ranks wait for it in their
    next collective until the launcher stops them; ``vl2lab.run`` then raises RankFailedError naming it."""
    rank, world = rank_world(group)
    if not 0 <= dying_rank < world:
        raise ValueError(f"dying_rank={dying_rank} is not a rank of this launch (0..{world - 1})")
    model, processor = load_sharded(snapshot_path, group=group, moe=moe, dtype=dtype)
    user = {"role": "<|User|>", "content": prompt}
    if image_path:
        user = {"role": "<|User|>", "content": "<image>\n" + prompt, "images": [open_image(image_path)]}
    batch = processor(conversation=[user, {"role": "<|Assistant|>", "content": ""}])
    batch = batch.to(next(model.parameters()).device, as_dtype(dtype))
    calls = []

    def maybe_die(*_):
        calls.append(1)
        if rank == dying_rank and len(calls) == 2:
            print(f"[rank {rank}] first token chosen; this process now ends (os._exit({exit_code}))", flush=True)
            os._exit(exit_code)
    model.language.register_forward_pre_hook(maybe_die)
    tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return {"rank": rank, "tokens": tokens.cpu()}                    # never reached when a rank died
