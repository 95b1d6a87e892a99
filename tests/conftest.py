"""Shared fixtures. Model fixtures load the tiny LISA checkpoint in tests/fixtures/lisa_tiny once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Fixture modules that tests load with pytest_plugins and also import from: rewrite their asserts either way.
pytest.register_assert_rewrite("image_fixtures", "redis_fixtures", "backend_fixtures", "ls_fixtures", "sam3_fixtures")

FIXTURE = Path(__file__).parent / "fixtures" / "lisa_tiny"
CHECKPOINT = FIXTURE / "checkpoint"
CLIP_TOWER = FIXTURE / "clip_tower"
CASES = {
    1: ("What is the red object in this image? Please output segmentation mask.", "Sure, [SEG]."),
    2: ("Which shape has no corners? Please respond with segmentation mask.", "[SEG]."),
    3: ("Can you segment the blue square in this image?", "Sure, the segmentation result is [SEG]."),
}


def case_arrays(case: int) -> dict[str, np.ndarray]:
    """The reference arrays LISA's own code computed for a fixture case."""
    with np.load(FIXTURE / "cases" / f"case{case}.npz") as data:
        return {k: data[k] for k in data.files}


def case_image(case: int) -> Path:
    return FIXTURE / "cases" / f"case{case}.png"


@pytest.fixture(scope="session")
def tiny_predictor():
    """The fixture LISA, loaded once (fp32, CPU)."""
    from model.inference import LisaPredictor

    return LisaPredictor.from_pretrained(str(CHECKPOINT), vision_tower=str(CLIP_TOWER))


def worker_argv(model: Path, version: str, *options: str) -> list[str]:
    """The command line of a `lisa-ls worker` serving ``model`` on CPU under ``version``."""
    import sys

    return [sys.executable, "-m", "worker.cli", "worker", "--model", str(model), *options, "--device", "cpu",
            "--model-version", version]


def tiny_worker_argv(version: str) -> list[str]:
    """The command line of a `lisa-ls worker` serving the fixture LISA on CPU under ``version``."""
    return worker_argv(CHECKPOINT, version, "--vision-tower", str(CLIP_TOWER))
