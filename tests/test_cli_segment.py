"""``lisa-ls segment`` reproduces the fixture's cases through the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import CASES, CHECKPOINT, case_arrays, case_image
from PIL import Image


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "segment", "--model", str(CHECKPOINT), *args],
                          capture_output=True, text=True, timeout=300)


def test_generation_case_through_cli(tmp_path):
    ref = case_arrays(1)
    out = tmp_path / "out.npz"
    png = tmp_path / "mask.png"
    proc = run("--image", str(case_image(1)), "--query", CASES[1][0], "--max-new-tokens", "32",
               "--output", str(out), "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    prompt_len = ref["input_ids"].shape[1]
    assert got["output_ids"].dtype == np.int64
    assert got["output_ids"].tolist() == ref["gen_output_ids"][0, prompt_len:].tolist()
    assert got["mask_logits"].dtype == np.float32 and got["masks"].dtype == bool
    np.testing.assert_allclose(got["mask_logits"], ref["gen_pred_masks"].astype(np.float32), atol=4e-3)
    np.testing.assert_allclose(got["scores"], ref["gen_iou_predictions"][:, 0], atol=1e-4)
    assert str(got["text"]).startswith("[SEG]")
    mask_png = np.asarray(Image.open(png))
    assert mask_png.shape == (480, 640)
    np.testing.assert_array_equal(mask_png > 0, got["masks"][0])


def test_teacher_forced_case_through_cli(tmp_path):
    ref = case_arrays(3)
    out = tmp_path / "tf.npz"
    proc = run("--image", str(case_image(3)), "--query", CASES[3][0], "--answer", CASES[3][1], "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    assert got["output_ids"].shape == (0,) and str(got["text"]) == CASES[3][1]
    np.testing.assert_allclose(got["mask_logits"], ref["tf_pred_masks"].astype(np.float32), atol=4e-3)


def test_bad_image_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    proc = run("--image", str(bad), "--query", "the cat", "--output", str(tmp_path / "x.npz"))
    assert proc.returncode == 2
    assert "cannot be decoded as an image" in proc.stderr and "Traceback" not in proc.stderr
