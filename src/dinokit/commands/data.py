"""``dinokit synth``: write the synthetic benchmark in the VOC-style and CUB-style layouts."""

from __future__ import annotations

from pathlib import Path

from . import command, group

group("data", "Prepare datasets (COCO-Things-12 and other derived layouts)")


@command("synth")
def synth(out: Path = Path("synthetic"), n_train: int = 64, n_val: int = 64, size: int = 96, seed: int = 0,
          layouts: str = "voc,cub", image_format: str = "jpg", overwrite: bool = False) -> int:
    """Render the synthetic benchmark to disk (VOC-style segmentation and CUB-style fine-grained layouts).

    Writes ``<out>/voc`` (coarse shapes: 7 semantic classes), ``<out>/cub`` (fine-grained marks: 5 image classes,
    one box each) and ``<out>/summary.json``. Same seed -> byte-identical files.

    Args:
        out: output folder.
        n_train: training images per layout (CUB: official train).
        n_val: validation images per layout (CUB: official test).
        size: image side in pixels (square, >= 16).
        seed: benchmark seed; scene i of seed s depends only on (s, i).
        layouts: comma-separated layouts to write: voc, cub.
        image_format: jpg (as the real datasets; quality 95, 4:4:4) or png (exact pixels).
        overwrite: replace existing layout folders.
    """
    from ..data.layouts import summary_json, write_cub_layout, write_voc_layout
    from ..io import atomic_write_text

    wanted = [s.strip() for s in layouts.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {"voc", "cub"})
    if unknown or not wanted:
        raise ValueError(f"--layouts: unknown layout(s) {unknown or wanted}; choose from voc, cub (comma-separated)")
    out = Path(out)
    summaries = []
    for name in wanted:
        writer = write_voc_layout if name == "voc" else write_cub_layout
        summaries.append(writer(out / name, n_train, n_val, (size, size), seed=seed,
                                fine_grained=name == "cub", image_format=image_format, overwrite=overwrite))
        print(f"wrote {name} layout to {out / name}")
    atomic_write_text(out / "summary.json", summary_json(summaries))
    print(f"summary: {out / 'summary.json'}")
    return 0


@command("data prepare")
def prepare(dataset: str = "coco-things12", root: Path = Path("coco"), split: str = "train", overwrite: bool = False,
            seed: int = 0) -> int:
    """Convert a dataset's annotations once into the form its loader reads fastest.

    ``coco-things12``: panoptic PNGs -> ``annotations/things12_<split>2017/`` class maps (see
    ``dinokit.data.datasets.prepare_coco_things12``).

    Args:
        dataset: dataset key; only coco-things12 needs preparing.
        root: dataset root (the COCO folder with annotations/).
        split: train or val.
        overwrite: rebuild an existing prepared folder.
        seed: unused (every command takes a seed); the conversion is deterministic.
    """
    from ..data.datasets import prepare_coco_things12

    if dataset != "coco-things12":
        raise ValueError(f"dataset {dataset!r} needs no preparation; only coco-things12 does")
    out = prepare_coco_things12(root, split, overwrite=overwrite)
    print(f"wrote {out}")
    return 0
