"""Paired image + mask transforms and the uint8 collate."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data import synthetic
from dinokit.data.transforms import SegTransform, collate, to_tensor_batch


def _item(h=20, w=30, seed=0):
    sc = synthetic.render_scene(seed, 0, (max(h, 16), max(w, 16)))
    return {"image": Image.fromarray(sc.image), "mask": sc.mask.astype(np.int64), "id": sc.image_id,
            "boxes": sc.boxes.copy(), "label": sc.label}, sc


def _mask_box(mask, value):
    ys, xs = np.nonzero(mask == value)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_resize_shorter_side_and_exact():
    item, sc = _item(20, 30)
    out = SegTransform(resize=10)(item)
    assert out["image"].size == (15, 10) and out["mask"].shape == (10, 15) and out["mask"].dtype == np.int64
    assert set(np.unique(out["mask"])) <= set(np.unique(sc.mask))  # nearest: no new labels
    out2 = SegTransform(resize=(8, 12))(item)
    assert out2["image"].size == (12, 8) and out2["mask"].shape == (8, 12)
    # integer upscaling by 2: nearest mask = pixel replication, boxes scale exactly
    up = SegTransform(resize=40)(item)
    assert (up["mask"] == np.kron(sc.mask, np.ones((2, 2), np.int64))).all()
    assert np.allclose(up["boxes"], sc.boxes * 2)
    assert item["image"].size == (30, 20)  # the input item is not modified


def test_center_crop_and_padding():
    item, sc = _item(20, 30)
    out = SegTransform(crop=(10, 12))(item)
    assert out["image"].size == (12, 10)
    assert (out["mask"] == sc.mask[5:15, 9:21]).all()
    assert (np.asarray(out["image"]) == sc.image[5:15, 9:21]).all()
    big = SegTransform(crop=24, ignore_index=255)(item)  # taller than the image: padded then cropped
    assert big["mask"].shape == (24, 24) and (big["mask"][20:] == 255).all()
    assert (np.asarray(big["image"])[20:] == 0).all()


def test_random_crop_seeded_and_boxes_follow_mask():
    item, sc = _item(48, 48, seed=3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t1 = SegTransform(crop=24, crop_mode="random", hflip=0.5, generator=g1)
    t2 = SegTransform(crop=24, crop_mode="random", hflip=0.5, generator=g2)
    for _ in range(10):
        a, b = t1(item), t2(item)
        assert (a["mask"] == b["mask"]).all() and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    # boxes are clipped with the crop: they contain the visible instance pixels, and equal their bounding box
    # when the instance is entirely inside the crop
    inst = _instance_map(sc)
    n_equal = 0
    for k in range(20):
        g = torch.Generator().manual_seed(k)
        out = SegTransform(crop=(30, 26), crop_mode="random", hflip=0.5, generator=g)({**item, "mask": inst})
        for j, box in enumerate(out["boxes"]):
            n = (out["mask"] == j + 1).sum()
            if box[2] == 0 or box[3] == 0:
                assert n == 0  # cropped away entirely
            if n == 0:
                continue
            x, y, w, h = _mask_box(out["mask"], j + 1)
            assert box[0] <= x and box[1] <= y and x + w <= box[0] + box[2] and y + h <= box[1] + box[3]
            if n == (inst == j + 1).sum():
                assert [x, y, w, h] == box.tolist()
                n_equal += 1
    assert n_equal > 5


def _instance_map(sc):
    m = np.zeros(sc.mask.shape, np.int64)
    for j, im in enumerate(sc.instance_masks):
        m[im] = j + 1
    return m


def test_hflip():
    item, sc = _item(20, 30)
    out = SegTransform(hflip=1.0)(item)
    assert (out["mask"] == sc.mask[:, ::-1]).all()
    assert (np.asarray(out["image"]) == sc.image[:, ::-1]).all()
    x, y, w, h = sc.boxes[0]
    assert out["boxes"][0].tolist() == [30 - x - w, y, w, h]
    assert (SegTransform(hflip=0.0)(item)["mask"] == sc.mask).all()
    with pytest.raises(ValueError, match="probability"):
        SegTransform(hflip=2)
    with pytest.raises(ValueError, match="crop_mode"):
        SegTransform(crop_mode="corner")


def test_collate_and_normalise():
    items = [_item(16, 16, seed=s)[0] for s in range(3)]
    batch = collate(items)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 16, 16, 3)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (3, 16, 16)
    assert batch["label"].tolist() == [it["label"] for it in items] and batch["bad"] == []
    x = to_tensor_batch(batch["image"].numpy(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=collate)
    assert [b["image"].shape[0] for b in loader] == [2, 1]
    with pytest.raises(ValueError, match="differ in size"):
        collate([items[0], _item(20, 30)[0]])
