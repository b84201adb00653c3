"""What the dinokit trainers share: Trainer settings, learning-rate schedules, LARS and parameter groups."""

from __future__ import annotations

from pathlib import Path


def trainer_kwargs(accelerator: str, devices: int, precision: str, max_epochs: int, out: Path,
                   max_steps: int = -1) -> dict:
    """Common Trainer settings of the dinokit training commands (CSV logger under ``out``)."""
    from lightning.pytorch.loggers import CSVLogger

    kw: dict = dict(max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=devices,
                    precision=precision, default_root_dir=str(out), logger=CSVLogger(str(out), name="logs"),
                    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                    num_sanity_val_steps=0)
    if devices > 1:
        kw["strategy"] = "ddp"
        kw["sync_batchnorm"] = accelerator in ("gpu", "cuda")
    return kw
