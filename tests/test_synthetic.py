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


def test_corrections_say_which_shapes_the_refined_mask_covers():
    import random

    from model.synthetic import correction

    rng, kinds = random.Random(0), set()
    for seed in range(200):
        scene = make_scene(seed)
        query = scene.queries[seed % len(scene.queries)]
        fix = correction(scene, query, rng)
        if fix.box is not None:
            [i] = fix.targets
            ys, xs = np.nonzero(scene.shape_masks[i])
            assert fix.box[0] <= xs.min() and fix.box[2] >= xs.max() + 1 and fix.box[1] <= ys.min()
            kinds.add("box")
            continue
        expected = set(query.targets) if fix.use_seg else set()
        for x, y, label in fix.points:
            under = [i for i, m in enumerate(scene.shape_masks) if m[int(y), int(x)]]
            if not under:
                assert label == 0  # a click on the background says "not here"
                continue
            (expected.add if label else expected.discard)(under[0])
            kinds.add("add" if label else "remove")
        assert sorted(expected) == fix.targets
        kinds.add("with query" if fix.use_seg else "plain")
        if not fix.use_seg:
            assert fix.targets  # plain SAM always has a positive click to go on
    assert kinds == {"box", "add", "remove", "with query", "plain"}
