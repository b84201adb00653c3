"""`dinokit eval ...` end to end on a tiny synthetic VOC layout with the random demo ViT."""

import json

import pytest

from dinokit.cli import main
from dinokit.data.layouts import write_voc_layout


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "voc"
    write_voc_layout(root, n_train=8, n_val=4, size=(32, 32), seed=0)
    return root


def _common(voc, out):
    return ["--data", str(voc), "--backbone", "demo_vit", "--weights", "random", "--size", "32", "--out", str(out)]


def test_overcluster_linear_hummingbird_commands(voc, tmp_path):
    c = _common(voc, tmp_path)
    assert main(["eval", "overcluster", *c, "--ks", "[7, 14]", "--seeds", "[0]", "--nredo", "1"]) == 0
    r = json.loads((tmp_path / "overcluster.json").read_text())
    assert 0 <= r["voc/overcluster/fast100/in32/k7/miou"] <= 1 and "voc/overcluster/fast100/in32/k14/bg_frac" in r
    assert r["meta/backbone"] == "demo_vit" and r["meta/kmeans_backend"] == "faiss" and "versions" in r["meta"]
    assert (tmp_path / "figures" / "overcluster_maps.png").stat().st_size > 1000
    assert main(["eval", "linear", *c, "--lrs", "[0.1, 1.0]", "--epochs", "2", "--batch_size", "4"]) == 0
    r = json.loads((tmp_path / "linear.json").read_text())
    assert {"voc/linear/fast100/in32/lr0.1/miou", "voc/linear/fast100/in32/miou"} <= set(r)
    assert main(["eval", "hummingbird", *c, "--memory_size", "200", "--epochs", "2", "--k", "5"]) == 0
    r = json.loads((tmp_path / "hummingbird.json").read_text())
    assert r["voc/hummingbird/hb2/in32/mem200/ep2/knn5/exact/mem_rows"] == 8 * 2 * 12  # q = 200 // 16 = 12
    assert (tmp_path / "figures" / "hummingbird_predictions.png").exists()


def test_position_entropy_boxes_commands(voc, tmp_path):
    c = _common(voc, tmp_path)
    assert main(["eval", "position", *c, "--epochs", "1", "--batch_size", "4"]) == 0
    r = json.loads((tmp_path / "position.json").read_text())
    assert r["voc/position/sigmoid/in32/flip/chance"] == pytest.approx(5 / 36)  # 4x4 grid: (n+1)/(12(n-1))
    assert main(["eval", "entropy", *c, "--k", "8", "--seeds", "[0]", "--nredo", "1"]) == 0
    r = json.loads((tmp_path / "entropy.json").read_text())
    assert 0 <= r["voc/spatial_entropy/se1/in32/k8/se"] <= 1
    from dinokit.data.datasets import open_dataset

    ds = open_dataset(voc, "val")
    gt = {str(it["id"]): [float(v) for v in it["boxes"][0]] for it in (ds[i] for i in range(len(ds)))}
    (tmp_path / "preds.json").write_text(json.dumps(gt))
    assert main(["eval", "boxes", "--preds", str(tmp_path / "preds.json"), "--data", str(voc), "--out",
                 str(tmp_path), "--method", "gt"]) == 0
    r = json.loads((tmp_path / "boxes.json").read_text())
    assert r["voc/boxes/native/gt/corloc"] == 1.0 and r["voc/boxes/native/gt/maiou"] == 1.0


def test_feature_shards_are_read_and_checked(voc, tmp_path):
    feats = tmp_path / "feats"
    assert main(["features", "--data", str(voc), "--split", "val", "--out", str(feats), "--backbone", "demo_vit",
                 "--weights", "random", "--size", "32"]) == 0
    c = _common(voc, tmp_path)
    assert main(["eval", "entropy", *c, "--k", "8", "--seeds", "[0]", "--features", str(feats)]) == 0
    with pytest.raises(ValueError, match="not 'tiny_dino'"):
        main(["eval", "entropy", *c, "--k", "8", "--features", str(feats), "--backbone", "tiny_dino"])
    bad = ["--size" if a == "--size" else ("64" if prev == "--size" else a) for prev, a in zip([""] + c, c)]
    with pytest.raises(ValueError, match="grid"):
        main(["eval", "entropy", *bad, "--k", "8", "--features", str(feats)])


def test_empty_split_and_k_too_large(voc, tmp_path):
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        main(["eval", "overcluster", *_common(voc, tmp_path), "--ks", "[1000]", "--seeds", "[0]"])
    empty = voc / "ImageSets" / "Segmentation" / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        main(["eval", "overcluster", *_common(voc, tmp_path), "--split", "empty"])
