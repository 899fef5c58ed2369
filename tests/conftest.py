"""Shared fixtures. The real public data lives in ../shared/data beside the repo; tests that need it skip without it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # `from tools import train_fold`


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


# A tiny open_clip architecture (random init) for the backbone, text and zero-shot tests: native size 64, patch 16,
# 3 blocks of width 48 (3 heads), layer scale on so that ls_1 / ls_2 are exercised; a -quickgelu twin is registered.
TINY_CLIP = "fewshot-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "layers": 3,
        "width": 48,
        "head_width": 16,
        "patch_size": 16,
        "ls_init_value": 0.5,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Registers TINY_CLIP (and TINY_CLIP-quickgelu) with open_clip and returns its name."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    (folder / f"{TINY_CLIP}-quickgelu.json").write_text(json.dumps({**TINY_CLIP_CONFIG, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return TINY_CLIP
