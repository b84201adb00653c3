"""``dinokit demo``: every capability end to end on the embedded synthetic benchmark.

Each stage is a module ``dinokit.demo.<stage>`` with ``run(ctx: DemoContext) -> dict[str, float]``.
Stages add flat metric keys (``stage/...``), figures under ``ctx.out / "figures"`` and a report section.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from .context import DemoContext

STAGES: tuple[str, ...] = ("foundation", "evaluation", "rasa", "localisation", "barlow", "neco", "repalign")


def run_demo(out: Path = Path("runs/demo"), seed: int = 0, stages: list[str] | None = None, n_images: int = 64,
         image_size: int = 64, device: str = "cpu", quick: bool = False) -> int:
    """Run every stage (or ``stages``) on the synthetic benchmark; write report.html + metrics.json under ``out``.

    Args:
        out: output directory (figures/, metrics.json, report.html, data/).
        seed: seed of the benchmark, the model initialisation and every stage.
        stages: subset of stages to run, in order (default: all available).
        n_images: number of synthetic scenes per split.
        image_size: side of the square synthetic scenes in pixels (a multiple of 8).
        device: torch device for the models.
        quick: even smaller settings (used by the tests).
    """
    from rich.console import Console

    console = Console()
    chosen = list(stages or STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; choose from {list(STAGES)}")
    ctx = DemoContext(Path(out), seed=seed, n_images=n_images, image_size=image_size, device=device,
                      quick=quick, console=console)
    timings: dict[str, float] = {}
    for stage in chosen:
        try:
            mod = importlib.import_module(f"dinokit.demo.{stage}")
        except ModuleNotFoundError as err:
            if err.name == f"dinokit.demo.{stage}":
                console.print(f"[yellow]demo stage {stage!r} is not available in this version[/]")
                continue
            raise
        console.rule(f"demo: {stage}")
        t0 = time.perf_counter()
        ctx.seed_everything(stage)
        metrics = mod.run(ctx) or {}
        timings[stage] = round(time.perf_counter() - t0, 2)
        ctx.metrics.update({k if k.startswith(f"{stage}/") else f"{stage}/{k}": v for k, v in metrics.items()})
        ctx.write_outputs(timings)
    ctx.write_outputs(timings)
    console.print(f"wrote {ctx.out / 'report.html'} and {ctx.out / 'metrics.json'}")
    console.print(json.dumps({k: v for k, v in ctx.metrics.items()}, indent=1, default=str)[:4000])
    return 0
