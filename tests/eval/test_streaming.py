"""The streaming feature path: batch-at-a-time consumers equal the whole-split evaluators; loaders, lazy shards."""

import numpy as np
import pytest
import torch

from dinokit.eval.metrics import SumReducer, rank_shard
from dinokit.eval.overcluster import OverclusterStream, overcluster

from ._synthetic import noisy_oracle, stripes


def test_rank_shard_partitions_the_indices():
    parts = [rank_shard(11, r, 3) for r in range(3)]
    assert parts[0] == [0, 3, 6, 9] and sorted(i for p in parts for i in p) == list(range(11))
    assert rank_shard(5) == list(range(5))  # no process group: everything
    with pytest.raises(ValueError, match="rank 3"):
        rank_shard(5, 3, 3)


def test_sum_reducer_sums_batches():
    r = SumReducer()
    for x in (torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])):
        r.add("s", x).add("n", torch.tensor(1))
    assert torch.equal(r.all_reduce()["s"], torch.tensor([1.5, 2.5], dtype=torch.float64)) and int(r["n"]) == 2


@pytest.mark.parametrize("protocol", ["fast100", "full"])
def test_stream_equals_whole_split(tmp_path, protocol):
    cells, masks = stripes(10, 6, 6, c=4, p=4, seed=1)
    feats = noisy_oracle(cells, 4, 0.6, d=16, seed=2)
    ref = overcluster(feats, masks if protocol == "fast100" else list(masks), 4, ks=[4, 9], seeds=[0, 1],
                      protocol=protocol, nredo=1, niter=20)
    acc = OverclusterStream(tmp_path, 4, protocol)
    order = [7, 8, 9, 0, 1, 2, 3, 4, 5, 6]  # batches arrive out of order and unevenly: rows are re-sorted by index
    for s, e in ((0, 3), (3, 4), (4, 10)):
        idx = order[s:e]
        acc.add(feats[idx], masks[idx], idx)
    got = acc.compute(ks=[4, 9], seeds=[0, 1], nredo=1, niter=20, n_maps=10)
    assert got.metrics.keys() == ref.metrics.keys()
    for k, v in ref.metrics.items():
        assert got.metrics[k] == pytest.approx(v, abs=1e-12), k
    np.testing.assert_array_equal(got.confusion[4], ref.confusion[4])


def test_stream_oracle_features_give_miou_one(tmp_path):
    cells, masks = stripes(6, 6, 6, c=4, p=4, seed=3)
    feats = noisy_oracle(cells, 4, 0.0, d=8)
    acc = OverclusterStream(tmp_path, 4, "fast100")
    acc.add(feats, masks.to(torch.uint8), range(6))  # 24 px masks, torch-nearest resized to 100 on arrival
    assert acc.compute(ks=[4], seeds=[0], nredo=1, niter=10).metrics["k4/miou"] == pytest.approx(1.0)


def test_seg_split_masks_and_loader(tmp_path):
    from dinokit.data.datasets import open_dataset
    from dinokit.data.layouts import write_voc_layout
    from dinokit.data.sources import SegSplit, open_split
    from dinokit.data.transforms import SegTransform
    from dinokit.eval._inputs import torch_nearest

    root = tmp_path / "voc"
    write_voc_layout(root, n_train=2, n_val=5, size=(40, 48), seed=0)
    ds = open_dataset(root, "val")
    sp = SegSplit(ds, 32, mask_size=100)
    item = sp[1]
    ref = torch.from_numpy(SegTransform(resize=(32, 32))(ds[1])["mask"])
    assert item["mask"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert torch.equal(item["mask"].long(), torch_nearest(ref, (100, 100)))
    t = SegSplit(ds, 32, mask_rule="torch")[1]["mask"].long()  # torch's nearest rule from the original mask
    assert torch.equal(t, torch_nearest(torch.from_numpy(np.asarray(ds[1]["mask"], np.int64)), (32, 32)))
    assert tuple(SegSplit(ds, 32, mask_size="full")[1]["mask"].shape) == (40, 48)
    loader = open_split(root, "val", 32, batch_size=2, indices=[4, 1, 3])
    got = [(b["index"].tolist(), b["id"]) for b in loader]
    assert [i for b in got for i in b[0]] == [4, 1, 3] and loader.dataset.ids == [ds.ids[i] for i in (4, 1, 3)]


def test_features_to_memmap_keeps_dataset_order(tmp_path):
    from dinokit.backbones.extract import features_to_memmap

    f = torch.arange(5 * 2 * 2 * 3, dtype=torch.float32).view(5, 2, 2, 3)
    m = torch.arange(5 * 4, dtype=torch.uint8).view(5, 2, 2)
    batches = [(f[[3, 4]], {"index": torch.tensor([3, 4]), "mask": m[[3, 4]]}),
               (f[[0, 1, 2]], {"index": torch.tensor([0, 1, 2]), "mask": m[[0, 1, 2]]})]
    feats, masks, rows = features_to_memmap(batches, tmp_path, 5, "x")
    assert isinstance(feats, np.memmap) and rows == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(feats, f.numpy())
    np.testing.assert_array_equal(masks, m.numpy())


def test_lazy_feature_dir_equals_full_load(tmp_path):
    from dinokit.backbones.shards import LazyFeatureDir, load_feature_dir, shard_name, write_shard

    g = torch.Generator().manual_seed(0)
    patch = torch.randn(5, 2, 2, 3, generator=g)
    meta = {"backbone": {"name": "demo_vit", "patch_size": 16}}
    for k, rows in enumerate(([0, 1, 2], [3, 4])):
        write_shard(tmp_path / shard_name(k), {"patch": patch[rows], "registers": torch.zeros(len(rows), 0, 3),
                                               "index": torch.tensor(rows), "grid": torch.tensor([2, 2])},
                    [f"im{i}" for i in rows], meta)
    lazy = LazyFeatureDir(tmp_path, expect_backbone="demo_vit")
    full = load_feature_dir(tmp_path)
    assert lazy.grid == full.grid == (2, 2) and lazy.missing(["im4", "nope"]) == ["nope"]
    torch.testing.assert_close(lazy.patch_of(["im4", "im0", "im2"]), full.patch[[4, 0, 2]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not 'other'"):
        LazyFeatureDir(tmp_path, expect_backbone="other")


def test_subset_token_grammar():
    from dinokit.commands.evaluation import subset_token

    assert subset_token(0.125, 42) == "sub1of8-s42" and subset_token(1 / 64, 400) == "sub1of64-s400"
    assert subset_token(0.1, 0) == "sub1of10-s0" and subset_token(0.3, 7) == "sub0.3-s7"
