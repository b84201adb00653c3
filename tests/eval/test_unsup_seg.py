"""CBFE + community detection: planted cluster maps recover the planted foreground and segmentation exactly (up to
the cut rule's 55-75 % limits); the co-occurrence weights follow their definition; the whole protocol runs on
synthetic scenes with a tiny random ViT, given hyper-parameters or a short Optuna search."""

import numpy as np
import pytest
import torch

pytest.importorskip("infomap")
pytest.importorskip("skimage")

from dinokit.eval.metrics import ConfusionMatrix, match_and_score  # noqa: E402
from dinokit.eval.unsup_seg import (  # noqa: E402
    UnsupSegConfig,
    UnsupSegEvaluator,
    cbfe_foreground,
    cbfe_threshold,
    cluster_counts,
    cluster_precision,
    cooccurrence,
    foreground_jaccard,
    graph_edges,
    infomap_partition,
    mass_mask,
    merge_confusion,
    noisy_foreground,
)


def planted_cbfe(n_bg: int, n_fg: int, n_img: int = 12, S: int = 20, seed: int = 0, flip_fg: float = 0.0):
    """Cluster maps: background cells drawn from clusters 0..n_bg-1, a 8x8 object block from n_bg..n_bg+n_fg-1;
    noisy masks = the object plus 10 % of the background pixels, minus ``flip_fg`` of the object pixels."""
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, n_bg, (n_img, S, S))
    gt = np.zeros((n_img, S, S), np.int64)
    for i in range(n_img):
        r, c = rng.integers(0, S - 8, 2)
        maps[i, r:r + 8, c:c + 8] = rng.integers(n_bg, n_bg + n_fg, (8, 8))
        gt[i, r:r + 8, c:c + 8] = 1 + i % 3
        gt[i, r, c] = 255 if i == 0 else gt[i, r, c]  # void counts as foreground (the reference's rule)
    u = rng.random(gt.shape)
    noisy = np.where(gt != 0, u >= flip_fg, u < 0.1)
    return torch.from_numpy(maps), torch.from_numpy(noisy), torch.from_numpy(gt)


def _cbfe(maps, noisy, gt, k):
    counts = cluster_counts(maps, k)
    prec, occ = cluster_precision(counts, cluster_counts(maps, k, noisy))
    gt_fg = gt != 0
    cut = cbfe_threshold(prec, counts, cluster_counts(maps, k, gt_fg), gt_fg.reshape(len(gt), -1).sum(1))
    return prec, occ, cut, cbfe_foreground(maps, prec, cut.threshold)


def test_cbfe_recovers_planted_foreground():
    maps, noisy, gt = planted_cbfe(n_bg=6, n_fg=4)  # 6 of 10 clusters background: inside the 55-75 % cuts
    prec, occ, cut, fg = _cbfe(maps, noisy, gt, 10)
    assert (prec[:6] < 0.25).all() and (prec[6:] > 0.75).all() and (occ == 12).all()
    assert sorted(cut.jaccards) == [5, 6] and cut.start == 6  # int(0.55 k) .. int(0.75 k) - 1
    assert cut.jaccards[6] == pytest.approx(1.0) and cut.jaccards[5] < 1.0
    lowest_fg = float(np.sort(prec)[6])
    assert cut.precision_at_cut == lowest_fg
    assert lowest_fg == 1.0 and cut.threshold == pytest.approx(0.95)  # nearest multiple of 0.05 below 1
    assert torch.equal(fg, gt != 0) and foreground_jaccard(gt != 0, fg) == 1.0


def test_cbfe_threshold_rounding_can_drop_the_cut_cluster():
    # the rule's other limit: the cut precision is rounded to the nearest 0.05, which may lie above it
    maps, noisy, gt = planted_cbfe(n_bg=6, n_fg=4, flip_fg=0.1)
    prec, _, cut, fg = _cbfe(maps, noisy, gt, 10)
    assert cut.start == 6 and cut.jaccards[6] == pytest.approx(1.0)
    assert cut.precision_at_cut == pytest.approx(0.8958, abs=1e-4) and cut.threshold == pytest.approx(0.9)
    dropped = int(np.argsort(prec, kind="stable")[6])
    assert torch.equal(fg, (gt != 0) & (maps != dropped)) and foreground_jaccard(gt != 0, fg) < 1.0


