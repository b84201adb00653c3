"""Pseudo-boxes (§1), SAM selection (§1.6) and LocalizedRandomResizedCrop (§2) of crops.md."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinokit.backbones.features import AttentionMaps
from dinokit.data import crops as C


def blob(h: int, w: int, cy: float, cx: float, sigma: float, heads: int = 3) -> torch.Tensor:
    """(1, heads, h, w) isotropic Gaussian attention (cell units, cell centres at +0.5), summing to 1 per head."""
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    b = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return (b / b.sum())[None, None].repeat(1, heads, 1, 1)


class BlobBackbone(torch.nn.Module):
    """A stand-in backbone whose attention is a Gaussian blob at a fixed normalised position of any input."""

    def __init__(self, fy: float, fx: float, patch: int = 14):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.patch_size, self.mean, self.std, self.fy, self.fx = patch, (0.5,) * 3, (0.5,) * 3, fy, fx

    def attention(self, x: torch.Tensor, block: int = -1) -> AttentionMaps:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        a = blob(h, w, self.fy * h, self.fx * w, 0.08 * min(h, w)).repeat(x.shape[0], 1, 1, 1)
        return AttentionMaps(cls=a, prefix=torch.zeros(x.shape[0], 3, 1), block=block, grid=(h, w))


# ------------------------------------------------------------------------------------------ score map and masks


def test_input_rule_and_kernel_of_a_cub_image():
    assert C.input_size(375, 500, 14) == (364, 490)
    assert (364 // 14, 490 // 14) == (26, 35)
    assert C.odd_kernel(26, 35) == (5, 7)
    assert C.input_size(10, 500, 14) == (14, 490)
    assert C.input_size(375, 500, 14, "short:224") == (224, 294)
    with pytest.raises(ValueError, match="short:S"):
        C.input_size(10, 10, 14, "long:3")


def test_box_filter_is_the_mean_with_numpy_symmetric_padding():
    m = torch.rand(2, 6, 9)
    got = C.box_filter(m, (3, 5))
    pad = np.pad(m.numpy(), ((0, 0), (1, 1), (2, 2)), mode="symmetric")
    ref = np.stack([[[pad[b, i:i + 3, j:j + 5].mean() for j in range(9)] for i in range(6)] for b in range(2)])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    small = C.box_filter(torch.rand(1, 2, 2), (7, 7))  # pad > side: replicate
    assert torch.isfinite(small).all()


def test_outlier_removal_replaces_the_first_maximum_by_the_mean():
    v = torch.tensor([[[[1.0, 5.0], [5.0, 1.0]]]])
    out = C.score_from_values(v, outlier=True)
    assert torch.equal(out, torch.tensor([[[1.0, 3.0], [5.0, 1.0]]]))


def test_fixed_rule_equals_the_reference_uint8_chain_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        m, deg = C.upsample_minmax(torch.rand(7, 9, generator=g), (41, 53))
        assert not deg
        md = m.double().numpy()
        e = np.exp(4 * md)
        e = e / e.sum()  # softmax over pixels
        e = (e - e.min()) / (e.max() - e.min())
        chain = (e * 255).astype(np.uint8) > 75
        assert np.array_equal(chain, md >= C.FIXED_THRESHOLD)
    assert abs(C.FIXED_THRESHOLD - 0.70793) < 1e-5


def test_mass_mask_keeps_tau_and_dropping_its_smallest_cell_falls_below():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 2, 6, 7, generator=g) ** 3
    cfg = C.BoxConfig(rule="mass", tau=0.6, autocontrast=False)
    mask, _ = C.pseudo_mask(a[0], (6, 7), cfg)  # one pixel per cell
    p = C.attention_values(a, "prob").mean(1)[0].numpy()
    kept = p[mask]
    assert kept.sum() >= 0.6 - 1e-6
    assert kept.sum() - kept.min() < 0.6
    big, _ = C.pseudo_mask(a[0], (60, 70), cfg)
    assert np.array_equal(big[::10, ::10], mask)


def test_cells_to_pixels_uses_rounded_cell_bounds():
    m = np.array([[True, False, False]])
    px = C.cells_to_pixels(m, (2, 10))  # column bounds 0, 3, 7, 10
    assert px[0].tolist() == [True] * 3 + [False] * 7


def test_per_head_logit_constants_change_nothing():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 3, 8, 10, generator=g)
    c = torch.randn(2, 3, 1, 1, generator=g) * 5
    s0, s1 = C.score_from_values(v), C.score_from_values(v + c)
    d = s1 - s0
    assert torch.allclose(d, d.flatten(1)[:, :1, None].expand_as(d), atol=1e-4)
    for b in range(2):
        m0, _ = C.upsample_minmax(C.box_filter(s0[b:b + 1], (3, 3))[0], (33, 40))
        m1, _ = C.upsample_minmax(C.box_filter(s1[b:b + 1], (3, 3))[0], (33, 40))
        assert torch.allclose(m0, m1, atol=1e-4)


# ------------------------------------------------------------------------------------------ mask -> box


def test_mask_to_box_centroid_and_extent():
    m = np.zeros((10, 20), bool)
    m[2:5, 3:9] = True
    assert C.mask_to_box(m, "extent") == [3, 2, 6, 3]
    assert C.mask_to_box(m, "centroid") == [3, 2, 6, 3]
    frag = np.zeros((10, 20), bool)
    frag[0, 0] = frag[0, 1] = frag[0, 2] = frag[9, 19] = True  # fragmented: centroid box is smaller than the extent
    assert C.mask_to_box(frag, "extent") == [0, 0, 20, 10]
    b = C.mask_to_box(frag, "centroid")
    assert b[2] == 4 and b[3] == 2
    assert C.mask_to_box(np.zeros((3, 3), bool)) is None
    assert C.integer_box(19.7, 9.9, 0.1, 0.1, (10, 20)) == [19, 9, 1, 1]  # zero size grows inside the image


def test_largest_component_is_8_connected():
    m = np.zeros((8, 8), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # diagonal chain: one component under 8-connectivity
    m[6, 6] = m[6, 7] = True
    assert C.largest_component(m).sum() == 3


@pytest.mark.parametrize("values", ["logit", "prob"])
def test_planted_blob_gives_a_box_centred_on_it_in_original_pixels(values):
    H, W, p = 375, 500, 14
    h, w = H // p, W // p  # 26 x 35
    cfg = C.BoxConfig(values=values)
    fy, fx = 0.45, 0.55
    (b,), (flag,) = C.boxes_from_attention(blob(h, w, fy * h, fx * w, 2.0), [(H, W)], cfg)
    cy, cx = fy * H, fx * W
    assert not flag
    assert b[0] <= cx <= b[0] + b[2] and b[1] <= cy <= b[1] + b[3]
    assert abs(b[0] + b[2] / 2 - cx) <= 14 and abs(b[1] + b[3] / 2 - cy) <= 14
    # the same blob in normalised coordinates on the image resized x2 gives the box x2
    H2, W2 = 2 * H, 2 * W
    h2, w2 = H2 // p, W2 // p
    (b2,), _ = C.boxes_from_attention(blob(h2, w2, fy * h2, fx * w2, 2.0 * h2 / h), [(H2, W2)], cfg)
    assert np.all(np.abs(np.asarray(b2) - 2 * np.asarray(b)) <= 14)


def test_pseudo_boxes_are_in_original_coordinates_for_resized_non_square_images():
    fy, fx = 0.4, 0.6
    bb = BlobBackbone(fy, fx)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (300, 200, 3), np.uint8), rng.integers(0, 255, (150, 420, 3), np.uint8),
              rng.integers(0, 255, (301, 199, 3), np.uint8)]
    ids = ["3", "1", "2"]
    for size in ("native", "short:56"):
        boxes, degenerate = C.pseudo_boxes(bb, images, ids, C.BoxConfig(size=size, values="prob", outlier=False))
        assert not degenerate and list(boxes) == ids
        for im, i in zip(images, ids):
            H, W = im.shape[:2]
            x, y, w, h = boxes[i]
            assert 0 <= x and 0 <= y and x + w <= W and y + h <= H
            hp, wp = C.input_size(H, W, 14, size)  # one cell of the grid, in original pixels
            assert abs(x + w / 2 - fx * W) <= 14 * W / wp and abs(y + h / 2 - fy * H) <= 14 * H / hp


def test_bucketing_equals_one_by_one(tiny_backbone):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, s, np.uint8) for s in [(64, 80, 3), (70, 56, 3), (64, 80, 3), (57, 57, 3)]]
    ids = [str(i) for i in range(4)]
    cfg = C.BoxConfig(batch_size=3)
    together, _ = C.pseudo_boxes(tiny_backbone, images, ids, cfg)
    for im, i in zip(images, ids):
        alone, _ = C.pseudo_boxes(tiny_backbone, [im], [i], cfg)
        assert alone[i] == together[i]


def test_degenerate_map_gives_the_whole_image_box_and_is_flagged():
    flat = torch.full((1, 2, 4, 5), 1 / 20)
    boxes, flags = C.boxes_from_attention(flat, [(30, 40)])
    assert boxes == [[0, 0, 40, 30]] and flags == [True]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), H=st.integers(16, 120), W=st.integers(16, 120),
       rule=st.sampled_from(["fixed", "mass"]), box=st.sampled_from(["centroid", "extent"]),
       lc=st.booleans())
def test_every_pseudo_box_is_inside_the_image_and_non_empty(seed, H, W, rule, box, lc):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, 2, max(1, H // 8), max(1, W // 8), generator=g) ** 4
    (b,), _ = C.boxes_from_attention(a, [(H, W)], C.BoxConfig(rule=rule, box=box, largest_component=lc))
    x, y, w, h = b
    assert all(isinstance(v, int) for v in b)
    assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= W and y + h <= H


def test_box_json_round_trip_and_id_checks(tmp_path):
    boxes = {"10": [1, 2, 3, 4], "2": [0, 0, 5, 5], "1": [3, 3, 1, 1]}
    p = C.write_box_json(tmp_path / "b.json", boxes, meta={"count": 3})
    assert list(__import__("json").loads(p.read_text())) == ["1", "2", "10"]
    assert (tmp_path / "b.meta.json").is_file()
    assert C.read_box_json(p, ["1", "2", "10"]) == {k: [float(x) for x in v] for k, v in boxes.items()}
    with pytest.raises(ValueError, match="lacks 1 image"):
        C.read_box_json(p, ["1", "2", "10", "11"])
    with pytest.raises(ValueError, match="not in the dataset"):
        C.read_box_json(p, ["1", "2"])
    with pytest.raises(FileNotFoundError, match="dinokit boxes"):
        C.read_box_json(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ SAM selection


def test_sam_selection_on_synthetic_masks():
    H, W = 40, 60
    masks = np.zeros((3, H, W), bool)
    masks[0, 5:15, 5:20] = True  # aligned with the attention blob
    masks[1, 20:38, 30:58] = True  # the largest, the right-class crop
    masks[2] = True  # the whole image
    att = np.zeros((H, W), bool)
    att[6:14, 6:18] = True
    assert C.select_sam_mask(masks, "attention", attention_mask=att) == 0
    feats = torch.tensor([[1.0, 0.0], [0.1, 1.0], [0.7, 0.7]])
    assert C.select_sam_mask(masks, "ncm", features=feats, prototype=torch.tensor([0.0, 2.0])) == 1
    assert C.select_sam_mask(masks, "largest") == 1
    assert C.select_sam_mask(masks, "oracle", gt_box=[30, 20, 28, 18]) == 1
    assert C.mask_extents(masks)[0].tolist() == [5, 5, 15, 10]
    assert C.select_sam_mask(np.zeros((0, H, W), bool)) == -1
    assert C.square_crop_box([50, 5, 10, 30], (40, 60)) == [30, 5, 30, 30]


def test_sam_needs_a_local_checkpoint(tmp_path):
    pytest.importorskip("segment_anything")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        C.sam_mask_generator(tmp_path / "sam.pth")


# ------------------------------------------------------------------------------------------ LocalizedRandomResizedCrop


def reference_steps(H, W, box, u, thr, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Steps 1-9 of §2.2 written out independently."""
    xo, yo, wo, ho = box
    area_i, area_o = W * H, max(wo, ho) ** 2
    lo = max(scale[0], thr * area_o / area_i)
    hi = max(scale[1], lo)
    s = lo + (hi - lo) * u[0]
    r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    side = math.sqrt(area_i) * math.sqrt(s)
    cw, ch = (r * side, side) if r > 1 else (side, side / r)
    ch, cw = min(ch, H), min(cw, W)
    a = 1 - math.sqrt(thr)
    cx = xo + wo / 2 - a * (cw + wo) / 2 + a * (cw + wo) * u[2]
    cy = yo + ho / 2 - a * (ch + ho) / 2 + a * (ch + ho) * u[3]
    top, left = max(0, cy - ch / 2), max(0, cx - cw / 2)
    ch = H - top if top + ch > H else ch
    cw = W - left if left + cw > W else cw
    return int(top), int(left), int(ch), int(cw)


