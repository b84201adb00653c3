"""`dinokit discover`, `dinokit eval knn` and `dinokit eval unsup-seg` end to end on tiny synthetic layouts."""

import json

import numpy as np
import pytest

from dinokit.cli import main
from dinokit.data.detection import write_voc_detection_layout


@pytest.fixture(scope="module")
def voc07(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "VOC2007"
    write_voc_detection_layout(root, 6, (48, 64), seed=0, difficult_area=0.05)
    return root


def _bb():
    return ["--backbone", "tiny_dino", "--weights", "random"]


def test_discover_writes_boxes_and_corloc(voc07, tmp_path):
    from dinokit.data.crops import read_box_json
    from dinokit.data.detection import VOCDetection
    from dinokit.eval.boxes import corloc, xywh_to_xyxy

    ds = VOCDetection(voc07)
    for method in ("lost", "tokencut"):
        for hard in ("keep", "drop"):
            assert main(["discover", "--data", str(voc07), "--method", method, *_bb(), "--out", str(tmp_path),
                         "--hard", hard, "--k_patches", "5", "--batch_size", "4",
                         "--n_overlays", "3" if hard == "keep" else "0"]) == 0
            boxes = read_box_json(tmp_path / f"boxes_{method}.json", ds.ids)
            r = json.loads((tmp_path / f"corloc_{method}.json").read_text())
            base = f"voc07-trainval/corloc/lost/{method}"
            items = [ds[i] for i in range(len(ds))]
            ref = corloc([xywh_to_xyxy(np.asarray(boxes[it["id"]])) for it in items],
                         [xywh_to_xyxy(it["boxes"]) for it in items], hard=[it["box_hard"] for it in items],
                         hard_mode=hard)
            assert r[f"{base}/corloc"] == ref["corloc"] and r[f"{base}/n_images"] == ref["n_images"]
            assert r["meta/backbone"] == "tiny_dino" and "versions" in r["meta"]
            # 64-px-wide images, 48 px high: grid 3x4 of 16-px patches, boxes on the patch grid inside the image
            for x, y, w, h in boxes.values():
                assert x % 16 == 0 and y % 16 == 0 and x + w <= 64 and y + h <= 48 and w > 0 and h > 0
        assert (tmp_path / "figures" / f"discover_{method}.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "boxes_lost.meta.json").read_text())
    assert meta["count"] == 6 and meta["protocol"] == "discover/lost"
    with pytest.raises(ValueError, match="rasa"):
        main(["discover", "--data", str(voc07), *_bb(), "--out", str(tmp_path), "--rasa", "x.safetensors"])
    with pytest.raises(ValueError, match="method"):
        main(["discover", "--data", str(voc07), *_bb(), "--out", str(tmp_path), "--method", "ncut"])


def test_discover_attention_on_synthetic(tmp_path):
    assert main(["discover", "--data", "synthetic", "--method", "attention", *_bb(), "--out", str(tmp_path),
                 "--synthetic_n", "4", "--image_size", "64"]) == 0
    r = json.loads((tmp_path / "corloc_attention.json").read_text())
    assert r["synthetic-trainval/corloc/lost/attention/n_images"] == 4


def test_eval_knn_on_synthetic_and_image_folder(tmp_path):
    assert main(["eval", "knn", "--data", "synthetic", *_bb(), "--out", str(tmp_path), "--size", "64",
                 "--synthetic_n", "12", "--image_size", "72", "--ks", "[1, 5]", "--feature", "cls+avgpool"]) == 0
    r = json.loads((tmp_path / "knn.json").read_text())
    keys = {f"synthetic/knn/cls+avgpool/in64/knn{k}/T0.07/{m}" for k in (1, 5) for m in ("top1", "top5")}
    assert keys <= set(r) and all(0 <= r[k] <= 1 for k in keys)
    assert r["meta"]["config"]["resize"] == 73  # round(64 * 256 / 224)
    # ImageFolder: a query identical to a train image is its own nearest neighbour -> k = 1 top-1 = 1
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (tmp_path / "folder" / split / c).mkdir(parents=True)
    for c in ("a", "b", "c"):
        for j in range(3):
            im = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            im.save(tmp_path / "folder" / "train" / c / f"{j}.png")
            if j == 0:
                im.save(tmp_path / "folder" / "val" / c / "q.png")
    assert main(["eval", "knn", "--data", str(tmp_path / "folder"), *_bb(), "--out", str(tmp_path / "f"),
                 "--size", "32", "--ks", "[1]"]) == 0
    r = json.loads((tmp_path / "f" / "knn.json").read_text())
    assert r["folder/knn/cls/in32/knn1/T0.07/top1"] == 1.0
    with pytest.raises(ValueError, match="exceeds"):
        main(["eval", "knn", "--data", str(tmp_path / "folder"), *_bb(), "--out", str(tmp_path), "--ks", "[20]"])


def test_eval_unsup_seg_on_synthetic(tmp_path):
    pytest.importorskip("infomap")
    pytest.importorskip("skimage")
    args = ["eval", "unsup-seg", "--data", "synthetic", "--backbone", "demo_vit", "--weights", "random",
            "--out", str(tmp_path), "--size", "64", "--synthetic_n", "8", "--k_fg", "16", "--cd_runs", "2",
            "--cbfe_seeds", "[0]", "--nredo", "1", "--niter", "10"]
    assert main([*args, "--k_community", "8", "--markov_time", "1.0", "--weight_threshold", "0.05"]) == 0
    r = json.loads((tmp_path / "unsup_seg.json").read_text())
    base = "synthetic/unsup_seg/cbfe-cd/in64/k8"
    assert {f"{base}/{m}" for m in ("cbfe_miou", "cd_miou", "cd_miou_std", "fg_jaccard")} <= set(r)
    assert r["meta/hp_source"] == "given" and r["meta/k_community"] == "8"
    assert r[f"{base}/cd_miou"] == pytest.approx(np.mean(r["meta"]["config"]["cd_miou_per_run"]))
    assert (tmp_path / "figures" / "unsup_seg_masks.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="all of"):
        main([*args, "--k_community", "8"])
    with pytest.raises(ValueError, match="fg_masks"):
        main([*args, "--fg_source", "masks"])
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="syn_0_000000"):
        main([*args, "--fg_source", "masks", "--fg_masks", str(tmp_path / "masks"), "--k_community", "8",
              "--markov_time", "1.0", "--weight_threshold", "0.05"])
