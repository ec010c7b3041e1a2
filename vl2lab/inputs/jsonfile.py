"""One JSON object read from a snapshot's configuration file, or one clear error naming the file and what to do.

The processor and the tokenizer read their snapshot files (``processor_config.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) through this one reader, so a truncated or hand-edited file fails the same way
whichever reads it, before any weight is loaded.

Lesson: notebook 01, section "2. What the processor does to a picture" (the files a snapshot brings).
"""
from __future__ import annotations

import json


def read_json_object(fn: str, error: type[Exception], fix: str) -> dict:
    """The JSON object in ``fn``; ``error(message)`` if the file is not valid JSON or holds something other than
    an object. ``fix`` says what to do and ends the message."""
    try:
        with open(fn, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{fn} is not valid JSON ({e}): {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{fn} holds {type(obj).__name__}, not a JSON object; {fix}")
    return obj
