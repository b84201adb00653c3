"""LOST and TokenCut: planted key blocks give their exact box; eigenvectors equal scipy's generalised solver; flood
fill equals scipy.ndimage.label; the image pipeline maps grid extents to pixels and runs on synthetic scenes."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.linalg import eigh

from dinokit.eval.boxes import grid_box_to_xyxy
from dinokit.eval.discovery import (
    component_extent,
    discover_boxes,
    extent_to_boxes,
    lost,
    lost_degree,
    seed_component,
    tokencut,
    tokencut_eigvec,
    tokencut_graph,
)

H, W, D = 8, 10, 16
BLOCK = (slice(2, 5), slice(3, 7))  # rows [2, 5), columns [3, 7): 12 patches


def planted(noise: float = 0.02, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Background keys ≈ e0, object keys ≈ e1 − 0.5 e0 (negatively correlated with the background)."""
    g = torch.Generator().manual_seed(seed)
    bg, obj = torch.zeros(D), torch.zeros(D)
    bg[0], obj[1], obj[0] = 1.0, 1.0, -0.5
    k = bg.expand(batch, H, W, D).clone()
    k[:, BLOCK[0], BLOCK[1]] = obj
    return k + noise * torch.randn(k.shape, generator=g)


def block_mask() -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[BLOCK] = True
    return m


def test_lost_planted_block_seed_expansion_component_and_box():
    keys = planted()
    r = lost(keys, k_patches=12)
    deg = r.extra["degree"].view(H, W)
    assert (deg[block_mask()] == 11).all() and (deg[~block_mask()] == H * W - 12 - 1).all()
    # seed: the lowest degree, ties to the lowest index = the block's first patch (row 2, column 3)
    assert int(r.seed) == 2 * W + 3
    pot = set(r.extra["potentials"][0].tolist())
    assert pot == set(torch.nonzero(block_mask().view(-1)).view(-1).tolist())  # the 12 lowest-degree patches
    assert bool(r.extra["similar"].all())  # every potential is positively correlated with the seed
    assert torch.equal(r.mask[0], block_mask()) and torch.equal(r.component[0], block_mask())
    assert r.extent.tolist() == [[2, 5, 3, 7]] and not bool(r.seed_outside[0])
    # box mapping: (c0 p, r0 p, c1 p, r1 p), x2 / y2 clipped to the unpadded image
    assert extent_to_boxes(r.extent, 16, [(128, 160)]).tolist() == [[48.0, 32.0, 112.0, 80.0]]
    assert extent_to_boxes(torch.tensor([[2, 8, 3, 10]]), 16, [(120, 150)]).tolist() == [[48.0, 32.0, 150.0, 120.0]]
    # k = 100 > N: the potentials are every patch, the background ones are not similar to the seed
    assert torch.equal(lost(keys, k_patches=100).component[0], block_mask())


def test_lost_component_keeps_only_the_seed_side():
    keys = planted()
    keys[0, 6, 8] = keys[0, 2, 3]  # an isolated object-like patch, not 4-connected to the block
    r = lost(keys, k_patches=13)
    assert bool(r.mask[0, 6, 8]) and not bool(r.component[0, 6, 8])
    assert torch.equal(r.component[0], block_mask())


def test_lost_degree_counts_positive_off_diagonal():
    A = torch.tensor([[[5.0, 1.0, -1.0], [1.0, 4.0, 0.0], [-1.0, 0.0, 3.0]]])
    assert lost_degree(A).tolist() == [[1, 1, 0]]


def test_tokencut_planted_block_and_flip():
    for s in range(3):
        r = tokencut(planted(seed=s))
        assert torch.equal(r.component[0], block_mask()), s
        assert r.extent.tolist() == [[2, 5, 3, 7]]
        x = r.score[0]
        assert float(x[block_mask()].min()) > float(x[~block_mask()].max())  # the seed's side is positive
        assert bool(block_mask().view(-1)[r.seed[0]])


