"""Synthetic VOC-/CUB-style layouts: deterministic bytes, atomic writes, read back by the real loaders."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from dinokit.data import layouts, synthetic
from dinokit.data.datasets import CUB200, VOCSegmentation, open_dataset


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("writer", [layouts.write_voc_layout, layouts.write_cub_layout])
def test_same_seed_byte_identical_other_seed_different(tmp_path, writer):
    writer(tmp_path / "a", 4, 3, (32, 32), seed=5)
    writer(tmp_path / "b", 4, 3, (32, 32), seed=5)
    writer(tmp_path / "c", 4, 3, (32, 32), seed=6)
    ha, hb, hc = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert ha == hb and len(ha) > 7
    images = [k for k in ha if k.endswith(".jpg")]
    assert len(images) == 7
    img_a = {v for k, v in ha.items() if k.endswith(".jpg")}
    img_c = {v for k, v in hc.items() if k.endswith(".jpg")}
    assert len(img_a) == 7 and not img_a & img_c  # another seed gives other images


def test_voc_layout_reads_back_exactly(tmp_path):
    root = tmp_path / "voc"
    summary = layouts.write_voc_layout(root, 5, 3, (40, 48), seed=2, image_format="png")
    assert summary["num_classes"] == 7
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [
        synthetic.render_scene(2, i, (40, 48)).image_id for i in range(5)]
    assert Image.open(root / "SegmentationClass" / f"{synthetic.render_scene(2, 0, (40, 48)).image_id}.png").mode == "P"
    for split, offset in (("train", 0), ("val", 5)):
        ds = VOCSegmentation(root, split)
        assert ds.class_names == layouts.class_names(False) and ds.num_classes == 7
        for k, item in enumerate(ds):
            sc = synthetic.render_scene(2, offset + k, (40, 48))
            assert item["id"] == sc.image_id
            assert (np.asarray(item["image"]) == sc.image).all()  # PNG: exact pixels
            assert item["mask"].dtype == np.int64 and (item["mask"] == sc.mask).all()
            assert np.array_equal(item["boxes"], sc.boxes)
            assert (item["box_labels"] == sc.instance_labels + 1).all()
    assert len(VOCSegmentation(root, "trainaug")) == 5
    obj = np.asarray(Image.open(root / "SegmentationObject" / f"{sc.image_id}.png"))
    assert obj.max() == len(sc.boxes)


def test_voc_layout_jpeg_default(tmp_path):
    layouts.write_voc_layout(tmp_path / "v", 2, 1, (32, 32), seed=0)
    ds = open_dataset(tmp_path / "v", "val")
    assert isinstance(ds, VOCSegmentation)
    sc = synthetic.render_scene(0, 2, (32, 32))
    item = ds[0]
    assert (item["mask"] == sc.mask).all()  # masks stay exact
    assert np.abs(np.asarray(item["image"]).astype(int) - sc.image).mean() < 6  # JPEG q95 4:4:4


def test_cub_layout_reads_back(tmp_path):
    root = tmp_path / "cub"
    summary = layouts.write_cub_layout(root, 12, 8, (40, 40), seed=3)
    assert summary["num_classes"] == len(synthetic.MARK_CLASSES) and sum(summary["images_per_class"]) == 20
    scenes = {synthetic.render_scene(3, i, (40, 40), True).image_id: (i, synthetic.render_scene(3, i, (40, 40), True))
              for i in range(20)}
    tr, te = CUB200(root, "train"), CUB200(root, "test")
    assert len(tr) == 12 and len(te) == 8 and not set(tr.ids) & set(te.ids)
    labels_in_file_order = [int(ln.split()[1]) for ln in (root / "image_class_labels.txt").read_text().splitlines()]
    assert labels_in_file_order == sorted(labels_in_file_order)  # images.txt ordered by class, as CUB
    for ds, is_train in ((tr, True), (te, False)):
        for item in ds:
            i, sc = scenes[item["id"].split("/")[1].rsplit(".", 1)[0]]
            assert (i < 12) == is_train
            assert item["label"] == sc.label and item["mask"] is None
            assert item["boxes"].tolist() == [sc.boxes[0].tolist()]
            assert item["id"].startswith(f"{sc.label + 1:03d}.{synthetic.MARK_CLASSES[sc.label]}/")
    d_tr, d_va = CUB200(root, "train", "dinov2"), CUB200(root, "val", "dinov2")
    assert len(d_tr) + len(d_va) == 20 and set(tr.ids) <= set(d_tr.ids)
    assert len(d_tr) == 12 + round(2257 * 8 / 5794)


def test_atomic_write_and_overwrite(tmp_path, monkeypatch):
    root = tmp_path / "voc"
    layouts.write_voc_layout(root, 2, 1, (24, 24), seed=0)
    before = _hashes(root)
    with pytest.raises(FileExistsError, match="overwrite"):
        layouts.write_voc_layout(root, 2, 1, (24, 24), seed=1)

    calls = {"n": 0}
    real = synthetic.render_scene

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    with pytest.raises(RuntimeError, match="boom"):
        layouts.write_voc_layout(root, 2, 1, (24, 24), seed=1, overwrite=True)
    assert _hashes(root) == before  # the old layout is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]  # no temp folder left behind
    monkeypatch.setattr(synthetic, "render_scene", real)
    layouts.write_voc_layout(root, 2, 1, (24, 24), seed=1, overwrite=True)
    assert _hashes(root) != before
    with pytest.raises(ValueError, match="at least one"):
        layouts.write_cub_layout(tmp_path / "x", 0, 1)


def test_voc_palette():
    pal = layouts.voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_synth_command_and_config(tmp_path, capsys):
    from dinokit.cli import components, main
    from dinokit.commands.data import synth

    assert components()["synth"] is synth

    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--n-train", "3", "--n-val", "2", "--size", "32", "--seed", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["layout"] for s in summary["layouts"]] == ["voc", "cub"]
    assert len(VOCSegmentation(out / "voc", "val")) == 2 and len(CUB200(out / "cub", "train")) == 3
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 't'}\nn_train: 2\nn_val: 2\nsize: 32\nseed: 4\nlayouts: cub\n")
    assert main(["synth", "--config", str(cfg), "--n_train", "3"]) == 0
    assert not (tmp_path / "t" / "voc").exists()
    assert _hashes(tmp_path / "t" / "cub") == _hashes(out / "cub")  # same seed and counts -> same bytes
    with pytest.raises(ValueError, match="unknown layout"):
        main(["synth", "--out", str(tmp_path / "u"), "--layouts", "coco"])
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "--n_train" in capsys.readouterr().out


def test_dataloader_workers_match_single_process(tmp_path):
    import torch

    from dinokit.data.transforms import SegTransform, collate

    layouts.write_voc_layout(tmp_path / "v", 6, 2, (32, 40), seed=1)
    ds = VOCSegmentation(tmp_path / "v", "train", transform=SegTransform(resize=24, crop=24))

    def batches(workers):
        dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
        return [(b["id"], b["image"], b["mask"]) for b in dl]

    single, multi = batches(0), batches(2)
    assert len(single) == 2
    for (i0, x0, m0), (i1, x1, m1) in zip(single, multi):
        assert i0 == i1 and torch.equal(x0, x1) and torch.equal(m0, m1)
        assert x0.shape == (4, 24, 24, 3) or x0.shape == (2, 24, 24, 3)