def test_cbfe_cut_range_limits_the_recovery():
    # 8 of 10 clusters are background but a cut may send at most int(0.75 k) - 1 = 6 to background:
    # the best allowed cut (6) keeps two background clusters as foreground
    maps, noisy, gt = planted_cbfe(n_bg=8, n_fg=2, seed=1)
    prec, _, cut, fg = _cbfe(maps, noisy, gt, 10)
    assert cut.start == 6 and cut.jaccards[6] > cut.jaccards[5]
    order = np.argsort(prec, kind="stable")
    assert set(order[6:].tolist()) >= {8, 9}
    # the threshold is applied by precision, so everything at or above the rounded cut precision is kept
    assert torch.equal(fg, torch.from_numpy(prec >= cut.threshold)[maps])
    assert foreground_jaccard(gt != 0, fg) < 1.0


def planted_parts(n_per_class: int = 6, S: int = 40, seed: int = 0):
    """3 object classes, each drawn as two adjacent parts (clusters 2c, 2c+1), one object per image; background id
    6 (= k). Returns (cluster maps (N, S, S), gt (N, S, S))."""
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for c in range(3):
        for _ in range(n_per_class):
            m = np.full((S, S), 6)
            g = np.zeros((S, S), np.int64)
            r, q = rng.integers(2, S - 14, 2)
            m[r:r + 12, q:q + 6], m[r:r + 12, q + 6:q + 12] = 2 * c, 2 * c + 1
            g[r:r + 12, q:q + 12] = c + 1
            maps.append(m)
            gts.append(g)
    return np.stack(maps), np.stack(gts)


def test_community_detection_recovers_planted_segmentation():
    maps, gt = planted_parts()
    adj = cooccurrence(maps, 7)
    pair = [min(adj[2 * c, 2 * c + 1], adj[2 * c + 1, 2 * c]) for c in range(3)]
    to_bg = [min(adj[i, 6], adj[6, i]) for i in range(6)]
    assert min(pair) > max(to_bg)  # the planted separation exists
    wt = 0.5 * (min(pair) + max(to_bg))
    edges = graph_edges(adj, wt)
    assert sorted((a, b) for a, b, _ in edges) == [(0, 1), (2, 3), (4, 5)]
    conf = ConfusionMatrix(4, 7).update(torch.from_numpy(gt), torch.from_numpy(maps)).numpy()
    for seed in (1, 2, 3):
        m = infomap_partition(edges, 7, markov_time=1.0, seed=seed, preferred_modules=3)
        assert m[6] == 0 and len({m[0], m[2], m[4]}) == 3  # background isolated (id 0), one module per class
        assert m[0] == m[1] and m[2] == m[3] and m[4] == m[5]
        merged = merge_confusion(conf, m)
        assert match_and_score(merged, matching="hungarian")["miou"] == 1.0
        # merging the confusion matrix equals remapping the pixels
        direct = ConfusionMatrix(4, merged.shape[1]).update(torch.from_numpy(gt), torch.from_numpy(m[maps])).numpy()
        assert np.array_equal(merged, direct)


def test_cooccurrence_normalisation():
    a = np.zeros((6, 6), np.int64)
    a[:, 3:] = 1
    b = np.zeros((6, 6), np.int64)
    b[:, 3:] = 2
    flat = np.zeros((6, 6), np.int64)  # one cluster only: no co-occurrence, not counted as an appearance
    adj = cooccurrence([a, b, flat], 3)
    np.testing.assert_allclose(adj, [[0, 0.5, 0.5], [1, 0, 0], [1, 0, 0]])
    assert graph_edges(adj, 0.5) == [(0, 1, 0.5), (0, 2, 0.5)]
    assert graph_edges(adj, 0.6) == []


def test_noisy_foreground_rule():
    from torchvision.transforms.functional import gaussian_blur

    attn = torch.full((1, 2, 10, 10), 0.001)
    attn[0, :, 3:7, 3:7] = 1.0  # the object holds most of the mass
    attn[0, 0, 0, 9] = 6.0  # an isolated peak in one head
    blurred = gaussian_blur(attn.mean(1, keepdim=True), [7, 7], [0.6, 0.6])[:, 0]
    assert bool(mass_mask(blurred, 0.65)[0, 0, 9])  # kept by the mass rule ...
    m = noisy_foreground(attn, mass=0.65)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[4:6, 3:7] = expected[3:7, 4:6] = True  # the blurred block's 12 strongest cells
    assert torch.equal(m[0], expected)  # ... but a 1-patch component is removed
    # the mass rule keeps the fewest largest cells whose mass reaches the fraction
    mm = mass_mask(torch.tensor([[[0.1, 0.4], [0.3, 0.2]]]), 0.65)
    assert mm.tolist() == [[[False, True], [True, False]]]  # 0.4 + 0.3 = 0.7 >= 0.65, 0.4 alone is not
    with pytest.raises(ValueError, match="too small"):
        noisy_foreground(torch.rand(1, 2, 3, 3))


