"""Shared fixtures: a tiny random SD pipeline saved with ``save_pretrained`` (the same folder layout
and loading path as SD1.5), for tests that need a pipeline but not the trained embedded teacher."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory) -> str:
    """Path of a randomly initialised tiny StableDiffusionPipeline in diffusers' folder layout."""
    from cdlab.tiny.architecture import build_pipeline

    path = tmp_path_factory.mktemp("tiny-random-pipe")
    build_pipeline(seed=0).save_pretrained(str(path), safe_serialization=True)
    return str(path)
