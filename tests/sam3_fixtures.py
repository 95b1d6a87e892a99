"""Tiny random SAM 3 checkpoints for tests, written at test time in the released layout (no download, nothing
committed). Load with ``pytest_plugins = ["sam3_fixtures"]``; each fixture is made once per session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Seed of the session's tiny SAM 3; tests compare against transformers on these same weights.
SEED = 0
#: Below the random weights' scores (about 0.25), so concept queries find several instances.
LOW_THRESHOLD = 0.2


@pytest.fixture(scope="session")
def sam3_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SAM 3 folder (``facebook/sam3``'s layout: config.json, model.safetensors, processor files)."""
    from model.sam3.tiny import write_tiny_sam3

    return write_tiny_sam3(tmp_path_factory.mktemp("sam3") / "tiny", seed=SEED)


@pytest.fixture(scope="session")
def sam3_predictor(sam3_tiny: Path):
    """The tiny SAM 3, loaded once (fp32, CPU)."""
    from model.sam3.modeling import Sam3Predictor

    return Sam3Predictor.from_pretrained(sam3_tiny, dtype="fp32", device="cpu")


def rgb_image(height: int = 60, width: int = 80, seed: int = 1) -> np.ndarray:
    """A random RGB ``H x W x 3`` uint8 picture."""
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
