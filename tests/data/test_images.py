"""load_rgb on every awkward and bad image case, created on disk."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dinokit.data.images import BadImageError, check_image, list_images, load_rgb


def _blocks(h: int = 16, w: int = 24) -> np.ndarray:
    """Left half red, right half blue (JPEG-robust)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (220, 20, 20)
    a[:, w // 2:] = (20, 20, 220)
    return a


def _png16_rgb(path, arr: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot write 48-bit PNGs)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_rgb_jpeg_roundtrip(tmp_path):
    p = tmp_path / "a.jpg"
    Image.fromarray(_blocks()).save(p, quality=95, subsampling=0)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (24, 16)
    assert np.abs(np.asarray(im).astype(int) - _blocks()).mean() < 5


def test_grayscale_and_bilevel(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    a = np.asarray(load_rgb(tmp_path / "g.png"))
    assert a.shape == (8, 8, 3) and (a == g[..., None]).all()
    Image.fromarray(g > 100).convert("1").save(tmp_path / "b.png")
    b = np.asarray(load_rgb(tmp_path / "b.png"))
    assert set(np.unique(b)) <= {0, 255} and (b[..., 0] == np.where(g > 100, 255, 0)).all()


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[0, :, 3] = 255
    a[1, :, 3] = 128
    a[2:, :, 3] = 0
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png")).astype(int)
    assert (out[0] == (200, 100, 50)).all()
    assert (out[1] == np.round(np.array([200, 100, 50]) * 128 / 255)).all()
    assert (out[2:] == 0).all()
    la = Image.fromarray(a[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    assert (np.asarray(load_rgb(tmp_path / "la.png"))[2:] == 0).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert (out[0, 0] == 0).all() and (out[1, 1] == (200, 100, 50)).all()


def test_16bit_gray_png_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))[0, :, 0]
    assert out.tolist() == [0, 1, 4, 128, 255]  # round(v / 257); clipping would give 255 for 1000 and 32768


def test_16bit_rgb_png(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0, 0] = (65535, 0, 32896)
    arr[1, 2] = (257 * 10, 257 * 200, 257 * 77)
    _png16_rgb(tmp_path / "c16.png", arr)
    out = np.asarray(load_rgb(tmp_path / "c16.png")).astype(int)
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 0, 128] and out[1, 2].tolist() == [10, 200, 77]


def test_cmyk_jpeg(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255  # pure cyan
    Image.fromarray(a, "CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(load_rgb(tmp_path / "c.jpg")).astype(int)
    assert out.shape == (8, 8, 3)
    assert np.abs(out.mean((0, 1)) - (0, 255, 255)).max() < 12


def test_exif_rotated_photo(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(_blocks(16, 24)).save(p, quality=95, exif=exif)
    im = load_rgb(p)
    assert im.size == (16, 24)  # width and height swapped
    a = np.asarray(im).astype(int)
    assert a[:12, :, 0].mean() > 150 and a[:12, :, 2].mean() < 80  # the stored left (red) half is now on top
    assert a[12:, :, 2].mean() > 150


def test_multiframe_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = np.asarray(load_rgb(tmp_path / "a.gif"))
    assert out.shape == (6, 6, 3) and out[..., 0].mean() > 200


@pytest.mark.parametrize("case", ["zero", "truncated", "garbage_middle", "not_image", "missing", "tiny"])
def test_bad_images_raise_named_error(tmp_path, case):
    p = tmp_path / f"{case}.jpg"
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    expect = {"zero": "0-byte", "truncated": "truncated", "garbage_middle": "corrupt", "not_image": "not an image",
              "missing": "cannot read", "tiny": "smaller than"}[case]
    if case == "zero":
        p.write_bytes(b"")
    elif case == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif case == "garbage_middle":
        p.write_bytes(data[:200] + b"\xff\xd9" + bytes(50) + data[400:])
    elif case == "not_image":
        p.write_text("this is not an image\n")
    elif case == "tiny":
        Image.new("RGB", (4, 6)).save(p)
    with pytest.raises(BadImageError) as ei:
        load_rgb(p, min_size=8)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.path == str(p) and str(p) in str(err) and expect in str(err)
    assert check_image(p, min_size=8) == err.reason


def test_min_size_boundary(tmp_path):
    Image.new("RGB", (8, 9)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png", min_size=8).size == (8, 9)
    assert check_image(tmp_path / "a.png", min_size=9) is not None


def test_list_images_sorted_recursive(tmp_path):
    for rel in ("b/2.PNG", "a/1.jpg", "a/sub/0.jpeg", "z.webp", "notes.txt", ".hidden/x.jpg", "a/.y.png"):
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a/1.jpg", "a/sub/0.jpeg", "b/2.PNG", "z.webp"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_32bit_and_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(load_rgb(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]  # [0, 1] floats x 255
    Image.fromarray(np.array([[0, 65535]], np.int32), "I").save(tmp_path / "i16.tif")
    assert np.asarray(load_rgb(tmp_path / "i16.tif"))[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.full((4, 4), 70000, np.int32), "I").save(tmp_path / "i32.tif")
    with pytest.raises(BadImageError, match="8-bit RGB.*not 16-bit"):  # beyond 16 bits: refused, not clipped
        load_rgb(tmp_path / "i32.tif")


def test_list_images_survives_symlink_cycle(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "d" / "x.png")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    assert [p.name for p in list_images(tmp_path / "d")] == ["x.png"]