def test_get_params_equals_the_written_out_steps_on_10k_cases():
    rng = random.Random(0)
    for _ in range(10_000):
        H, W = rng.randint(8, 400), rng.randint(8, 400)
        w, h = rng.randint(1, W), rng.randint(1, H)
        box = [rng.randint(0, W - w), rng.randint(0, H - h), w, h]
        thr = rng.random()
        seed = rng.randrange(1 << 30)
        got = C.LocalizedRandomResizedCrop(thr=thr, rng=random.Random(seed)).get_params((H, W), box)
        r2 = random.Random(seed)
        ref = reference_steps(H, W, box, [r2.random() for _ in range(4)], thr)
        if ref[2] >= 1 and ref[3] >= 1:
            assert got == ref


@settings(max_examples=60, deadline=None)
@given(H=st.integers(2, 300), W=st.integers(2, 300), fw=st.floats(0, 1), fh=st.floats(0, 1), fx=st.floats(0, 1),
       fy=st.floats(0, 1), thr=st.floats(0, 1), seed=st.integers(0, 2**20), rounding=st.sampled_from(["trunc",
                                                                                                     "outward"]))
def test_every_crop_is_inside_the_image_and_non_empty(H, W, fw, fh, fx, fy, thr, seed, rounding):
    w, h = max(1, round(fw * W)), max(1, round(fh * H))
    box = [round(fx * (W - w)), round(fy * (H - h)), w, h]
    t = C.LocalizedRandomResizedCrop(thr=thr, rng=random.Random(seed), rounding=rounding)
    for _ in range(5):
        top, left, ch, cw = t.get_params((H, W), box)
        assert top >= 0 and left >= 0 and ch >= 1 and cw >= 1 and top + ch <= H and left + cw <= W


