import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinokit.viz import mass_threshold_mask
from dinokit.viz.callbacks import (
    PALETTE,
    attention_figure,
    batch_images,
    ccm_figure,
    ccm_stats,
    crop_to_patches,
    head_attention,
    overlay_masks,
    unnormalize,
)


def _dino_threshold(attn: torch.Tensor, tau: float) -> torch.Tensor:
    """DINO's visualize_attention rule: ascending sort, normalise, cumsum > 1 - tau, un-sort."""
    flat = attn.reshape(-1, attn.shape[-2] * attn.shape[-1])
    val, idx = torch.sort(flat, dim=-1)
    val = val / val.sum(-1, keepdim=True)
    cum = torch.cumsum(val, dim=-1)
    th = cum > (1 - tau)
    out = torch.zeros_like(th)
    out.scatter_(-1, idx, th)
    return out.reshape(attn.shape)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.3, 0.6, 0.9]), st.booleans())
def test_threshold_keeps_tau_with_fewest_patches(seed, tau, ties):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(3, 4, 5, generator=g)
    if ties:
        a = (a * 4).floor() + 1  # many equal values
    m = mass_threshold_mask(a, tau)
    p = a / a.sum((-2, -1), keepdim=True)
    for k in range(3):
        kept = p[k][m[k]]
        assert kept.sum() >= tau - 1e-6
        # dropping the smallest kept cell leaves < tau: no smaller set reaches tau
        assert kept.sum() - kept.min() < tau + 1e-6  # up to float rounding at exact ties with tau
        # and no unkept cell is larger than a kept one (the highest cells are kept)
        if (~m[k]).any():
            assert p[k][~m[k]].max() <= kept.min()


def test_threshold_ties_broken_by_index():
    m = mass_threshold_mask(torch.full((1, 2, 4), 1 / 8), 0.5)
    assert m.flatten().tolist() == [True] * 4 + [False] * 4


def test_threshold_equals_dino_form_on_tie_free_maps():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, 6, 7, 9, generator=g).softmax(-1)
    for tau in (0.3, 0.6, 0.9):
        assert torch.equal(mass_threshold_mask(a, tau), _dino_threshold(a, tau))


def test_unnormalize_inverts_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = torch.rand(2, 3, 8, 8)
    x = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(unnormalize(x, mean, std), img, atol=1e-6, rtol=0)


def test_overlay_equals_image_where_no_mask():
    img = np.random.default_rng(0).random((8, 8, 3))
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :3, :3] = True
    masks[1, 5:, 5:] = True
    out = overlay_masks(img, masks)
    untouched = ~(masks.any(0))
    np.testing.assert_array_equal(out[untouched], img[untouched])
    np.testing.assert_allclose(out[0, 0], 0.5 * img[0, 0] + 0.5 * np.array(PALETTE[0]))


def test_attention_figure_and_renormalised_heads(tmp_path):
    from dinokit.backbones import load_backbone

    bb = load_backbone("tiny_dinov2_reg", "random").eval()
    x = crop_to_patches(torch.randn(2, 3, 3 * 14 + 5, 4 * 14 + 3), 14)
    assert x.shape[-2:] == (42, 56)
    attn = head_attention(bb, x)
    assert attn.shape == (2, bb.num_heads, 3, 4)
    torch.testing.assert_close(attn.sum((-2, -1)), torch.ones(2, bb.num_heads))
    path = attention_figure(tmp_path / "a.png", x, attn, bb.mean, bb.std, 14)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))


def test_ccm_stats_and_figure(tmp_path):
    c = torch.eye(4) * 0.5
    c[0, 1] = 0.2
    s = ccm_stats(c)
    assert s["mean_diag"] == pytest.approx(0.5)
    assert s["mean_abs_offdiag"] == pytest.approx(0.2 / 12)
    assert s["frac_offdiag_gt"] == pytest.approx(1 / 12)
    assert ccm_figure(tmp_path / "c.png", c).is_file()


def test_batch_images():
    x = torch.zeros(2, 3, 4, 4)
    assert batch_images((x, x + 1)) is x
    assert batch_images({"image": x}) is x
    with pytest.raises(ValueError, match="cannot find images"):
        batch_images({"mask": x})
