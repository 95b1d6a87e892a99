"""The synthetic reasoning-segmentation generator."""

from __future__ import annotations

import numpy as np

from model.synthetic import COLOURS, KINDS, make_scene


def test_scenes_are_deterministic_and_answerable():
    a, b = make_scene(42), make_scene(42)
    np.testing.assert_array_equal(a.image, b.image)
    assert [q.phrase for q in a.queries] == [q.phrase for q in b.queries]
    for seed in range(50):
        scene = make_scene(seed, size=96)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        assert any(len(q.targets) == 2 for q in scene.queries)  # every scene asks for two objects once
        assert any(len(q.targets) == 1 for q in scene.queries)
        for mask in scene.shape_masks:
            assert mask.any()
        # Shapes never overlap, so each target mask is exactly its shapes' pixels.
        assert sum(m.sum() for m in scene.shape_masks) == np.logical_or.reduce(scene.shape_masks).sum()


def test_queries_are_true_of_the_scene():
    for seed in range(100):
        scene = make_scene(seed)
        areas = [int(m.sum()) for m in scene.shape_masks]
        for q in scene.queries:
            shapes = [scene.shapes[i] for i in q.targets]
            if q.phrase == "the shape with no corners":
                assert [s.kind for s in shapes] == ["circle"]
            elif q.phrase.startswith("the one that is not a "):
                kind = q.phrase.rsplit(" ", 1)[1]
                assert kind in KINDS and all(s.kind != kind for s in shapes)
            elif q.phrase == "the largest shape":
                assert areas[q.targets[0]] == max(areas)
            elif q.phrase.endswith(" shapes") and q.phrase.split()[1] in COLOURS:
                assert len(shapes) == 2 and {s.colour for s in shapes} == {q.phrase.split()[1]}
