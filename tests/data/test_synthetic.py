"""The synthetic benchmark: determinism, exact ground truth, no class-position correlation."""

import hashlib

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from dinokit.data import synthetic as syn


def _digest(sc: syn.Scene) -> str:
    h = hashlib.sha256()
    for a in (sc.image, sc.mask, sc.boxes, sc.instance_labels, *sc.instance_masks):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(f"{sc.label}{sc.image_id}".encode())
    return h.hexdigest()


@pytest.mark.parametrize("fine", [False, True])
def test_byte_identical_for_same_seed_and_different_for_another(fine):
    a = [_digest(syn.render_scene(3, i, (48, 40), fine)) for i in range(6)]
    b = [_digest(syn.render_scene(3, i, (48, 40), fine)) for i in range(6)]
    c = [_digest(syn.render_scene(4, i, (48, 40), fine)) for i in range(6)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    assert len(set(a)) == 6  # scenes of one seed differ from each other


@pytest.mark.parametrize("fine", [False, True])
def test_masks_agree_with_boxes_and_labels(fine):
    for i in range(40):
        sc = syn.render_scene(1, i, (40, 56), fine)
        h, w = sc.mask.shape
        assert sc.image.shape == (h, w, 3) and sc.image.dtype == np.uint8
        assert len(sc.boxes) == len(sc.instance_labels) == len(sc.instance_masks) >= 1
        union = np.zeros((h, w), bool)
        for k, (box, lab, im) in enumerate(zip(sc.boxes, sc.instance_labels, sc.instance_masks)):
            ys, xs = np.nonzero(im)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            expected = (lab + 1) if not fine else (1 if k == 0 else 2)
            assert (sc.mask[im] == expected).all()
            assert not (union & im).any()  # instances are disjoint (visible pixels only)
            union |= im
        assert ((sc.mask > 0) == union).all()  # background exactly where no instance is
        assert set(np.unique(sc.mask)) <= set(range(syn.num_seg_classes(fine)))
        if fine:
            assert sc.label == sc.instance_labels[0] and 0 <= sc.label < syn.num_classes(True)
        else:
            areas = [m.sum() for m in sc.instance_masks]
            assert sc.label == sc.instance_labels[int(np.argmax(areas))]


def test_class_independent_of_position():
    """Chi-square test of instance class vs the 3x3 cell of the box centre (fixed seed, 400 scenes)."""
    table = np.zeros((len(syn.SHAPE_CLASSES), 9), int)
    for i in range(400):
        sc = syn.render_scene(7, i, (32, 32))
        for (x, y, w, h), c in zip(sc.boxes, sc.instance_labels):
            cx, cy = min(int(3 * (x + w / 2) / 32), 2), min(int(3 * (y + h / 2) / 32), 2)
            table[c, 3 * cy + cx] += 1
    assert table.sum() > 500
    assert (table.sum(1) > 50).all()  # every class occurs often
    p = chi2_contingency(table).pvalue
    assert p > 1e-3, f"class and position look correlated (p={p:.2g})"


def test_dataset_wrapper_and_errors():
    ds = syn.SyntheticScenes(3, (24, 24), seed=2)
    assert len(ds) == 3 and ds[1].image_id == syn.render_scene(2, 1, (24, 24)).image_id
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="at least 16"):
        syn.render_scene(0, 0, (8, 8))
    with pytest.raises(ValueError, match="positive"):
        syn.SyntheticScenes(0)