def _evaluator(n: int = 8, **cfg) -> UnsupSegEvaluator:
    from dinokit.backbones import load_backbone
    from dinokit.data.datasets import open_dataset
    from dinokit.data.transforms import to_tensor_batch

    torch.manual_seed(0)
    bb = load_backbone("demo_vit", weights="random").eval()
    ev = UnsupSegEvaluator(7, UnsupSegConfig(**{"k_fg": 16, "cbfe_seeds": (0,), "cd_runs": 3, "nredo": 2,
                                                "niter": 20, **cfg}))
    for split in ("train", "val"):
        ds = open_dataset("synthetic", split, n=n, size=(64, 64))
        items = [ds[i] for i in range(n)]
        x = to_tensor_batch([np.asarray(it["image"]) for it in items], bb.mean, bb.std)
        with torch.no_grad():
            feats, attn = bb(x, attention_block=-1)
        ev.add(split, feats.patch, noisy_foreground(attn.cls),
               torch.from_numpy(np.stack([it["mask"] for it in items])))
    return ev


@pytest.fixture(scope="module")
def evaluator():
    ev = _evaluator()
    yield ev
    ev.close()


def test_end_to_end_on_synthetic_scenes(evaluator):
    ev = evaluator
    res = ev.run(k_community=8, markov_time=1.0, weight_threshold=0.05)
    assert set(res.metrics) == {"cbfe_miou", "cd_miou", "cd_miou_std", "fg_jaccard"}
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    assert res.metrics["cd_miou"] == pytest.approx(np.mean(res.per_run)) and len(res.per_run) == 3
    assert res.metrics["cd_miou_std"] == pytest.approx(np.std(res.per_run))
    cb = ev.cbfe()
    assert 8 <= cb["cut"].start < 12 and res.meta["cbfe_cut"] == cb["cut"].start  # int(0.55*16)..int(0.75*16)-1
    assert abs(cb["cut"].threshold / 0.05 - round(cb["cut"].threshold / 0.05)) < 1e-9
    gt = torch.cat(ev.gt["val"]).long()
    assert res.metrics["fg_jaccard"] == pytest.approx(foreground_jaccard(gt != 0, cb["fg"][8:]))
    fgc = ev.fg_clusters(8)
    assert torch.equal(fgc == 8, ~cb["fg"]) and int(fgc.max()) == 8  # background id = k
    assert res.examples["clusters"].shape == (4, 100, 100) and res.meta["hp_source"] == "given"
    # the reported val mIoU of run 0 equals Hungarian scoring of the merged pixels
    comm = torch.from_numpy(ev.communities(8, 1.0, 0.05)["mappings"][0])[fgc[8:].long()]
    conf = ConfusionMatrix(7, int(comm.max()) + 1).update(gt, comm).numpy()
    assert match_and_score(conf, matching="hungarian")["miou"] == pytest.approx(res.per_run[0])
    with pytest.raises(RuntimeError, match="after run"):
        ev.add("val", torch.zeros(1, 8, 8, 96), torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 64, 64))


def test_optuna_search_picks_the_best_train_trial(evaluator):
    pytest.importorskip("optuna")
    res = evaluator.run(n_trials=3, k_range=(6, 10, 2), mt_range=(0.5, 1.5, 0.5), wt_range=(0.02, 0.06, 0.02))
    done = [t for t in res.search if t["state"] == "COMPLETE"]
    best = max(done, key=lambda t: t["value"])
    assert (res.meta["k_community"], res.meta["markov_time"], res.meta["weight_threshold"]) == (
        best["k_community"], pytest.approx(best["markov_time"]), pytest.approx(best["weight_threshold"]))
    assert res.meta["cd_miou_train"] == pytest.approx(best["value"])
    assert res.meta["hp_source"] == "optuna-tpe-s1000-n3" and len(res.search) == 3
