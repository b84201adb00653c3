"""One reader for the backbones of every dinokit trainer's Lightning checkpoint (NeCo: see test_neco.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from dinokit.backbones import load_backbone  # noqa: E402
from dinokit.backbones.weights import file_metadata  # noqa: E402
from dinokit.methods.checkpoints import load_checkpoint_backbone  # noqa: E402


def _features(bb, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bb.eval().forward_features(x).patch


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bt_fit_checkpoint_and_export_give_the_trained_backbone(tmp_path: Path) -> None:
    from dinokit.commands.bt import fit

    out = tmp_path / "bt"
    assert fit(out=out, backbone="tiny_dino", projector="16-16", image_size=32, max_epochs=1, batch_size=4,
               figures=False, erf=False, synthetic_n=8, synthetic_size=32, seed=0) == 0
    bb, head, config = load_checkpoint_backbone(out / "checkpoints" / "last.ckpt")
    assert config["backbone"] == "tiny_dino" and config["projector"] == "16-16"
    assert set(head) == {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                         "1.num_batches_tracked", "3.weight"}  # Linear, BN, ReLU, Linear of the projector
    assert bb.weights_info["source"] == "bt"
    x = torch.randn(2, 3, 32, 32)
    ref = _features(bb, x)
    exported = load_backbone(weights=str(out / "backbone.safetensors"))  # the name comes from the metadata
    assert torch.equal(_features(exported, x), ref)
    meta = file_metadata(out / "backbone.safetensors")
    assert meta["dinokit_format"] == "1" and meta["name"] == "tiny_dino" and meta["source"] == "dinokit bt fit"
    start = load_backbone(weights=str(out / "backbone_init.safetensors"))
    assert not torch.equal(_features(start, x), ref)  # trained
    assert file_metadata(out / "backbone_init.safetensors")["source"] == "random"
    with pytest.raises(ValueError, match="no teacher"):
        load_checkpoint_backbone(out / "checkpoints" / "last.ckpt", which="teacher")
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["weights"]["source"] == "random"  # the starting weights


def test_seg_checkpoint_gives_its_backbone_and_head(tmp_path: Path) -> None:
    from dinokit.methods.seg_heads.lightning import SegmentationModule

    torch.manual_seed(0)
    m = SegmentationModule("tiny_dino", "random", "linear", num_classes=3)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the random init load_backbone would give
    ckpt = tmp_path / "seg.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, ckpt)  # Lightning's layout
    bb, head, config = load_checkpoint_backbone(ckpt)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(bb, x), _features(m.backbone, x))
    assert set(head) == {"conv.weight", "conv.bias"} and torch.equal(head["conv.weight"], m.head.conv.weight)
    assert config["head"] == "linear" and bb.weights_info == {"source": "seg", "checkpoint": str(ckpt),
                                                              "which": "student"}


def test_bad_checkpoints_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neco fit"):
        load_checkpoint_backbone(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="holds no backbone weights"):
        load_checkpoint_backbone(other)
    with pytest.raises(ValueError, match="which='middle'"):
        load_checkpoint_backbone(other, which="middle")
