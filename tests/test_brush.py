"""backend.brush: byte identity with label-studio-sdk's mask2rle, round trips, and the errors users see.

The SDK is not a dependency of the backend venv, so the reference RLEs come from another interpreter: the one named
by ``LISA_LS_SDK_PYTHON``, else ``.lsvenv/bin/python`` (the Label Studio venv the Makefile builds). All masks go to
it in one .npz and come back as JSON, from one subprocess. Without either interpreter the identity tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.brush import BrushRLEError, band_to_rle, mask_to_rle, rle_to_mask

ROOT = Path(__file__).resolve().parent.parent

# Runs in the SDK's interpreter. mask_* entries are 0/255 masks for mask2rle (raw_* are passed unchanged);
# rgba_* entries are H×W×4 images for encode_rle, whose lone bytes become literal tokens.
_SDK_SCRIPT = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import encode_rle, mask2rle
arrays = np.load(sys.argv[1])
out = {name: (encode_rle(arrays[name].ravel()) if name.startswith("rgba_") else mask2rle(arrays[name]))
       for name in arrays.files}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


def _sdk_python() -> tuple[str | None, str]:
    """The interpreter that has label-studio-sdk, or None and the reason why there is none."""
    env = os.environ.get("LISA_LS_SDK_PYTHON")
    if env:
        if os.access(env, os.X_OK):
            return env, ""
        return None, f"LISA_LS_SDK_PYTHON={env} is not an executable interpreter"
    local = ROOT / ".lsvenv" / "bin" / "python"
    if os.access(local, os.X_OK):
        return str(local), ""
    return None, "no label-studio-sdk interpreter: set LISA_LS_SDK_PYTHON or build .lsvenv (the Makefile does)"


def _blobs(rng: np.random.Generator, height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """Random blobs: a coarse random field, bilinearly upsampled and thresholded (like real object masks)."""
    field = Image.fromarray(rng.random(grid).astype(np.float32))
    return np.asarray(field.resize((width, height), Image.BILINEAR)) > 0.5


def _ladder() -> np.ndarray:
    """A 1×N row whose runs cross every token-class boundary, including the 65536-word split of long runs."""
    lengths = [*range(1, 80), 16383, 16384, 16385, 32768, 32769, 7]
    return np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(lengths)])[None, :]


def _masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    masks = {
        "empty_7x13": np.zeros((7, 13), bool),
        "full_480x640": np.ones((480, 640), bool),
        "full_128x128": np.ones((128, 128), bool),  # exactly one 65536-word run
        "full_1x16385": np.ones((1, 16385), bool),  # one word-run past 65536
        "one_1x1": np.ones((1, 1), bool),
        "zero_1x1": np.zeros((1, 1), bool),
        "row_1x257": rng.random((1, 257)) < 0.5,
        "col_300x1": rng.random((300, 1)) < 0.5,
        "odd_7x13": rng.random((7, 13)) < 0.5,
        "checker_31x17": np.indices((31, 17)).sum(0) % 2 == 1,
        "checker_480x640": np.indices((480, 640)).sum(0) % 2 == 0,
        "checker8_480x640": (np.indices((480, 640)) // 8).sum(0) % 2 == 0,
        "hstripes_480x640": np.arange(480)[:, None].repeat(640, 1) // 3 % 2 == 0,
        "vstripes_480x640": np.arange(640)[None, :].repeat(480, 0) // 5 % 2 == 0,
        "blobs_480x640": _blobs(rng, 480, 640, (12, 16)),
        "noise_101x99": rng.random((101, 99)) < 0.5,
        "sparse_noise_480x640": rng.random((480, 640)) < 0.01,
        "fragmented_3000x2000": _blobs(rng, 3000, 2000, (100, 150)) ^ (rng.random((3000, 2000)) < 0.01),
        "ladder": _ladder(),
    }
    for name, (y, x) in {"tl": (0, 0), "tr": (0, 12), "bl": (6, 0), "br": (6, 12), "mid": (3, 6)}.items():
        masks[f"pixel_{name}_7x13"] = np.zeros((7, 13), bool)
        masks[f"pixel_{name}_7x13"][y, x] = True
    return masks


MASKS = _masks()
LITERAL_CASES = ["odd_7x13", "checker_31x17", "blobs_480x640", "pixel_mid_7x13"]
RGBA_COLOUR = (255, 59, 48)  # a label colour: RGB ≠ alpha makes the SDK's encode_rle emit literal tokens


def _rgba(mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*colour, 255)
    return rgba


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Reference RLEs from label-studio-sdk, for every mask, computed in the SDK's interpreter."""
    python, reason = _sdk_python()
    if python is None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("sdk")
    arrays = {f"mask_{k}": v.astype(np.uint8) * 255 for k, v in MASKS.items()}
    arrays["raw_01"] = MASKS["odd_7x13"].astype(np.uint8)  # a 0/1 mask, as the SDK receives it
    for name in LITERAL_CASES:
        arrays[f"rgba_{name}"] = _rgba(MASKS[name], RGBA_COLOUR)
        arrays[f"rgba_grey_{name}"] = _rgba(MASKS[name], (0, 0, 0))
    np.savez(tmp / "masks.npz", **arrays)
    proc = subprocess.run(
        [python, "-c", _SDK_SCRIPT, str(tmp / "masks.npz"), str(tmp / "rles.json")],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"the SDK reference run failed:\n{proc.stderr[-4000:]}"
    return json.loads((tmp / "rles.json").read_text())


# ------------------------------------------------------------------------------------------- identity with the SDK


@pytest.mark.parametrize("name", list(MASKS))
def test_encode_matches_sdk(sdk: dict[str, list[int]], name: str) -> None:
    ours = mask_to_rle(MASKS[name])
    ref = sdk[f"mask_{name}"]
    assert len(ours) == len(ref)
    assert ours == ref


@pytest.mark.parametrize("name", list(MASKS))
def test_decodes_sdk_rle(sdk: dict[str, list[int]], name: str) -> None:
    mask = MASKS[name]
    assert np.array_equal(rle_to_mask(sdk[f"mask_{name}"], *mask.shape), mask)


@pytest.mark.parametrize("name", LITERAL_CASES)
def test_decodes_sdk_literal_tokens(sdk: dict[str, list[int]], name: str) -> None:
    mask = MASKS[name]
    assert np.array_equal(rle_to_mask(sdk[f"rgba_{name}"], *mask.shape), mask)
    assert np.array_equal(rle_to_mask(sdk[f"rgba_grey_{name}"], *mask.shape), mask)


def test_zero_one_mask_convention(sdk: dict[str, list[int]]) -> None:
    """The SDK writes a 0/1 mask's 1 as alpha 1 (nearly invisible); we write 255, as for a 0/255 or bool mask."""
    mask = MASKS["odd_7x13"]
    assert mask_to_rle(mask.astype(np.uint8)) == sdk["mask_odd_7x13"]
    assert sdk["raw_01"] != sdk["mask_odd_7x13"]
    assert not rle_to_mask(sdk["raw_01"], *mask.shape).any()  # below the default threshold of 128
    assert np.array_equal(rle_to_mask(sdk["raw_01"], *mask.shape, threshold=1), mask)


# ------------------------------------------------------------------------------------------------ without the SDK


@pytest.mark.parametrize("name", list(MASKS))
def test_round_trip(name: str) -> None:
    mask = MASKS[name]
    decoded = rle_to_mask(mask_to_rle(mask), *mask.shape)
    assert decoded.dtype == np.bool_ and decoded.shape == mask.shape
    assert np.array_equal(decoded, mask)


def test_input_dtypes_agree() -> None:
    mask = MASKS["blobs_480x640"]
    expected = mask_to_rle(mask)
    values = np.random.default_rng(0).integers(1, 256, mask.shape)
    for variant in (
        mask.astype(np.uint8),
        mask.astype(np.uint8) * 255,
        np.where(mask, values, 0).astype(np.uint8),  # any value > 0 is foreground
        mask.astype(np.int64),
        np.where(mask, 7, -3).astype(np.int16),  # negatives are background
        np.asfortranarray(mask),
    ):
        assert mask_to_rle(variant) == expected
    for view in (mask.T, mask[::3, 1::2]):  # non-contiguous views encode as their copies
        assert mask_to_rle(view) == mask_to_rle(np.ascontiguousarray(view))


def _bit_stream(
    num: int, tokens: list[tuple[int, int, list[int]]], class_bits: tuple[int, ...] = (3, 4, 8, 16), word: int = 8
) -> list[int]:
    """A reference bit-string writer for hand-made streams.

    Tokens are (1, class, [value, count]) for a run and (0, class, words) for literal words.
    """
    bits = f"{num:032b}{word - 1:05b}" + "".join(f"{b - 1:04b}" for b in class_bits)
    for flag, cls, words in tokens:
        count = words[1] if flag else len(words)
        bits += f"{flag}{cls:02b}{count - 1:0{class_bits[cls]}b}"
        bits += "".join(f"{w:0{word}b}" for w in (words[:1] if flag else words))
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_decodes_hand_made_streams() -> None:
    """Literal chunks of many words and non-default class sizes, as other rle-pack encoders may write them."""
    # 2×3 image: pixels set, unset, half-alpha / unset, set, set.
    rgba = [10, 20, 30, 255] + [0] * 4 + [9, 9, 9, 128] + [0] * 4 + [255] * 8
    tokens = [(0, 1, rgba[:4]), (1, 0, [0, 4]), (0, 0, rgba[8:12]), (1, 0, [0, 4]), (1, 1, [255, 8])]
    expected = np.array([[1, 0, 1], [0, 1, 1]], bool)
    assert np.array_equal(rle_to_mask(_bit_stream(24, tokens, class_bits=(2, 4, 8, 16)), 2, 3), expected)
    assert np.array_equal(
        rle_to_mask(_bit_stream(24, tokens, class_bits=(2, 4, 8, 16)), 2, 3, threshold=129),
        expected & ~np.array([[0, 0, 1], [0, 0, 0]], bool),
    )
    # One literal token holding the whole image, with 16-bit count fields everywhere.
    assert np.array_equal(rle_to_mask(_bit_stream(24, [(0, 3, rgba)], class_bits=(16, 16, 16, 16)), 2, 3), expected)


def test_accepts_other_containers_and_trailing_bytes() -> None:
    mask = MASKS["odd_7x13"]
    rle = mask_to_rle(mask)
    for variant in (tuple(rle), bytes(rle), np.array(rle, np.int64), np.array(rle, np.uint8), [*rle, 0, 0, 0]):
        assert np.array_equal(rle_to_mask(variant, 7, 13), mask)


# ------------------------------------------------------------------------------------------------------ bad input


def test_truncated() -> None:
    rle = mask_to_rle(MASKS["blobs_480x640"])
    for cut in (rle[: len(rle) // 2], rle[:-3], rle[:8]):
        with pytest.raises(BrushRLEError, match="truncated"):
            rle_to_mask(cut, 480, 640)
    for cut in ([], rle[:5]):
        with pytest.raises(BrushRLEError, match="header"):
            rle_to_mask(cut, 480, 640)


def test_wrong_size() -> None:
    # The stream stores only the number of values, so 13×7 cannot be told from 7×13; every other size can.
    rle = mask_to_rle(MASKS["odd_7x13"])
    for height, width in ((7, 14), (8, 13), (1, 1), (91, 2)):
        with pytest.raises(BrushRLEError, match="another size") as err:
            rle_to_mask(rle, height, width)
        assert f"{width}×{height}" in str(err.value) and "91 pixels" in str(err.value)


@pytest.mark.parametrize(
    "garbage",
    ["abc", None, 42, 1.5, {"a": 1}, [1.5, 2.0], [-1, 0], [256], [[1, 2]], ["1"], np.array([1.5]), np.array([300])],
)
def test_not_a_byte_list(garbage: object) -> None:
    with pytest.raises(BrushRLEError, match="integers 0-255"):
        rle_to_mask(garbage, 7, 13)


def test_corrupt_bodies() -> None:
    header = mask_to_rle(MASKS["odd_7x13"])[:6]
    with pytest.raises(BrushRLEError, match="more than"):
        rle_to_mask([*header, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], 7, 13)  # one run of 65536 words into 364
    rng = np.random.default_rng(7)
    for _ in range(20):
        body = rng.integers(0, 256, int(rng.integers(1, 200))).tolist()
        with pytest.raises(BrushRLEError):
            rle_to_mask([*header, *body], 7, 13)
    with pytest.raises(BrushRLEError, match="16-bit words"):
        rle_to_mask(_bit_stream(364, [(1, 2, [0, 256]), (1, 2, [0, 108])], word=16), 7, 13)


def test_bad_arguments() -> None:
    rle = mask_to_rle(MASKS["odd_7x13"])
    for height, width in ((0, 13), (7, -1), (7.0, 13), ("7", 13)):
        with pytest.raises(BrushRLEError, match="positive integers"):
            rle_to_mask(rle, height, width)
    for threshold in (0, 256):
        with pytest.raises(ValueError, match="threshold"):
            rle_to_mask(rle, 7, 13, threshold=threshold)
    assert issubclass(BrushRLEError, ValueError)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.zeros((2, 3, 4), bool), "2-D"),
        (np.zeros(5, bool), "2-D"),
        (np.zeros((0, 5), bool), "empty"),
        (np.zeros((3, 3), np.float32), "bool or integer"),
    ],
)
def test_bad_masks(mask: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mask_to_rle(mask)


def test_band_encoding_equals_the_whole_mask() -> None:
    """``band_to_rle`` (an instance encoded from the rows it spans) gives the bytes of ``mask_to_rle`` on the whole
    mask: bands touching the top or bottom, starting or ending on a set pixel, one row, every row, long runs."""
    rng = np.random.default_rng(11)
    for height, width in ((1, 1), (1, 9), (7, 1), (40, 33), (300, 700)):
        for _ in range(12):
            top = int(rng.integers(0, height))
            rows = int(rng.integers(1, height - top + 1))
            band = rng.random((rows, width)) < rng.choice([0.02, 0.5, 0.98])
            if rng.random() < 0.3:
                band[0, 0] = True
            if rng.random() < 0.3:
                band[-1, -1] = True
            whole = np.zeros((height, width), bool)
            whole[top : top + rows] = band
            assert band_to_rle(band, top, height) == mask_to_rle(whole), (height, width, top, rows)
            assert band_to_rle(band.astype(np.uint8) * 255, top, height) == mask_to_rle(whole)
    with pytest.raises(ValueError, match="do not fit"):
        band_to_rle(np.ones((3, 4), bool), 2, 4)
    with pytest.raises(ValueError, match="non-empty"):
        band_to_rle(np.ones((0, 4), bool), 0, 4)