def test_tokencut_eigvec_equals_scipy_generalised_up_to_sign():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 40, 12, generator=g)
    for binary in (True, False):
        Wt = tokencut_graph(keys, 0.2, 1e-5, binary_graph=binary)
        x, lam = tokencut_eigvec(Wt)
        for b in range(3):
            Wn = Wt[b].numpy()
            Dn = np.diag(Wn.sum(1))
            ev, V = eigh(Dn - Wn, Dn)
            v = V[:, 1]
            s = np.sign(v @ x[b].numpy())
            np.testing.assert_allclose(s * v, x[b].numpy(), atol=1e-5)
            assert lam[b].item() == pytest.approx(ev[1], abs=1e-8)
            assert float(x[b] @ torch.from_numpy(Dn) @ x[b]) == pytest.approx(1.0, abs=1e-8)  # xᵀDx = 1


def test_tokencut_graph_binary_and_weighted():
    f = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])
    Wb = tokencut_graph(f, 0.2, 1e-5, binary_graph=True)[0]
    assert Wb.tolist() == [[1.0, 1.0, 1e-5], [1.0, 1.0, 1e-5], [1e-5, 1e-5, 1.0]]
    Ww = tokencut_graph(f, 0.2, 1e-5, binary_graph=False)[0]
    assert Ww[0, 1].item() == pytest.approx(2 ** -0.5) and Ww[0, 2].item() == pytest.approx(1e-5)


def test_flood_fill_equals_scipy_label():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 9, 11, generator=g) > 0.45
    seeds = torch.randint(0, 99, (6,), generator=g)
    a = seed_component(masks, seeds, "torch")
    b = seed_component(masks, seeds, "scipy")
    assert torch.equal(a, b)
    for i in range(6):  # and both equal the ndimage component of the (seed-including) mask
        m = masks[i].numpy().copy()
        m.reshape(-1)[seeds[i]] = True
        lab, _ = ndimage.label(m)
        assert np.array_equal(a[i].numpy(), lab == lab.reshape(-1)[seeds[i]])
    # a snake needs many steps: the fill still reaches its end
    snake = torch.zeros(1, 7, 7, dtype=torch.bool)
    snake[0, ::2] = True
    snake[0, 1, 6] = snake[0, 3, 0] = snake[0, 5, 6] = True
    assert torch.equal(seed_component(snake, torch.tensor([0])), snake)


def test_component_extent_and_grid_box_agree():
    c = torch.zeros(1, 6, 7, dtype=torch.bool)
    c[0, 1:4, 2] = True
    c[0, 3, 2:6] = True
    e = component_extent(c)
    assert e.tolist() == [[1, 4, 2, 6]]
    assert extent_to_boxes(e, 8, [(45, 50)])[0].tolist() == list(grid_box_to_xyxy(1, 4, 2, 6, 8, 45, 50))


def test_batching_matches_one_at_a_time():
    keys = planted(batch=3, seed=5)
    for fn in (lambda k: lost(k, 20), tokencut):
        full = fn(keys)
        for b in range(3):
            one = fn(keys[b:b + 1])
            assert torch.equal(full.component[b], one.component[0]) and int(full.seed[b]) == int(one.seed[0])


@pytest.fixture(scope="module")
def tiny():
    from dinokit.backbones import load_backbone

    return load_backbone("tiny_dino", weights="random").eval()


def test_discover_boxes_on_synthetic_scenes(tiny):
    from dinokit.data.synthetic import render_scene

    # two sizes -> two buckets; 40x56 pads to 48x64 (grid 3x4), 64x64 is grid 4x4
    images = [render_scene(0, i, (40, 56) if i % 2 else (64, 64)).image for i in range(4)]
    for method in ("lost", "tokencut"):
        run = discover_boxes(tiny, images, method, batch_size=2, k_patches=5)
        one = discover_boxes(tiny, images, method, batch_size=1, k_patches=5)
        np.testing.assert_array_equal(run.boxes, one.boxes)
        assert [g for g in run.grids] == [(4, 4), (3, 4), (4, 4), (3, 4)]
        for im, b, comp in zip(images, run.boxes, run.components):
            Hh, Ww = im.shape[:2]
            rows, cols = np.nonzero(comp.any(1))[0], np.nonzero(comp.any(0))[0]
            # the box is the component's grid extent in pixels, clipped to the unpadded image
            assert b.tolist() == [cols[0] * 16, rows[0] * 16, min((cols[-1] + 1) * 16, Ww),
                                  min((rows[-1] + 1) * 16, Hh)]
    with pytest.raises(ValueError, match="method"):
        discover_boxes(tiny, images, "ncut")
