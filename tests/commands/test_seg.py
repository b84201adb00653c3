import json

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from dinokit.commands.seg import fit  # noqa: E402
from dinokit.methods.seg_heads.lightning import SegmentationModule  # noqa: E402


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_seg_fit_synthetic_writes_miou(tmp_path):
    rc = fit(out=tmp_path, head="setr_naive", backbone="tiny_dino", train_size=32, eval_short_side=32,
             max_epochs=1, batch_size=4, synthetic_n=8, synthetic_size=32, warmup_epochs=0, seed=1)
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    miou = res["synthetic/seghead/orig/setr_naive/miou"]
    assert 0.0 <= miou <= 1.0 and res["meta"]["protocol"] == "orig"


def test_frozen_backbone_gets_no_gradient_and_finetune_uses_tenth_lr():
    m = SegmentationModule("tiny_dino", "random", "linear", num_classes=3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.head.conv.weight.grad is not None
    ft = SegmentationModule("tiny_dino", "random", "linear", num_classes=3, freeze_backbone=False, lr=1e-2)

    class _T:
        estimated_stepping_batches, max_epochs, world_size = 10, 2, 1

    ft._trainer = _T()
    opt = ft.configure_optimizers()["optimizer"]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-3])  # head, backbone
