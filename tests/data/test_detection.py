"""Detection loaders: VOC XML with difficult / truncated flags (hard=drop differs from keep), COCO20k JSON (crowd
removed, list selection, integer rounding), and the synthetic writers."""

import json

import numpy as np
import pytest

from dinokit.data.detection import (
    COCO20k,
    VOCDetection,
    coco_image_id,
    coco_xyxy_int,
    open_detection,
    parse_voc_objects,
    write_coco_layout,
    write_voc_detection_layout,
)
from dinokit.data.synthetic import render_scene
from dinokit.eval.boxes import corloc, xywh_to_xyxy

XML = """<annotation><size><width>50</width><height>40</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><truncated>0</truncated>
  <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult><truncated>0</truncated>
  <bndbox><xmin>11</xmin><ymin>6</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object>
<object><name>cat</name><truncated>1</truncated>
  <bndbox><xmin>21</xmin><ymin>21</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


def _voc(tmp_path, xmls: dict[str, str]):
    from PIL import Image

    root = tmp_path / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for i, x in xmls.items():
        (root / "Annotations" / f"{i}.xml").write_text(x)
        Image.new("RGB", (50, 40)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in xmls))
    return tmp_path


def test_parse_voc_objects_flags_and_corners(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML)
    o = parse_voc_objects(p)
    assert o["names"] == ["dog", "cat", "cat"] and o["size"] == (40, 50)
    # 1-based inclusive corners: xmin 1, xmax 50 spans [0, 50]
    assert xywh_to_xyxy(o["boxes"]).tolist() == [[0, 0, 50, 40], [10, 5, 20, 15], [20, 20, 30, 30]]
    assert o["difficult"].tolist() == [False, True, False] and o["truncated"].tolist() == [False, False, True]


def test_voc_detection_hard_drop_differs_from_keep(tmp_path):
    only_hard = XML.replace("<name>dog</name><difficult>0</difficult>", "<name>dog</name><difficult>1</difficult>")
    ds = VOCDetection(_voc(tmp_path, {"000001": XML, "000002": only_hard}), "trainval")
    assert ds.key == "voc07" and len(ds) == 2
    items = [ds[i] for i in range(2)]
    assert items[0]["box_hard"].tolist() == [False, True, True] and items[1]["box_hard"].tolist() == [True] * 3
    assert items[0]["box_labels"].tolist() == [12, 8, 8]  # VOC class ids (dog 12, cat 8)
    # a prediction equal to the cat box: a hit only while the hard boxes are kept
    pred = [np.array([10.0, 5, 20, 15])] * 2
    gts = [xywh_to_xyxy(it["boxes"]) for it in items]
    hard = [it["box_hard"] for it in items]
    keep = corloc(pred, gts, hard=hard, hard_mode="keep")
    drop = corloc(pred, gts, hard=hard, hard_mode="drop")
    assert (keep["n_images"], keep["n_hits"]) == (2, 2)
    assert (drop["n_images"], drop["n_hits"]) == (1, 0)  # image 2 has no non-hard box left and is skipped


def test_voc_detection_errors(tmp_path):
    root = _voc(tmp_path, {"000001": XML.replace("dog", "unicorn")})
    with pytest.raises(ValueError, match="unicorn"):
        VOCDetection(root)
    with pytest.raises(FileNotFoundError, match="available splits"):
        VOCDetection(root, "test")


def test_synthetic_voc_detection_layout(tmp_path):
    info = write_voc_detection_layout(tmp_path / "VOC2012", 6, (48, 48), seed=3, difficult_area=0.05)
    ds = open_detection(tmp_path / "VOC2012", "trainval")
    assert isinstance(ds, VOCDetection) and ds.key == "voc12" and len(ds) == 6
    n_hard = 0
    for i in range(6):
        it, sc = ds[i], render_scene(3, i, (48, 48))
        np.testing.assert_array_equal(it["boxes"], sc.boxes)  # exact round trip through the XML corners
        x, y, w, h = sc.boxes.T
        assert it["box_truncated"].tolist() == ((x == 0) | (y == 0) | (x + w == 48) | (y + h == 48)).tolist()
        assert it["box_difficult"].tolist() == (w * h < 0.05 * 48 * 48).tolist()
        n_hard += int(it["box_hard"].sum())
    assert info["boxes"] == sum(len(ds[i]["boxes"]) for i in range(6)) and n_hard > 0
    assert len(VOCDetection(tmp_path / "VOC2012", "train")) == 3


def test_coco20k_crowd_removed_list_selected_and_rounded(tmp_path):
    root = tmp_path / "coco"
    info = write_coco_layout(root, 5, (48, 48), seed=1, crowd_every=2)
    ds = open_detection(root)
    assert isinstance(ds, COCO20k) and ds.key == "coco20k"
    assert len(ds) == 4 and ds.ids == [f"COCO_train2014_{i:012d}" for i in range(1, 5)]  # the list omits image 5
    assert ds.n_crowd == 2  # images 1 and 3 of the listed four carry a crowd box
    for i in range(4):
        it, sc = ds[i], render_scene(1, i, (48, 48))
        np.testing.assert_array_equal(it["boxes"], sc.boxes)  # crowd gone; x + 0.4 rounds back to x
        assert not it["box_hard"].any()
    assert len(COCO20k(root, file_list="all")) == 5 and info["crowd"] == 3
    assert coco_image_id("train2014/COCO_train2014_000000000009.jpg") == 9
    assert coco_xyxy_int([0.5, 1.5, 2.0, 2.0]) == [0, 2, 2, 4]  # round half to even, after x + w


def test_coco20k_missing_list_and_unknown_ids(tmp_path):
    root = tmp_path / "coco"
    write_coco_layout(root, 2, (32, 32))
    (root / "coco_20k_filenames.txt").unlink()
    with pytest.raises(FileNotFoundError, match="coco_20k_filenames"):
        COCO20k(root)
    (root / "list.txt").write_text("COCO_train2014_000000000099.jpg\n")
    with pytest.raises(ValueError, match="absent"):
        COCO20k(root, file_list=root / "list.txt")
    ann = json.loads((root / "annotations" / "instances_train2014.json").read_text())
    assert {a["iscrowd"] for a in ann["annotations"]} == {0, 1}
