"""What the offline demo model is, and which pictures it can say something about.

The demo model (``models/demo``, :mod:`model.demo`) learnt one kind of picture: :mod:`model.synthetic`'s scenes, a
plain pale background with 3-4 flat shapes in 6 saturated colours. Asked about a photograph it still paints masks
(on a rocket launch photo: the whole background as 8+ regions), which look like answers and are not. So:

* it is recognised by a mark in its ``config.json`` (:data:`DEMO_MARK`, written by ``model.demo.build``), so a copy
  of the folder is recognised too;
* while it serves, its model version (``/setup``, ``/health``, every prediction) and each answer's note say that it is
  the demo and name the command that serves real LISA (:data:`REAL_LISA_COMMAND`);
* a picture unlike its scenes gets no answer but a message saying why (:func:`picture_problem`).

How "unlike its scenes" is told - two numbers a person can check, on the picture subsampled to at most 256 px:

* **top-colour share**: the share of pixels in the picture's 8 most common colours, each channel cut to 16 levels.
  A scene is a few flat colours (its background is a gentle vertical ramp between two pale colours, which spans
  1-3 such colours); a photograph spreads over hundreds. Measured: >= 0.962 on 600 training and held-out scenes at
  128 px, 1.000 on the 4 examples and on 50 held-out scenes at 256 px, >= 0.970 on scenes upscaled 3x (bilinear),
  0.85-0.97 (median 0.93) on scenes saved as JPEG at quality 75; <= 0.66 on every colour photograph tried
  (scikit-image's retina 0.659, rocket 0.513, astronaut 0.340, chelsea 0.294, coffee 0.259, motorcycle 0.205; two
  photos of a circuit board 0.251 and 0.444), 0.86 on a logo, but up to 0.99 on greyscale pictures (moon, brick),
  which are few shades too. Hence the second number:
* **strong-colour share**: the share of pixels whose channels differ by at least 80 (max - min). Every scene has
  coloured shapes: >= 0.048 on the 600 scenes; greyscale pictures have 0, a dark sky photo (Hubble deep field) 0.008.

A picture is like the scenes when the first is at least :data:`MIN_TOP_SHARE` (0.9) and the second at least
:data:`MIN_STRONG_SHARE` (0.02): all 654 PNG scenes above pass, 43 of the 50 JPEG ones, and none of the 29 other
pictures tried (scikit-image's 26 sample images and 3 other photographs and graphics).

Numpy and Pillow only: ``lisa-ls up`` imports it without torch.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Key in the demo model's ``config.json`` that marks it (``true``).
DEMO_MARK = "lisa_ls_demo"
#: What serves real LISA instead (README "Serving").
REAL_LISA_COMMAND = 'make run ARGS="--model xinlai/LISA-7B-v1 --dtype bf16 --device cuda"'
#: Where the pictures it can answer about are.
EXAMPLES = "models/demo/examples/"
#: Shown with every answer of the demo model (in the ``lisa`` TextArea of the labeling UI).
ANSWER_NOTE = (f"Answered by the offline DEMO model: it knows only pictures of flat coloured shapes like {EXAMPLES}. "
               f"For real pictures serve LISA: {REAL_LISA_COMMAND}")

TOP_COLOURS = 8
LEVELS = 16
MIN_TOP_SHARE = 0.9
STRONG_COLOUR = 80
MIN_STRONG_SHARE = 0.02
MAX_SIDE = 256
#: Verdicts remembered per image hash (a cached image is not decoded again for each query).
REMEMBERED = 1024


def is_demo_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds the demo model (its ``config.json`` carries :data:`DEMO_MARK`)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get(DEMO_MARK) is True
    except (OSError, ValueError, AttributeError):
        return False


def mark_demo_model(model_dir: str | Path) -> None:
    """Write :data:`DEMO_MARK` into ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config[DEMO_MARK] = True
    path.write_text(json.dumps(config, indent=2) + "\n")


def demo_version(version: str) -> str:
    """The demo model's version as Label Studio shows it (``/setup``, predictions): it says what it is."""
    return f"{version} (DEMO: coloured shapes only; real LISA: {REAL_LISA_COMMAND})"


@dataclass(frozen=True)
class SceneLikeness:
    """The two numbers of the module docstring, for one picture."""

    top_share: float
    strong_share: float

    @property
    def like_scenes(self) -> bool:
        return self.top_share >= MIN_TOP_SHARE and self.strong_share >= MIN_STRONG_SHARE

    def why_unlike(self) -> str:
        """``""`` for a picture like the scenes, else what is unlike them, in numbers."""
        reasons = []
        if self.top_share < MIN_TOP_SHARE:
            reasons.append(f"only {self.top_share:.0%} of its pixels are in its {TOP_COLOURS} main colours "
                           f"(the demo's scenes: at least {MIN_TOP_SHARE:.0%})")
        if self.strong_share < MIN_STRONG_SHARE:
            reasons.append(f"only {self.strong_share:.1%} of its pixels are strongly coloured (the demo's scenes: "
                           f"at least {MIN_STRONG_SHARE:.0%})")
        return "; ".join(reasons)


def scene_likeness(image: np.ndarray) -> SceneLikeness:
    """How much an ``H x W x 3`` uint8 RGB picture looks like the demo's training scenes."""
    step = max(1, -(-max(image.shape[:2]) // MAX_SIDE))
    sub = np.ascontiguousarray(image[::step, ::step, :3])
    levels = (sub // (256 // LEVELS)).astype(np.int32)
    codes = (levels[..., 0] * LEVELS + levels[..., 1]) * LEVELS + levels[..., 2]
    counts = np.bincount(codes.ravel(), minlength=LEVELS**3)
    top = float(np.sort(counts)[-TOP_COLOURS:].sum() / codes.size)
    wide = sub.astype(np.int16)
    strong = float(((wide.max(-1) - wide.min(-1)) >= STRONG_COLOUR).mean())
    return SceneLikeness(top, strong)


def unlike_scenes_message(likeness: SceneLikeness) -> str | None:
    """What the labeling UI shows instead of an answer about a picture unlike the scenes (``None``: like them)."""
    if likeness.like_scenes:
        return None
    return (f"The offline DEMO model knows only pictures of flat coloured shapes on a plain background, like "
            f"{EXAMPLES}; this picture is not one ({likeness.why_unlike()}), so its answer would not mean anything "
            f"and none is shown. For real pictures serve LISA: {REAL_LISA_COMMAND}")


_verdicts: OrderedDict[str, str | None] = OrderedDict()


def picture_problem(key: str, data: bytes) -> str | None:
    """:func:`unlike_scenes_message` for encoded image bytes (``key``: their hash, to remember the verdict);
    ``None`` also when the bytes do not decode (the caller's own decoding reports that)."""
    if key in _verdicts:
        _verdicts.move_to_end(key)
        return _verdicts[key]
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            picture = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    verdict = unlike_scenes_message(scene_likeness(picture))
    _verdicts[key] = verdict
    if len(_verdicts) > REMEMBERED:
        _verdicts.popitem(last=False)
    return verdict
