"""``dinokit demo``: every capability end to end on the embedded synthetic benchmark."""

from __future__ import annotations

from pathlib import Path

from . import command


@command("demo")
def demo(out: Path = Path("runs/demo"), seed: int = 0, stages: list[str] | None = None, n_images: int = 64,
         image_size: int = 64, device: str = "cpu", quick: bool = False) -> int:
    """Run every dinokit capability on the synthetic benchmark and write report.html + metrics.json.

    Args:
        out: output directory (figures/, metrics.json, report.html, data/).
        seed: seed of the benchmark, the model initialisation and every stage.
        stages: subset of stages to run, in order (default: all available).
        n_images: number of synthetic scenes per split.
        image_size: side of the square synthetic scenes in pixels (a multiple of 8).
        device: torch device for the models.
        quick: even smaller settings (used by the tests).
    """
    from ..demo import run_demo

    return run_demo(out, seed=seed, stages=stages, n_images=n_images, image_size=image_size, device=device,
                    quick=quick)
