"""State shared by the demo stages: paths, seed, the synthetic benchmark, metrics and the report."""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_text, run_metadata


@dataclass
class Section:
    title: str
    text: str = ""
    images: list[str] = field(default_factory=list)
    table: dict[str, object] | None = None


class DemoContext:
    """What a stage receives. ``out``: run folder; ``figures``: its figures folder; ``metrics``: flat dict."""

    def __init__(self, out: Path, seed: int, n_images: int, image_size: int, device: str, quick: bool,
                 console=None):
        self.out = out
        self.figures = out / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.data_root = out / "data"
        self.seed, self.n_images, self.image_size, self.device, self.quick = seed, n_images, image_size, device, quick
        self.console = console
        self.metrics: dict[str, object] = {}
        self.sections: list[Section] = []
        self.cache: dict[str, object] = {}  # stages may share expensive artefacts (features, models)

    # -------------------------------------------------------------- helpers for stages
    def seed_everything(self, stage: str = "") -> int:
        """Seed torch/numpy from the run seed and the stage name (stable across runs)."""
        s = (self.seed * 1_000_003 + int(hashlib.sha1(stage.encode()).hexdigest()[:6], 16)) % (2**31)
        torch.manual_seed(s)
        np.random.seed(s)
        return s

    def log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def section(self, title: str, text: str = "", images: list[Path | str] | None = None,
                table: dict[str, object] | None = None) -> None:
        """Add a report section; images are paths inside ``out``."""
        rel = [str(Path(p).resolve().relative_to(self.out.resolve())) for p in images or []]
        self.sections.append(Section(title, text, rel, table))

    # -------------------------------------------------------------- outputs
    def write_outputs(self, timings: dict[str, float]) -> None:
        meta = run_metadata(config={"seed": self.seed, "n_images": self.n_images, "image_size": self.image_size,
                                    "device": self.device, "quick": self.quick}, protocol="demo")
        payload = {**self.metrics, "meta": {**meta, "stage_seconds": timings}}
        atomic_write_text(self.out / "metrics.json", json.dumps(payload, indent=1, default=str))
        atomic_write_text(self.out / "report.html", self._html(timings))

    def _html(self, timings: dict[str, float]) -> str:
        parts = ["<!doctype html><html><head><meta charset='utf-8'><title>dinokit demo</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%;"
                 "border:1px solid #ccc;margin:4px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
                 "padding:2px 8px;text-align:right}</style></head><body><h1>dinokit demo</h1>",
                 f"<p>seed {self.seed}, {self.n_images} scenes of {self.image_size}&sup2; px; stage seconds: "
                 f"{html.escape(json.dumps(timings))}</p>"]
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            if s.text:
                parts.append(f"<p>{html.escape(s.text)}</p>")
            if s.table:
                rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                               for k, v in s.table.items())
                parts.append(f"<table>{rows}</table>")
            parts.extend(f"<img src='{html.escape(p)}'>" for p in s.images)
        parts.append("</body></html>")
        return "\n".join(parts)


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
