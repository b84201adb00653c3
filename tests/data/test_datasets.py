"""Dataset loaders on tiny fixtures in the exact real on-disk layouts."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from dinokit.data.datasets import (
    ADE20K,
    CUB200,
    Cityscapes,
    CocoStuff,
    ImageFolder,
    MaskLabelError,
    VOCSegmentation,
    cub_split_ids,
    detect_layout,
    open_dataset,
)
from dinokit.data.layouts import voc_palette
from dinokit.data.transforms import collate

H, W = 12, 16


def _img(path, h=H, w=W, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        path, format=fmt)


def _png(path, arr, mode="L", palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), "P" if palette else mode)
    if palette:
        im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def _stripes(values, h=H, w=W):
    """A mask whose columns cycle through ``values``."""
    return np.asarray(values)[np.arange(w) % len(values)][None].repeat(h, 0)


# ----------------------------------------------------------------------------------------------- VOC


@pytest.fixture
def voc_root(tmp_path):
    v = tmp_path / "VOCdevkit" / "VOC2012"
    ids = ["2007_000032", "2007_000039", "2008_000001", "2009_000002"]
    for k, i in enumerate(ids):
        _img(v / "JPEGImages" / f"{i}.jpg")
        m = _stripes([0, 15, k + 1])
        m[0] = 255  # void border
        _png(v / "SegmentationClass" / f"{i}.png", m, palette=True)
        _png(v / "SegmentationClassAug" / f"{i}.png", _stripes([0, 15, k + 1]))
    _png(v / "SegmentationClassAug" / "2010_000005.png", _stripes([0, 7]))  # an SBD-only image
    _img(v / "JPEGImages" / "2010_000005.jpg")
    (v / "ImageSets" / "Segmentation").mkdir(parents=True)
    (v / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (v / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000001\n2009_000002\n")
    (v / "Annotations").mkdir()
    (v / "Annotations" / "2007_000032.xml").write_text(
        "<annotation><object><name>person</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax><ymax>12</ymax>"
        "</bndbox></object><object><name>aeroplane</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>16</xmax>"
        "<ymax>12</ymax></bndbox></object></annotation>")
    return tmp_path


def test_voc_train_val_labels_boxes(voc_root):
    for root in (voc_root, voc_root / "VOCdevkit", voc_root / "VOCdevkit" / "VOC2012"):
        ds = VOCSegmentation(root, "train")
        assert ds.ids == ["2007_000032", "2007_000039"] and ds.num_classes == 21 and ds.ignore_index == 255
    item = ds[0]
    assert item["image"].mode == "RGB" and item["image"].size == (W, H)
    m = item["mask"]
    assert m.dtype == np.int64 and m.shape == (H, W)
    assert (m[0] == 255).all() and set(np.unique(m[1:])) == {0, 1, 15}
    assert item["boxes"].tolist() == [[1, 2, 9, 10], [0, 0, 16, 12]]
    assert item["box_labels"].tolist() == [15, 1]
    assert "boxes" not in ds[1]
    assert ds.class_names[15] == "person"
    val = VOCSegmentation(voc_root, "val")
    assert set(np.unique(val[1]["mask"][1:])) == {0, 4, 15}


def test_voc_trainaug(voc_root):
    ds = VOCSegmentation(voc_root, "trainaug")  # no list file: SegmentationClassAug minus val
    assert ds.ids == ["2007_000032", "2007_000039", "2010_000005"]
    assert (ds[0]["mask"][0] != 255).all()  # read from SegmentationClassAug (grayscale)
    assert set(np.unique(ds[2]["mask"])) == {0, 7}
    (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt").write_text("2010_000005\n")
    assert VOCSegmentation(voc_root, "trainaug").ids == ["2010_000005"]


def test_voc_bad_inputs(voc_root):
    v = voc_root / "VOCdevkit" / "VOC2012"
    _png(v / "SegmentationClass" / "2007_000039.png", _stripes([0, 21, 40]), palette=True)
    ds = VOCSegmentation(voc_root, "train")
    with pytest.raises(MaskLabelError, match=r"2007_000039\.png.*\[21, 40\]"):
        ds[1]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(v / "SegmentationClass" / "2007_000032.png")
    with pytest.raises(ValueError, match="RGB.*class-index"):
        ds[0]
    (v / "ImageSets/Segmentation/empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.*empty\.txt"):
        VOCSegmentation(voc_root, "empty")
    with pytest.raises(FileNotFoundError, match=r"nosuch\.txt.*available splits"):
        VOCSegmentation(voc_root, "nosuch")
    (v / "ImageSets/Segmentation/missing.txt").write_text("2099_000001\n")
    with pytest.raises(FileNotFoundError, match="2099_000001"):
        VOCSegmentation(voc_root, "missing")
    _png(v / "SegmentationClass" / "2008_000001.png", np.zeros((H + 1, W)), palette=True)
    with pytest.raises(ValueError, match="same size"):
        VOCSegmentation(voc_root, "val")[0]


# ---------------------------------------------------------------------------------------------- COCO

STUFF15 = ["building", "ceiling", "floor", "food-stuff", "furniture-stuff", "ground", "plant", "raw-material", "sky",
           "solid", "structural", "textile", "wall", "water", "window"]
THINGS12 = ["accessory", "animal", "appliance", "electronic", "food", "furniture", "indoor", "kitchen", "outdoor",
            "person", "sports", "vehicle"]


def _stuff_categories():
    rng = random.Random(0)
    cats = [{"id": i, "name": f"stuff{i}", "supercategory": STUFF15[(i - 92) % 15]} for i in range(92, 183)]
    rng.shuffle(cats)  # the class order must not depend on the JSON order
    return cats + [{"id": 183, "name": "other", "supercategory": "other"}]


def test_coco_stuff15(tmp_path):
    ids = ["000000000139", "000000000285"]
    for i in ids:
        _img(tmp_path / "images" / "val2017" / f"{i}.jpg")
    ann = tmp_path / "annotations"
    _png(ann / "stuff_val2017_pixelmaps" / f"{ids[0]}.png", _stripes([0, 92, 106, 183, 182]))
    _png(ann / "stuff_val2017_pixelmaps" / f"{ids[1]}.png", _stripes([0, 50]))  # a thing id: invalid here
    (ann / "stuff_val2017.json").write_text(json.dumps({"categories": _stuff_categories()}))
    ds = CocoStuff(tmp_path, "val", "stuff15")
    assert ds.key == "coco-stuff15" and list(ds.class_names) == STUFF15 and ds.num_classes == 15
    m = ds[0]["mask"]
    sc = {c["id"]: c["supercategory"] for c in _stuff_categories()}
    exp = [255, STUFF15.index(sc[92]), STUFF15.index(sc[106]), 255, STUFF15.index(sc[182])]
    assert m[0, :5].tolist() == exp
    with pytest.raises(MaskLabelError, match=r"000000000285\.png.*\[50\]"):
        ds[1]
    assert detect_layout(tmp_path) == "coco-stuff15"


def _panoptic_fixture(tmp_path):
    """COCO panoptic layout: one image, three segments (two things, one stuff) and unlabelled pixels."""
    img_id = "000000000632"
    _img(tmp_path / "val2017" / f"{img_id}.jpg")
    cats = [{"id": k + 1, "name": f"t{k}", "supercategory": THINGS12[::-1][k % 12], "isthing": 1} for k in range(24)]
    cats += [{"id": 200, "name": "wall-merged", "supercategory": "wall", "isthing": 0}]
    segs = [{"id": 5, "category_id": 3}, {"id": 5 + 256 * 3, "category_id": 200}, {"id": 70000, "category_id": 14}]
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "panoptic_val2017.json").write_text(json.dumps(
        {"categories": cats, "annotations": [{"file_name": f"{img_id}.png", "image_id": 632, "segments_info": segs}]}))
    seg_ids = _stripes([0, 5, 5 + 256 * 3, 70000])
    rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1).astype(np.uint8)
    (ann / "panoptic_val2017").mkdir()
    Image.fromarray(rgb, "RGB").save(ann / "panoptic_val2017" / f"{img_id}.png")
    return img_id, cats, rgb, ann


def test_coco_things12_panoptic(tmp_path):
    img_id, cats, rgb, ann = _panoptic_fixture(tmp_path)
    ds = open_dataset(tmp_path, "val")
    assert isinstance(ds, CocoStuff) and ds.key == "coco-things12"
    assert list(ds.class_names) == THINGS12
    sup = {c["id"]: c["supercategory"] for c in cats}
    assert ds[0]["mask"][0, :4].tolist() == [255, THINGS12.index(sup[3]), 255, THINGS12.index(sup[14])]
    rgb[0, 0] = (9, 0, 0)  # a segment id not in segments_info
    Image.fromarray(rgb, "RGB").save(ann / "panoptic_val2017" / f"{img_id}.png")
    with pytest.raises(MaskLabelError, match=r"\[9\]"):
        ds[0]


def test_coco_stuffthingmaps_things12(tmp_path):
    img_id = "000000000001"
    _img(tmp_path / "images" / "train2017" / f"{img_id}.jpg")
    cats = [{"id": k + 1, "name": f"t{k}", "supercategory": THINGS12[k % 12]} for k in range(12)]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps({"categories": cats}))
    # stuffthingmaps store category id - 1, 255 unlabelled
    _png(tmp_path / "stuffthingmaps_trainval2017" / "train2017" / f"{img_id}.png", _stripes([0, 11, 120, 255]))
    ds = CocoStuff(tmp_path, "train", "things12")
    assert ds[0]["mask"][0, :4].tolist() == [0, 11, 255, 255]


# -------------------------------------------------------------------------------------------- ADE20K


def test_ade20k(tmp_path):
    a = tmp_path / "ADEChallengeData2016"
    for i in ("ADE_val_00000001", "ADE_val_00000002"):
        _img(a / "images" / "validation" / f"{i}.jpg")
    _png(a / "annotations" / "validation" / "ADE_val_00000001.png", _stripes([0, 1, 150, 13]))
    _png(a / "annotations" / "validation" / "ADE_val_00000002.png", _stripes([0, 151]))
    (a / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(
        f"{k}\t0.1\t1\t1\tname{k};alias\n" for k in range(1, 151)))
    ds = ADE20K(tmp_path, "val")
    assert ds.num_classes == 151 and ds.ignore_index == 0 and ds.class_names[:2] == ("other", "name1")
    assert ds[0]["mask"][0, :4].tolist() == [0, 1, 150, 13]
    with pytest.raises(MaskLabelError, match=r"ADE_val_00000002\.png.*\[151\]"):
        ds[1]
    full = ADE20K(a, "validation", reduce_zero_label=True)
    assert full.num_classes == 150 and full.ignore_index == 255 and full.class_names[0] == "name1"
    assert full[0]["mask"][0, :4].tolist() == [255, 0, 149, 12]
    assert detect_layout(tmp_path) == "ade20k"
    with pytest.raises(ValueError, match="split"):
        ADE20K(tmp_path, "test")


# ---------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_train_ids(tmp_path):
    stem = "frankfurt_000000_000294"
    _img(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", fmt="PNG")
    label_ids = [0, 7, 8, 26, 33, 1, 6, 9, 30, 31, 255]
    _png(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", _stripes(label_ids))
    ds = open_dataset(tmp_path, "val")
    assert isinstance(ds, Cityscapes) and ds.num_classes == 19 and ds.ids == [f"frankfurt/{stem}"]
    assert ds[0]["mask"][0, :11].tolist() == [255, 0, 1, 13, 18, 255, 255, 255, 255, 16, 255]
    _png(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", _stripes([7, 40]))
    with pytest.raises(MaskLabelError, match=r"labelIds\.png.*\[40\]"):
        ds[0]


# ----------------------------------------------------------------------------------------------- CUB


@pytest.fixture
def cub_root(tmp_path):
    c = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows = [(1, 0, 1), (2, 0, 0), (3, 0, 1), (4, 1, 0), (5, 1, 1), (6, 1, 0)]
    for i, cls, _ in rows:
        _img(c / "images" / classes[cls] / f"img_{i:04d}.jpg")
    (c / "images.txt").write_text("".join(f"{i} {classes[k]}/img_{i:04d}.jpg\n" for i, k, _ in rows))
    (c / "image_class_labels.txt").write_text("".join(f"{i} {k + 1}\n" for i, k, _ in rows))
    (c / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in rows))
    (c / "bounding_boxes.txt").write_text("".join(f"{i} {i}.0 2.7 10.0 {i + 3}.9\n" for i, _, _ in rows))
    (c / "classes.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(classes)))
    return tmp_path


def test_cub_loader(cub_root):
    tr = open_dataset(cub_root, "train")
    assert isinstance(tr, CUB200) and tr.cub_ids == [1, 3, 5] and tr.num_classes == 2
    item = tr[2]
    assert item["id"] == "002.Laysan_Albatross/img_0005.jpg" and item["label"] == 1
    assert item["boxes"].tolist() == [[5, 2, 10, 8]]  # int(float(v)) as the reference
    assert item["mask"] is None
    te = CUB200(cub_root / "CUB_200_2011", "test")
    assert te.cub_ids == [2, 4, 6]
    batch = collate([tr[0], tr[1]])
    assert batch["label"].tolist() == [0, 0] and batch["mask"] is None and len(batch["boxes"]) == 2


def test_cub_split_modes_real_sizes():
    rng = np.random.default_rng(0)
    ids = list(range(1, 11789))
    is_train = np.zeros(11788, bool)
    is_train[rng.choice(11788, 5994, replace=False)] = True
    off_tr, off_te = (cub_split_ids(ids, is_train, s, "official") for s in ("train", "test"))
    assert (len(off_tr), len(off_te)) == (5994, 5794)
    d_tr, d_va = (cub_split_ids(ids, is_train, s, "dinov2_consistent") for s in ("train", "val"))
    assert (len(d_tr), len(d_va)) == (8251, 3537)
    assert set(d_tr) >= set(off_tr) and not set(d_tr) & set(d_va) and set(d_va) <= set(off_te)
    assert set(d_tr) - set(off_tr) == set(sorted(off_te)[:2257])
    r_tr = cub_split_ids(ids, is_train, "train", "random70")
    assert len(r_tr) == 8251 and r_tr[:5] == [760, 3770, 8305, 7581, 10750]
    assert len(cub_split_ids(ids, is_train, "val", "random70")) == 11788 - 8251
    with pytest.raises(ValueError, match="split_mode"):
        cub_split_ids(ids, is_train, "train", "nope")


def test_cub_bad_inputs(cub_root):
    c = cub_root / "CUB_200_2011"
    (c / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, 7)))
    with pytest.raises(ValueError, match=r"empty.*train_test_split\.txt"):
        CUB200(cub_root, "test")
    (c / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        CUB200(cub_root, "train")


# --------------------------------------------------------------------------------------- ImageFolder


def test_image_folder_collects_bad_files(tmp_path):
    _img(tmp_path / "b" / "ok.jpg")
    _img(tmp_path / "a.png", fmt="PNG")
    (tmp_path / "c_empty.jpg").write_bytes(b"")
    (tmp_path / "d_text.png").write_text("nope")
    Image.new("RGB", (3, 3)).save(tmp_path / "e_tiny.png")
    (tmp_path / "readme.txt").write_text("not listed")
    ds = ImageFolder(tmp_path, min_size=8)
    assert ds.ids == ["a.png", "b/ok.jpg", "c_empty.jpg", "d_text.png", "e_tiny.png"]
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["image"].size == (W, H) and items[2]["image"] is None and "0-byte" in items[2]["error"]
    batch = collate(items)
    assert batch["id"] == ["a.png", "b/ok.jpg"] and batch["image"].shape == (2, H, W, 3)
    assert [b[0] for b in batch["bad"]] == ["c_empty.jpg", "d_text.png", "e_tiny.png"]
    assert "smaller than" in dict(batch["bad"])["e_tiny.png"]
    assert [b[0] for b in ds.scan()] == ["c_empty.jpg", "d_text.png", "e_tiny.png"]
    strict = ImageFolder(tmp_path, on_bad="raise")
    with pytest.raises(ValueError, match="c_empty.jpg"):
        strict[2]
    assert isinstance(open_dataset(tmp_path / "b", None), ImageFolder)
    assert isinstance(open_dataset(f"folder:{tmp_path / 'b'}"), ImageFolder)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty_dir" if (tmp_path / "empty_dir").mkdir() is None else tmp_path)


def test_open_dataset_keys_and_transform(voc_root):
    ds = open_dataset(f"voc:{voc_root}", "val", transform=lambda it: {**it, "seen": True})
    assert isinstance(ds, VOCSegmentation) and ds[0]["seen"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(voc_root / "nowhere", "val")


def test_prepare_coco_things12(tmp_path):
    from dinokit.data.datasets import prepare_coco_things12

    _panoptic_fixture(tmp_path)
    direct = CocoStuff(tmp_path, "val", "things12")
    expected = direct[0]["mask"]
    out = prepare_coco_things12(tmp_path, "val")
    assert out == tmp_path / "annotations" / "things12_val2017" and (out / "class_names.txt").is_file()
    prepared = CocoStuff(tmp_path, "val", "things12")
    assert prepared.mask_dir == out and prepared.class_names == direct.class_names
    assert (prepared[0]["mask"] == expected).all()
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_coco_things12(tmp_path, "val")
    assert prepare_coco_things12(tmp_path, "val", overwrite=True) == out
    from dinokit.commands.data import prepare

    assert prepare("coco-things12", tmp_path, "val", overwrite=True) == 0
    with pytest.raises(ValueError, match="only coco-things12"):
        prepare("voc", tmp_path)


def test_synthetic_dataset_matches_scenes():
    from dinokit.data import synthetic
    from dinokit.data.datasets import SyntheticDataset

    for fine in (False, True):
        ds = SyntheticDataset(4, (24, 32), seed=3, fine_grained=fine, start=2)
        assert len(ds) == 4 and ds.num_classes == synthetic.num_seg_classes(fine)
        for k in range(4):
            sc, item = synthetic.render_scene(3, 2 + k, (24, 32), fine), ds[k]
            assert item["id"] == sc.image_id == ds.ids[k]
            assert (np.asarray(item["image"]) == sc.image).all() and (item["mask"] == sc.mask).all()
            assert item["label"] == sc.label and np.array_equal(item["boxes"], sc.boxes)
            for box, lab in zip(item["boxes"].astype(int), item["box_labels"]):
                x, y, w, h = box
                assert (item["mask"][y:y + h, x:x + w] == lab).any()
    assert collate([ds[0], ds[1]])["mask"].shape == (2, 24, 32)


def test_open_dataset_synthetic_names():
    tr, va = open_dataset("synthetic", "train", n=3, size=(24, 24), seed=1), open_dataset("synthetic", "val", n=3,
                                                                                          size=(24, 24), seed=1)
    assert tr.ids == ["syn_1_000000", "syn_1_000001", "syn_1_000002"] and va.ids[0] == "syn_1_000003"
    fine = open_dataset("synthetic-fine", "val", n=2, size=(24, 24))
    assert fine.num_classes == 3 and fine[0]["id"].startswith("fine_0_")
