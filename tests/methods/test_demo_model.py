"""The shipped ``demo_vit`` weights (pretrained by ``dinokit pretrain`` on the synthetic benchmark): offline
resolution with provenance, and the effects it was trained for, on held-out synthetic scenes.

Held-out: the weights were trained on scenes of benchmark seed 1000; these tests use seeds 0-2 (the demo's). Margins
are stated next to each assertion; the measured values (same settings) are in the comments.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit.backbones import load_backbone
from dinokit.backbones import weights as W
from dinokit.data.synthetic import SyntheticScenes, num_seg_classes
from dinokit.data.transforms import to_tensor_batch
from dinokit.eval.hummingbird import soft_cell_labels
from dinokit.eval.linear_seg import linear_probe
from dinokit.eval.position import position_probe

ASSET = Path(W.__file__).parent / "assets" / "demo_vit.safetensors"
pytestmark = pytest.mark.skipif(not ASSET.is_file(), reason="shipped demo_vit weights not present")
N = 48  # scenes per split: a few seconds per test on one thread

# Regression margins below the values measured with the shipped weights (N = 48, one thread):
# linear mIoU 0.145 vs oracle 0.639 (share 0.227) and random init 0.136; CorLoc 0.313 vs centre box 0.208 and
# random init 0.146; position ridge R2 0.025. The goals (share >= 0.75, CorLoc >= centre + 0.20,
# R2 >= 0.3) are NOT met by these weights: they are kept as strict xfail tests so that better weights show up.
LINEAR_SHARE = 0.20  # measured 0.227
CORLOC_OVER_CENTRE = 0.05  # measured +0.104
CORLOC_OVER_RANDOM = 0.10  # measured +0.167
GOAL_LINEAR_SHARE, GOAL_CORLOC_OVER_CENTRE, GOAL_POSITION_R2 = 0.75, 0.20, 0.3


@pytest.fixture(scope="module")
def trained():
    return load_backbone("demo_vit", weights="pretrained", offline=True).eval()


@pytest.fixture(scope="module")
def random_init():
    torch.manual_seed(0)
    return load_backbone("demo_vit", weights="random").eval()


def _features(bb, seed: int, fine: bool = False):
    sc = SyntheticScenes(N, (64, 64), seed=seed, fine_grained=fine)
    images = [sc[i].image for i in range(N)]
    masks = torch.from_numpy(np.stack([sc[i].mask for i in range(N)]).astype(np.int64))
    with torch.no_grad():
        f = bb.forward_features(to_tensor_batch(images, bb.mean, bb.std, "cpu")).patch.float()
    return f, masks, sc


def _linear(tf, tm, vf, vm) -> float:
    epochs = -(-100 // (tf.shape[0] // 16))  # ~100 SGD steps of 16 images, as the demo's evaluation stage
    return linear_probe(tf, tm, vf, vm, num_seg_classes(), lrs=(0.01, 0.1, 1.0), epochs=epochs, batch_size=16,
                        eval_size=None, seed=0, eval_every=0).metrics["miou"]


def test_pretrained_resolves_offline_to_the_shipped_file_with_provenance(trained):
    info = trained.weights_info
    assert info["source"] == "dinokit-asset" and Path(info["path"]) == ASSET
    prov = json.loads(ASSET.with_suffix(".json").read_text())
    assert info["sha256"] == W.sha256(ASSET) == prov["sha256"]
    assert info["provenance"]["seed"] == prov["seed"] and info["provenance"]["config"]["backbone"] == "demo_vit"
    assert ASSET.stat().st_size <= 10 * 2**20
    # the file is the same model as a dinokit-format file load: identical tokens
    again = load_backbone(weights=str(ASSET)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(trained.forward_features(x).patch, again.forward_features(x).patch)


@pytest.fixture(scope="module")
def linear_scores(trained, random_init):
    """(trained, oracle, random-init) linear-probe mIoU on the demo's train (seed 0) / val (seed 1) scenes."""
    tf, tm, _ = _features(trained, 0)
    vf, vm, _ = _features(trained, 1)
    c = num_seg_classes()
    onehot = [F.one_hot(soft_cell_labels(m, (8, 8), c).argmax(-1), c).float() for m in (tm, vm)]
    g = torch.Generator().manual_seed(0)
    jitter = [o + 0.05 * torch.randn(o.shape, generator=g) for o in onehot]
    oracle = _linear(jitter[0], tm, jitter[1], vm)
    rf, _, _ = _features(random_init, 0)
    rv, _, _ = _features(random_init, 1)
    return _linear(tf, tm, vf, vm), oracle, _linear(rf, tm, rv, vm)


def test_linear_probe_beats_random_init(linear_scores):
    ours, oracle, rand = linear_scores
    assert ours >= LINEAR_SHARE * oracle, (ours, oracle)
    assert ours > rand, (ours, rand)


@pytest.mark.xfail(strict=True, reason="goal of the issue not reached by the shipped weights (share 0.23)")
def test_goal_linear_probe_share_of_oracle(linear_scores):
    ours, oracle, _ = linear_scores
    assert ours >= GOAL_LINEAR_SHARE * oracle


def _corloc(bb) -> tuple[float, float]:
    """(pseudo-box CorLoc, centre-box CorLoc) on the main object of 48 fine-grained scenes of seed 2."""
    from dinokit.data import crops as C
    from dinokit.eval.boxes import corloc

    _, _, sc = _features(bb, 2, fine=True)
    items = [sc[i] for i in range(N)]
    ids = [s.image_id for s in items]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate maps get the whole image (counted as they are)
        pred, _ = C.pseudo_boxes(bb, [s.image for s in items], ids, C.BoxConfig(), device="cpu")
    main = [s.boxes[:1] for s in items]
    ours = corloc(np.asarray([pred[i] for i in ids], np.float64), main, fmt="xywh")["corloc"]
    centre = corloc(np.tile([16.0, 16.0, 32.0, 32.0], (N, 1)), main, fmt="xywh")["corloc"]
    return ours, centre


@pytest.fixture(scope="module")
def corloc_scores(trained, random_init):
    ours, centre = _corloc(trained)
    return ours, centre, _corloc(random_init)[0]


def test_attention_pseudo_boxes_beat_the_centre_box_and_random_init(corloc_scores):
    ours, centre, rand = corloc_scores
    assert ours >= centre + CORLOC_OVER_CENTRE, (ours, centre)
    assert ours >= rand + CORLOC_OVER_RANDOM, (ours, rand)


@pytest.mark.xfail(strict=True, reason="goal of the issue not reached by the shipped weights (+0.10)")
def test_goal_corloc_over_centre_box(corloc_scores):
    ours, centre, _ = corloc_scores
    assert ours >= centre + GOAL_CORLOC_OVER_CENTRE


@pytest.mark.xfail(strict=True, reason="goal of the issue not reached: the tokens carry almost no linear position "
                                       "(ridge R2 0.025), so RASA has nothing to remove")
def test_goal_tokens_carry_absolute_position_before_rasa(trained):
    tf, _, _ = _features(trained, 0)
    vf, _, _ = _features(trained, 1)
    assert position_probe(tf, vf, probe="ridge").metrics["r2"] >= GOAL_POSITION_R2