def test_thr_1_contains_the_box_up_to_1px_even_when_the_box_area_exceeds_the_image():
    rng = random.Random(3)
    t = C.LocalizedRandomResizedCrop(thr=1.0, rng=random.Random(4))
    for _ in range(3000):
        H, W = rng.randint(5, 300), rng.randint(5, 300)
        w, h = rng.randint(1, W), rng.randint(1, H)  # thr * A_O > A_I happens often
        x, y = rng.randint(0, W - w), rng.randint(0, H - h)
        top, left, ch, cw = t.get_params((H, W), [x, y, w, h])
        assert left <= x and top <= y
        assert left + cw >= x + w - 1 and top + ch >= y + h - 1


def test_maiou_matches_the_published_curve_at_0_half_and_1():
    boxes = C.synthetic_boxes(3000, (375, 500), seed=0)
    sizes = [(375, 500)] * len(boxes)
    for thr in (0.0, 0.5, 1.0):
        got = C.localized_crop_maiou(boxes.tolist(), sizes, thr, seed=1)
        assert abs(got - C.PUBLISHED_MAIOU[thr]) <= 0.02, (thr, got)
    assert abs(C.thr_from_maiou(float(C.maiou_fit(0.3))) - 0.3) < 1e-9


def test_flipped_scale_interval_collapses_to_the_lower_bound():
    H = W = 100
    box = [5, 5, 90, 90]  # thr * A_O / A_I = 0.81 > scale_max = 0.5
    for u1 in (0.0, 0.3, 0.99):
        _, _, _, _, Hc, Wc = C.localized_crop_geometry((H, W), box, [u1, 0.5, 0.5, 0.5], 1.0, (0.08, 0.5), (1, 1))
        assert Hc == pytest.approx(90.0) and Wc == pytest.approx(90.0)


