"""Shared fixtures: a random-tiny snapshot folder (made once per test session), the model and processor loaded
from it, and a deterministic test picture."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory) -> str:
    """A complete random-tiny snapshot folder (config, one weight file, tokenizer, processor config). Read-only:
    tests that modify a snapshot copy it first."""
    from vl2lab.checkpoint import make_random_snapshot

    return make_random_snapshot(str(tmp_path_factory.mktemp("random-tiny")), "random-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_snapshot):
    """(model, processor) loaded from ``tiny_snapshot``; do not modify the model in place."""
    from vl2lab.checkpoint import load_pretrained

    return load_pretrained(tiny_snapshot)


def make_picture(width: int, height: int, seed: int = 0):
    """A deterministic RGB picture: smooth colour gradients plus a few coloured squares."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    for _ in range(4):
        s = int(rng.integers(16, max(17, min(width, height) // 3)))
        x0, y0 = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        img[y0:y0 + s, x0:x0 + s] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(img)


@pytest.fixture(scope="session")
def picture_768():
    return make_picture(768, 768, seed=0)
