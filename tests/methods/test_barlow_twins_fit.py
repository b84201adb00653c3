import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from dinokit.methods.barlow_twins import TwoViews, barlow_twins_views  # noqa: E402
from dinokit.methods.barlow_twins.lightning import BarlowTwinsModule  # noqa: E402
from dinokit.viz import callbacks as cbs  # noqa: E402


class _Recorder(pl.Callback):
    def __init__(self):
        self.train: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(pl_module.criterion.last_c.clone())


def _loader(n: int, seed: int, bb) -> torch.utils.data.DataLoader:
    rng = np.random.default_rng(seed)
    imgs = [(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(n)]
    views = TwoViews(imgs, barlow_twins_views(size=32, mean=bb.mean, std=bb.std, crop_scale=(0.5, 1.0)))
    return torch.utils.data.DataLoader(views, batch_size=4, drop_last=True)


def _trainer(tmp_path, callbacks, epochs: int) -> "pl.Trainer":
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks,
                      num_sanity_val_steps=1, enable_checkpointing=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_figures_epoch_mean_and_resume(tmp_path):
    torch.manual_seed(0)
    m = BarlowTwinsModule("tiny_dino", "random", projector="16-16", batch_size=4, warmup_epochs=1)
    ccm = cbs.CrossCorrelationCallback(max_dims=8)
    rec = _Recorder()
    att = cbs.AttentionMapCallback(n_images=2)
    erf = cbs.ERFCallback(n_images=2)
    tr = _trainer(tmp_path, [rec, ccm, att, erf], 1)
    tr.fit(m, _loader(8, 0, m.backbone), _loader(8, 1, m.backbone))
    assert len(rec.train) == 2
    torch.testing.assert_close(ccm.means["train"], torch.stack(rec.train).mean(0))
    assert torch.all(torch.diagonal(ccm.means["train"]) != 0)  # the diagonal is intact
    assert "val" in ccm.means and (tmp_path / "figures" / "cc_matrix_val" / "epoch_0000.png").is_file()
    assert (tmp_path / "figures" / "attention" / "epoch_0000.png").is_file()
    assert (tmp_path / "figures" / "erf" / "epoch_0000.png").is_file()
    ckpt = tmp_path / "last.ckpt"
    tr.save_checkpoint(ckpt)
    m2 = BarlowTwinsModule("tiny_dino", "random", projector="16-16", batch_size=4, warmup_epochs=1)
    tr2 = _trainer(tmp_path / "resumed", [], 2)
    tr2.fit(m2, _loader(8, 0, m2.backbone), _loader(8, 1, m2.backbone), ckpt_path=str(ckpt))
    assert tr2.global_step == 4


def test_attention_callback_rejects_models_without_attention():
    class NoAttention(torch.nn.Module):
        backbone = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no attention API"):
        cbs.AttentionMapCallback().setup(None, NoAttention(), "fit")
    with pytest.raises(ValueError, match="no last_c"):
        cbs.CrossCorrelationCallback().setup(None, NoAttention(), "fit")
