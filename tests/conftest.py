"""Shared fixtures: a random-tiny snapshot folder (made once per test session), the model and processor loaded
from it, and a deterministic test picture."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory) -> str:
    """A complete random-tiny snapshot folder (config, one weight file, tokenizer, processor config). Read-only:
    tests that modify a snapshot copy it first."""
    from vl2lab.weights.pretrained import make_random_snapshot

    return make_random_snapshot(str(tmp_path_factory.mktemp("random-tiny")), "random-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_snapshot):
    """(model, processor) loaded from ``tiny_snapshot``; do not modify the model in place."""
    from vl2lab.weights.pretrained import load_pretrained

    return load_pretrained(tiny_snapshot)


def make_picture(width: int, height: int, seed: int = 0):
    """A deterministic RGB test picture (the one the deployment checks use)."""
    from vl2lab.lessons.sharded_vs_dense import picture
    return picture(width, height, seed)


@pytest.fixture(scope="session")
def picture_768():
    return make_picture(768, 768, seed=0)