def test_forced_degenerate_draws_retry_then_fall_back():
    class Seq(random.Random):
        def __init__(self):
            super().__init__(0)
            self.k = 0

        def random(self):
            self.k += 1
            return 0.5 if self.k % 4 in (1, 2) else 1.0 - 1e-12

    t = C.LocalizedRandomResizedCrop(thr=0.0, rng=Seq(), max_attempts=4, scale=(0.0001, 0.0001))
    top, left, h, w = t.get_params((50, 60), [58, 48, 2, 2])
    assert t.retries == 3 and t.fallbacks == 1
    assert h >= 1 and w >= 1 and top + h <= 50 and left + w <= 60


@pytest.mark.parametrize("box", [[-1, 0, 10, 10], [0, 0, 0, 5], [0, 0, 5, -2], [50, 0, 20, 10], [0, 0, 62, 10]])
def test_bad_boxes_raise_naming_the_image(box):
    t = C.LocalizedRandomResizedCrop(thr=0.5)
    with pytest.raises(ValueError, match="img_7"):
        t.get_params((40, 60), box, image_id="img_7")


def test_box_exceeding_by_one_pixel_is_clipped_and_missing_box_raises():
    assert C.validate_box([50, 30, 11, 11], (40, 60)) == [50, 30, 10, 10]
    t = C.LocalizedRandomResizedCrop(16, thr=0.5)
    with pytest.raises(ValueError, match="needs a box"):
        t(torch.zeros(3, 40, 60, dtype=torch.uint8))
    with pytest.raises(ValueError, match="thr"):
        C.LocalizedRandomResizedCrop(thr=1.5)


