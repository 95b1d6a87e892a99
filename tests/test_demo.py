"""The from-scratch recipe and the committed offline demo model (models/demo, served by `make run`)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from model.cli_train import _mapping, add_training_parsers
from model.demo import DEMO_DIR, DEMO_FIRST, FROM_SCRATCH, POLISH, cli_flags, held_out_metrics
from model.finetune_config import FinetuneConfig

#: Mean IoU of the demo model on its example pictures, overall and per query kind, must stay at least this
#: (measured 0.979 on 37 queries, each kind 0.97-0.98; the previous model: 0.795, colour far lower).
DEMO_EXAMPLES_MIN_IOU = 0.85


def _finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_training_parsers(parser.add_subparsers())
    return parser


@pytest.mark.parametrize("recipe", [FROM_SCRATCH, DEMO_FIRST, POLISH], ids=["from_scratch", "demo_first", "polish"])
def test_recipe_flags_parse_back_to_the_recipe(recipe):
    """bench_learning passes FROM_SCRATCH as command-line flags: the real parser must read back the same config."""
    args = _finetune_parser().parse_args(["finetune", "--base", "b", "--data", "synthetic", "--out", "o",
                                          *cli_flags(recipe)])
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    for key, value in recipe.items():
        assert getattr(cfg, key) == value, key


def test_mapping_flags():
    assert _mapping("ce=1,bce=2.5, dice=0") == {"ce": 1.0, "bce": 2.5, "dice": 0.0}
    assert _mapping("sam.mask_decoder=3") == {"sam.mask_decoder": 3.0}
    assert _mapping("") == {}
    for bad in ("sam.", "=3", "sam.=fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=NUMBER"):
            _mapping(bad)
    # Through the parser, a bad value is a usage error (exit status 2), not a traceback.
    with pytest.raises(SystemExit) as exc:
        _finetune_parser().parse_args(["finetune", "--base", "b", "--data", "d", "--out", "o", "--weights", "ce"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_committed_demo_model_is_small_and_segments_held_out_scenes():
    """The shipped model, evaluated here and now (not its own metrics.json): under 10 MB, and on 120 held-out
    masks it meets issue 10's bar - overall >= 0.85, every kind of query >= 0.75 (colour-only ones were at 0.46),
    refinement >= 0.4 (the first stage alone: 0.30). metrics.json (what the README and the model card quote) must
    agree with that fresh evaluation."""
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size < 10e6
    fresh = held_out_metrics(DEMO_DIR, examples=120)
    assert fresh["masks"] == 120 and set(fresh["by_kind"]) == {"colour", "position", "shape", "size"}
    assert fresh["giou"] >= 0.85 and min(fresh["by_kind"].values()) >= 0.75, fresh["by_kind"]
    assert fresh["refine"]["masks"] == 60 and fresh["refine"]["giou"] >= 0.4, fresh["refine"]
    recorded = json.loads((DEMO_DIR / "metrics.json").read_text())
    assert recorded["masks"] >= 1000 and recorded["train_seconds"] <= 7200
    assert abs(fresh["giou"] - recorded["giou"]) < 0.08  # same held-out distribution, smaller sample
    for kind, value in fresh["by_kind"].items():
        assert abs(value - recorded["by_kind"][kind]) < 0.15, (kind, value, recorded["by_kind"])
    assert abs(fresh["refine"]["giou"] - recorded["refine"]["giou"]) < 0.1


def test_demo_model_answers_queries_about_its_example_pictures():
    """The serving path - generation, not teacher forcing - on the pictures shipped in models/demo/examples/ (256 px,
    twice the training size, as a user would import them): one [SEG] per answer, masks that match the scenes'
    ground truth."""
    import numpy as np
    from PIL import Image

    from model.finetune import SYNTHETIC_VAL_SEED
    from model.inference import LisaPredictor
    from model.phrasing import question as _question
    from model.synthetic import make_scene, query_kind

    predictor = LisaPredictor.from_pretrained(str(DEMO_DIR))
    listed = json.loads((DEMO_DIR / "examples" / "queries.json").read_text())
    ious, by_kind = [], {}
    for name, phrases in listed.items():
        scene = make_scene(2 * SYNTHETIC_VAL_SEED + int(name.split("_")[1].split(".")[0]), size=256)
        image = np.asarray(Image.open(DEMO_DIR / "examples" / name).convert("RGB"))
        assert np.array_equal(image, scene.image) and phrases == [q.phrase for q in scene.queries]
        encoded = predictor.encode(image)
        for query, result in zip(scene.queries, predictor.segment([(encoded, _question(p)) for p in phrases])):
            assert result.masks.shape == (1, 256, 256), result.text
            truth = scene.target_mask(query)
            ious.append((result.masks[0] & truth).sum() / max(1, (result.masks[0] | truth).sum()))
            by_kind.setdefault(query_kind(query.phrase), []).append(ious[-1])
    assert len(ious) >= 12 and float(np.mean(ious)) >= DEMO_EXAMPLES_MIN_IOU, np.round(ious, 2)
    # Each kind on its own, colour words included ("red" must not answer like "green").
    means = {kind: round(float(np.mean(v)), 3) for kind, v in by_kind.items()}
    assert set(means) == {"colour", "position", "shape", "size"} and min(means.values()) >= DEMO_EXAMPLES_MIN_IOU, means
