"""Attention-density crops: images/s of five pipelines, measured in the same run with the same tiny backbone.

(i)   the reference design: a B = 1 backbone forward per sample inside ``Dataset.__getitem__``;
(ii)  design A (dinokit): uint8 canvases from the loader, one batched backbone forward + vectorised sampling +
      roi_align crops per batch on the device (``OnlineDensityCrops``);
(iii) design B (dinokit): precomputed patch-resolution maps (``DensityCache``), CPU sampling in ``__getitem__``;
(iv)  plain RandomResizedCrop plus one backbone forward per batch (the cost floor of any online design);
(v)   plain RandomResizedCrop.
No colour augmentation (it is the same in every pipeline). Run: ``.venv/bin/python benchmarks/bench_density_crops.py``
(``--device cuda`` on a GPU machine, where the forwards of (ii) and (iv) both run under bf16 autocast; ``--json PATH``
also writes the figures).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dinokit.backbones import load_backbone
from dinokit.data import crops as C
from dinokit.data.synthetic import SyntheticScenes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_figures  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x.float().div(255.0), list(MEAN), list(STD))


class PerSample(Dataset):
    """(i): the backbone runs on one image at a time inside the dataset."""

    def __init__(self, images, bb, cfg: C.DensityConfig, out: int):
        self.images, self.bb, self.cfg, self.out = images, bb, cfg, out
        self.bm = torch.tensor(bb.mean).view(1, 3, 1, 1)
        self.bs = torch.tensor(bb.std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def __getitem__(self, i: int):
        x = self.images[i]
        H, W = x.shape[-2:]
        a = self.cfg.att_size
        xa = (TF.resize(x, [a, a], antialias=True).float()[None] / 255 - self.bm) / self.bs
        P = C.density_map(self.bb.attention(xa, block=self.cfg.block).cls)
        sizes = torch.tensor([[H, W]], dtype=torch.float64)
        s = C.sample_density_crops(P, sizes, C.density_uniforms(1))
        t, lf, h, w = C.round_crops(s["crops"], sizes)[0].tolist()
        y = TF.resized_crop(x, t, lf, h, w, [self.out, self.out], antialias=True)
        return _norm(y.flip(-1) if bool(s["flip"][0]) else y)


class Canvas(Dataset):
    def __init__(self, images, canvas: int):
        self.images, self.canvas = images, canvas

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        c, v = C.canvas_image(self.images[i], self.canvas)
        return c, torch.tensor(v)


class Cached(Dataset):
    def __init__(self, images, ids, cache: C.DensityCache):
        self.images, self.ids, self.cache = images, ids, cache

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return _norm(self.cache.crop(self.images[i], self.ids[i])[0])


class RRC(Dataset):
    def __init__(self, images, out: int):
        self.images = images
        self.t = v2.Compose([v2.RandomResizedCrop(out, antialias=True), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return _norm(self.t(self.images[i]))


def timed(loader, per_batch=None, device="cpu") -> float:
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        if per_batch is not None:
            per_batch(batch)
        else:
            batch.to(device)
        n += len(batch[0]) if isinstance(batch, list | tuple) else len(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="images per pipeline")
    ap.add_argument("--size", type=int, default=128, help="side of the synthetic images")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", default="tiny_dino")
    ap.add_argument("--att_size", type=int, default=64)
    ap.add_argument("--out", type=int, default=64, help="crop side fed to the classifier")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per_sample_n", type=int, default=128, help="images for the slow per-sample design (i)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    scenes = SyntheticScenes(args.n, (args.size, args.size), seed=0, fine_grained=True)
    images = [torch.from_numpy(scenes[i].image).permute(2, 0, 1).contiguous() for i in range(args.n)]
    ids = [str(i) for i in range(args.n)]
    bb = load_backbone(args.backbone, weights="random").eval()
    cfg = C.DensityConfig(att_size=args.att_size, canvas=args.size)
    print(f"backbone {args.backbone} (random weights), {args.n} images of {args.size}px, batch {args.batch}, "
          f"att {args.att_size}px, crops {args.out}px, device {dev}, torch threads {torch.get_num_threads()}")

    ips = {}
    # (i) per-sample forward in __getitem__ (CPU backbone inside the dataset, as the reference's workers)
    ips["i_per_sample_getitem"] = timed(DataLoader(PerSample(images[:args.per_sample_n], bb, cfg, args.out),
                                                   args.batch), device=dev)
    # (ii) design A
    bb_dev = load_backbone(args.backbone, weights="random", device=dev).eval()
    bb_dev.load_state_dict(bb.state_dict())
    online = C.OnlineDensityCrops(bb_dev, args.out, cfg, MEAN, STD).to(dev)
    warm = dev.startswith("cuda")  # GPU: one untimed batch per device pipeline (CUDA context, cuDNN, kernels)
    if warm:
        c0, v0 = next(iter(DataLoader(Canvas(images[:args.batch], args.size), args.batch)))
        online(c0.to(dev), v0.to(dev))

    def run_a(batch):
        c, v = batch
        online(c.to(dev, non_blocking=True), v.to(dev))

    ips["ii_online_batched"] = timed(DataLoader(Canvas(images, args.size), args.batch), run_a, dev)
    # (iii) design B
    t0 = time.perf_counter()
    path = C.build_density_cache(bb_dev, [im.permute(1, 2, 0).numpy() for im in images], ids,
                                 "/tmp/bench_density_cache.safetensors", batch_size=args.batch, device=dev)
    build_s = time.perf_counter() - t0
    cache = C.DensityCache(path, cfg=cfg, out_size=args.out)
    ips["iii_cache_getitem"] = timed(DataLoader(Cached(images, ids, cache), args.batch), device=dev)
    # (iv) RRC + one forward per batch
    bm = torch.tensor(bb.mean, device=dev).view(1, 3, 1, 1)
    bs = torch.tensor(bb.std, device=dev).view(1, 3, 1, 1)

    @torch.no_grad()
    def run_iv(x):
        x = x.to(dev)
        xa = torch.nn.functional.interpolate(x, size=(args.att_size,) * 2, mode="bilinear", antialias=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):  # as design A's forward
            bb_dev.attention((xa * torch.tensor(STD, device=dev).view(1, 3, 1, 1)
                              + torch.tensor(MEAN, device=dev).view(1, 3, 1, 1) - bm) / bs)

    if warm:
        run_iv(next(iter(DataLoader(RRC(images[:args.batch], args.out), args.batch))))
    ips["iv_rrc_plus_forward"] = timed(DataLoader(RRC(images, args.out), args.batch), run_iv, dev)
    ips["v_rrc"] = timed(DataLoader(RRC(images, args.out), args.batch), device=dev)
    for k, v in ips.items():
        print(f"{k:24s} {v:10.1f} images/s")
    print(f"cache build: {build_s:.2f} s for {args.n} images ({path.stat().st_size / args.n:.0f} bytes/image)")
    r = ips["ii_online_batched"] / ips["i_per_sample_getitem"]
    print(f"(ii) / (i)  = {r:.1f}x  (goal >= 10x on CPU)")
    print(f"(iii) / (v) = {ips['iii_cache_getitem'] / ips['v_rrc']:.2f}  (goal >= 0.9)")
    t_v, t_iv, t_ii = (1 / ips[k] for k in ("v_rrc", "iv_rrc_plus_forward", "ii_online_batched"))
    print(f"A's overhead over (v) / ((iv) - (v)) = {(t_ii - t_v) / max(t_iv - t_v, 1e-12):.2f}  (goal <= 1.2)")
    print("per-image seconds:", {k: float(np.round(1 / v, 6)) for k, v in ips.items()})
    if args.json:
        write_figures(args.json, "bench_density_crops", args, {
            "images_per_s": ips, "cache_build_s": build_s, "cache_bytes_per_image": path.stat().st_size / args.n,
            "online_over_per_sample": r, "cache_over_rrc": ips["iii_cache_getitem"] / ips["v_rrc"],
            "online_overhead_over_forward_floor": (t_ii - t_v) / max(t_iv - t_v, 1e-12)})


if __name__ == "__main__":
    main()
