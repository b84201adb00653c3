"""`dinokit features` / `dinokit attention`: shards, resume, DDP, bad files."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from dinokit.backbones import load_backbone
from dinokit.backbones.extract import extract_features
from dinokit.backbones.shards import load_feature_dir, read_shard
from dinokit.cli import main
from dinokit.data.sources import ImageInput
from dinokit.data.synthetic import render_scene

SIZE = 32  # tiny_dino has p 16 -> 2x2 grid


def _images(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(render_scene(3, i, (40, 48)).image).save(root / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    bb = load_backbone("tiny_dino", "random")
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("w") / "tiny_dino.safetensors"
    save_file(bb.model.state_dict(), str(path))
    return path


def _bb(weights: Path):
    return load_backbone("tiny_dino", str(weights)).eval()


def _shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: read_shard(p)[0] for p in sorted(out.glob("shard-*.safetensors"))}


def _assert_same(a: Path, b: Path) -> None:
    sa, sb = _shards(a), _shards(b)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for t in sa[k]:
            assert torch.equal(sa[k][t], sb[k][t]), (k, t)


def test_shards_hold_every_token_kind(tmp_path, weights):
    root = _images(tmp_path / "imgs", 7)
    out = tmp_path / "f"
    extract_features(_bb(weights), ImageInput(root, (SIZE, 48)), out, batch_size=3, shard_size=4, progress=False)
    fs = load_feature_dir(out, expect_backbone="tiny_dino", expect_grid=(2, 3))
    assert fs.patch.shape == (7, 2, 3, 32) and fs.cls.shape == (7, 32) and fs.registers.shape == (7, 0, 32)
    assert fs.image_ids == [f"img{i:03d}.png" for i in range(7)]
    # the stored tokens are the backbone's own output for the same (resized) pixels
    bb = _bb(weights)
    img = Image.open(root / "img004.png").convert("RGB").resize((48, SIZE), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        f = bb.forward_features(x)
    assert torch.allclose(fs.patch[4], f.patch[0], atol=1e-5) and torch.allclose(fs.cls[4], f.cls[0], atol=1e-5)
    with pytest.raises(ValueError, match="backbone"):
        load_feature_dir(out, expect_backbone="dinov2_vits14")
    with pytest.raises(ValueError, match="grid"):
        load_feature_dir(out, expect_grid=(4, 4))


def test_kill_and_resume_gives_identical_shards(tmp_path, weights, monkeypatch):
    root = _images(tmp_path / "imgs", 9)
    ref = tmp_path / "ref"
    extract_features(_bb(weights), ImageInput(root, (SIZE, SIZE)), ref, batch_size=2, shard_size=3, progress=False)
    import dinokit.backbones.extract as cmd

    real = cmd.write_shard
    calls = {"n": 0}

    def killed_mid_write(path, tensors, ids, meta):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard dies half-way through its write
            from safetensors.torch import save_file

            from dinokit.io import atomic_path

            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
                tmp.write_bytes(tmp.read_bytes()[:50])
                raise KeyboardInterrupt
        real(path, tensors, ids, meta)

    out = tmp_path / "resumed"
    monkeypatch.setattr(cmd, "write_shard", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        extract_features(_bb(weights), ImageInput(root, (SIZE, SIZE)), out, batch_size=2, shard_size=3,
                         progress=False)
    assert [p.name for p in out.iterdir()] == ["shard-00000.safetensors"]  # no partial shard, no temp file
    monkeypatch.setattr(cmd, "write_shard", real)
    summary = extract_features(_bb(weights), ImageInput(root, (SIZE, SIZE)), out, batch_size=2, shard_size=3,
                               progress=False)
    assert summary["written"] == 2  # the finished shard was kept
    _assert_same(ref, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, weights: str, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    torch.set_num_threads(1)
    try:
        extract_features(_bb(Path(weights)), ImageInput(Path(root), (SIZE, SIZE)), Path(out), batch_size=2,
                         shard_size=2, progress=False)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_ddp_equals_one_process(tmp_path, weights):
    root = _images(tmp_path / "imgs", 7)
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the workers, so results are bit-identical
    try:
        extract_features(_bb(weights), ImageInput(root, (SIZE, SIZE)), one, batch_size=2, shard_size=2,
                         progress=False)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(weights), str(root), str(two)), nprocs=2, join=True)
    _assert_same(one, two)


def _bad_folder(root: Path) -> dict[str, bool]:
    """Every awkward kind of file; value = should be read (True) or reported bad (False)."""
    root.mkdir(parents=True)
    rgb = render_scene(1, 0, (40, 40)).image
    Image.fromarray(rgb).save(root / "good.png")
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(rgb).save(root / "corrupt.jpg")
    data = (root / "corrupt.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(rgb[:5, :5]).save(root / "tiny.png")
    return {"good.png": True, "gray.png": True, "rgba.png": True, "deep16.png": True, "cmyk.jpg": True,
            "rotated.jpg": True, "corrupt.jpg": False, "empty.jpg": False, "tiny.png": False}


def test_bad_files_named_and_exit_code(tmp_path, weights, capsys):
    expect = _bad_folder(tmp_path / "imgs")
    out = tmp_path / "f"
    args = ["features", "--data", str(tmp_path / "imgs"), "--out", str(out), "--backbone", "tiny_dino",
            "--weights", str(weights), "--size", str(SIZE), "--batch_size", "4", "--num_workers", "0"]
    assert main(args) == 1
    listed = dict(line.split("\t", 1) for line in (out / "bad_files.txt").read_text().splitlines())
    assert set(listed) == {k for k, ok in expect.items() if not ok}
    assert "smaller than one 16-px patch" in listed["tiny.png"]
    assert "bad file: empty.jpg" in capsys.readouterr().out
    fs = load_feature_dir(out)
    assert sorted(fs.image_ids) == sorted(k for k, ok in expect.items() if ok)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert main(args + ["--skip-bad"]) == 0  # resume: nothing recomputed, bad files still named


def test_cli_help_and_config(tmp_path, weights, capsys):
    with pytest.raises(SystemExit) as e:
        main(["features", "--help"])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out
    root = _images(tmp_path / "imgs", 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {root}\nout: {tmp_path / 'x'}\nbackbone: tiny_dino\nweights: {weights}\nsize: 48\n"
                   "num_workers: 0\n")
    assert main(["features", "--config", str(cfg), "--size", "32"]) == 0  # the override wins
    assert load_feature_dir(tmp_path / "x").grid == (2, 2)
    with pytest.raises(SystemExit):
        main(["features", "--config", str(cfg), "--not_an_option", "1"])


def test_attention_command_writes_figures(tmp_path, weights):
    root = _images(tmp_path / "imgs", 2)
    assert main(["attention", "--images", str(root), "--out", str(tmp_path / "a"), "--backbone", "tiny_dino",
                 "--weights", str(weights), "--size", "[64, 48]"]) == 0
    assert len(list((tmp_path / "a").glob("*_attention.png"))) == 2


def test_shard_of_only_bad_files_keeps_grid_and_bookkeeping(tmp_path, weights):
    root = _images(tmp_path / "imgs", 2)
    (root / "img000.png").write_bytes(b"")  # shard 0 holds only this bad file
    out = tmp_path / "f"
    s = extract_features(_bb(weights), ImageInput(root, (SIZE, SIZE)), out, batch_size=1, shard_size=1,
                         progress=False)
    assert s["n_shards"] == 2 and [b[0] for b in s["bad"]] == ["img000.png"]
    fs = load_feature_dir(out)
    assert fs.grid == (2, 2) and fs.image_ids == ["img001.png"] and fs.patch.shape == (1, 2, 2, 32)
