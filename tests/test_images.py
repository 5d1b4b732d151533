"""Every image kind a Kaggle folder holds decodes to RGB uint8 (H, W, 3) with the right pixels."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data import ImageDataset, ImageReadError, read_image
from pipeline.data.device_input import DeviceInput
from pipeline.data.transforms import eval_transform, train_transform

H, W = 12, 16


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _half_alpha() -> np.ndarray:
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, : W // 2] = 0  # left half fully transparent
    return alpha


def test_rgb_png_jpeg_webp_bmp_tiff_gif(tmp_path, rgb):
    lossless = {"png": {}, "bmp": {}, "tif": {}, "webp": {"lossless": True}}
    for ext, kw in lossless.items():
        Image.fromarray(rgb).save(tmp_path / f"a.{ext}", **kw)
        out = read_image(tmp_path / f"a.{ext}")
        assert out.dtype == np.uint8 and out.shape == (H, W, 3), ext
        assert np.array_equal(out, rgb), ext
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (H, W, 3)
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")))
    # GIF is palette-quantised: compare with Pillow's reading of the same file.
    Image.fromarray(rgb).save(tmp_path / "a.gif")
    assert np.array_equal(read_image(tmp_path / "a.gif"), np.asarray(Image.open(tmp_path / "a.gif").convert("RGB")))


def test_grayscale_8_16_and_1_bit(tmp_path, rgb):
    gray = rgb[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (H, W, 3) and np.array_equal(out[:, :, 0], gray) and np.array_equal(out[:, :, 2], gray)

    gray16 = gray.astype(np.uint16) * 257  # full 16-bit range; top byte is the 8-bit value
    assert cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    assert np.array_equal(read_image(tmp_path / "g16.png")[:, :, 1], gray)

    Image.fromarray(gray > 127).save(tmp_path / "bw.png")
    out = read_image(tmp_path / "bw.png")
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 255}
    assert np.array_equal(out[:, :, 0] == 255, gray > 127)


def test_rgb_16_bit_png(tmp_path, rgb):
    assert cv2.imwrite(str(tmp_path / "c16.png"), cv2.cvtColor(rgb.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image(tmp_path / "c16.png"), rgb)


@pytest.mark.parametrize("ext", ["png", "webp"])
def test_rgba_is_composited_on_white(tmp_path, rgb, ext):
    Image.fromarray(np.dstack([rgb, _half_alpha()]), "RGBA").save(tmp_path / f"t.{ext}", lossless=True)
    out = read_image(tmp_path / f"t.{ext}")
    assert out.shape == (H, W, 3)
    assert (out[:, : W // 2] == 255).all()
    assert np.array_equal(out[:, W // 2:], rgb[:, W // 2:])


def test_grayscale_with_alpha(tmp_path, rgb):
    Image.fromarray(np.dstack([rgb[:, :, 1], _half_alpha()]), "LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert (out[:, : W // 2] == 255).all()
    assert np.array_equal(out[:, W // 2:, 0], rgb[:, W // 2:, 1])


def test_palette_with_and_without_transparency(tmp_path):
    pal = np.zeros((H, W), np.uint8)
    pal[:, W // 2:] = 1
    im = Image.fromarray(pal, "P")
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert (out[:, : W // 2] == [10, 20, 30]).all() and (out[:, W // 2:] == [200, 100, 50]).all()
    im.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent
    out = read_image(tmp_path / "pt.png")
    assert (out[:, : W // 2] == 255).all() and (out[:, W // 2:] == [200, 100, 50]).all()


def test_cmyk_jpeg_and_exif_orientation(tmp_path, rgb):
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == (H, W, 3)
    expected = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(out.astype(int) - expected).max() <= 2

    flat = np.zeros((H, W, 3), np.uint8)
    flat[: H // 2] = 255  # top half white: a rotation moves it to a side
    im = Image.fromarray(flat)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (W, H, 3)  # as viewers show it
    assert out[:, -2:].mean() > 200 and out[:, :2].mean() < 50


def test_float_tiff_via_opencv(tmp_path, rgb):
    assert cv2.imwrite(str(tmp_path / "f.tif"), cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2BGR))
    out = read_image(tmp_path / "f.tif")
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - rgb).max() <= 1


def test_non_ascii_path(tmp_path, rgb):
    folder = tmp_path / "blätter_叶子"
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "ahorn.png")
    assert np.array_equal(read_image(folder / "ahorn.png"), rgb)


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"", "empty file"),
    (b"definitely not an image", "not a readable image"),
    ("truncated", "not a readable image"),
])
def test_unreadable_files_raise_one_clear_error(tmp_path, rgb, content, message):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(rgb).save(path)
        path.write_bytes(path.read_bytes()[:40])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_dataset_transforms_and_cache(tmp_path, rgb):
    paths = []
    for i in range(3):
        Image.fromarray(np.roll(rgb, i, axis=1)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate=15, color_jitter=0.2, scale_min=0.5)
    train = ImageDataset(paths, [2, 0, 1], transform=train_transform(24, aug))
    x, y = train[0]
    # uint8 pixels: the loaders leave normalisation to the device (pipeline.data.device_input)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == 2

    test = ImageDataset(paths, transform=eval_transform(24, AugmentConfig()), cache=True)
    x, y = test[1]
    assert x.shape == (3, 24, 24) and y == -1
    assert torch.equal(test[1][0], x)  # eval is deterministic
    raw = ImageDataset(paths)
    img, _ = raw[1]
    assert img.shape == (H, W, 3) and img.dtype == torch.uint8
    test.paths[1] = str(tmp_path / "gone.png")  # served from the cache, not the disk
    assert torch.equal(test[1][0], x)
    with pytest.raises(ValueError, match="targets"):
        ImageDataset(paths, [0, 1])


def test_preload_fills_cache(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    ds = ImageDataset([tmp_path / "a.png"])
    ds.preload()
    (tmp_path / "a.png").unlink()
    assert np.array_equal(ds.load(0), rgb)


def test_eval_transform_resizes_crops_and_normalises(tmp_path):
    grey = np.full((20, 40, 3), 128, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    aug = AugmentConfig(eval_crop_pct=0.8)
    x, _ = ImageDataset([tmp_path / "grey.png"], transform=eval_transform(16, aug))[0]
    assert x.shape == (3, 16, 16)  # short side to 16 / 0.8 = 20, then a 16 px center crop
    expected = (128 / 255 - np.array(aug.mean)) / np.array(aug.std)
    x = DeviceInput(torch.device("cpu"), aug.mean, aug.std)(x[None])[0]
    assert np.allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=1e-3)