def test_pil_tensor_bounding_boxes_and_v2_compose():
    from PIL import Image
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    img = np.zeros((40, 60, 3), np.uint8)
    img[10:20, 30:50] = 255
    t = C.LocalizedRandomResizedCrop(32, thr=1.0, rng=random.Random(0), return_params=True)
    out, b, params = t(Image.fromarray(img), [30, 10, 20, 10])
    assert out.size == (32, 32) and len(b) == 4 and len(params) == 4
    bb = tv_tensors.BoundingBoxes([[30, 10, 20, 10]], format="XYWH", canvas_size=(40, 60))
    pipe = v2.Compose([C.LocalizedRandomResizedCrop(32, thr=1.0, rng=random.Random(0)), v2.RandomHorizontalFlip(1.0)])
    out2, b2 = pipe(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), bb)
    assert out2.shape == (3, 32, 32) and isinstance(b2, tv_tensors.BoundingBoxes)
    x, y, w, h = b2[0].tolist()
    assert 0 <= x and x + w <= 32 + 1e-4 and 0 <= y and y + h <= 32 + 1e-4
    # the white object ends up inside the returned box
    ys, xs = np.nonzero(out2[0].numpy() > 200)
    assert xs.min() >= x - 1 and xs.max() <= x + w + 1


@pytest.fixture(scope="module")
def tiny_backbone():
    from dinokit.backbones import load_backbone

    return load_backbone("tiny_dino", weights="random").eval()


def test_sam_without_the_extra_says_how_to_install(tmp_path):
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"dinokit\[sam\]"):
            C.sam_mask_generator(tmp_path / "sam.pth")
    else:
        pytest.skip("segment-anything is installed; covered by test_sam_needs_a_local_checkpoint")
