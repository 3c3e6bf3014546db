"""Image loading in every common mode, and the batching of `images` arguments."""
import numpy as np
import pytest
import torch
from PIL import Image

from stnpadim_ext.data.images import (
    as_float,
    check_batch,
    decode_image,
    iter_batches,
    iter_image_batches,
    list_images,
    load_image,
    resize,
)
from stnpadim_ext.errors import InputError


@pytest.fixture
def rng():
    return np.random.default_rng()


def _rgb_equal(tensor, expected_hw3):
    assert tensor.shape == (3,) + expected_hw3.shape[:2] and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor.permute(1, 2, 0), torch.from_numpy(expected_hw3).float(),
                               atol=1e-6, rtol=0)


def test_rgb_and_grayscale(tmp_path, rng):
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    _rgb_equal(load_image(tmp_path / "rgb.png"), rgb / 255.0)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    _rgb_equal(load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, 2) / 255.0)
    Image.fromarray(grey > 127).save(tmp_path / "bits.png")  # mode "1"
    _rgb_equal(load_image(tmp_path / "bits.png"), np.repeat((grey > 127)[..., None], 3, 2) * 1.0)


def test_rgba_and_la_composite_onto_black(tmp_path, rng):
    rgba = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    alpha = rgba[..., 3:] / 255.0
    expected = rgba[..., :3] / 255.0 * alpha
    got = load_image(tmp_path / "rgba.png")
    assert (got.permute(1, 2, 0).numpy() - expected).__abs__().max() <= 1.5 / 255  # 8-bit blend
    la = rgba[..., [0, 3]]
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    expected = np.repeat(la[..., :1] / 255.0 * la[..., 1:] / 255.0, 3, 2)
    assert (load_image(tmp_path / "la.png").permute(1, 2, 0).numpy() - expected).__abs__().max() <= 1.5 / 255


def test_16_bit_grayscale_uses_its_full_range(tmp_path, rng):
    values = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    values[0, 0] = 100  # a dark 16-bit image must not be read as 8-bit
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    _rgb_equal(load_image(tmp_path / "deep.png"), np.repeat(values[..., None], 3, 2) / 65535.0)
    dark = (values // 1000).astype(np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    _rgb_equal(load_image(tmp_path / "dark.png"), np.repeat(dark[..., None], 3, 2) / 65535.0)


def test_palette_images(tmp_path, rng):
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    img.save(tmp_path / "pal.png")
    _rgb_equal(load_image(tmp_path / "pal.png"), palette[index] / 255.0)
    img.info["transparency"] = int(index[0, 0])
    img.save(tmp_path / "pal_t.png", transparency=int(index[0, 0]))
    expected = np.where((index == index[0, 0])[..., None], 0.0, palette[index] / 255.0)
    _rgb_equal(load_image(tmp_path / "pal_t.png"), expected)


def test_resize_and_jpeg(tmp_path, rng):
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    assert load_image(tmp_path / "a.jpg", size=16).shape == (3, 16, 16)
    assert load_image(tmp_path / "a.jpg", size=(8, 12)).shape == (3, 8, 12)
    flat = np.full((20, 20, 3), 77, np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    torch.testing.assert_close(load_image(tmp_path / "flat.png", size=7), torch.full((3, 7, 7), 77 / 255))


def test_bad_files(tmp_path, rng):
    with pytest.raises(InputError, match="missing.png: no such image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputError, match="zero.png: empty file"):
        load_image(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(InputError, match="text.png: not a readable image"):
        load_image(tmp_path / "text.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="cut.png: not a readable image"):
        load_image(tmp_path / "cut.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg: not a readable image"):
        load_image(tmp_path / "cut.jpg")


def test_bytes_decode_like_the_file(tmp_path, rng):
    """An upload's bytes go through the same checks and decoders as the file (serve)."""
    pixels = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    for name, options in (("a.png", {}), ("a.jpg", {"quality": 90}), ("a.webp", {"lossless": True})):
        Image.fromarray(pixels).save(tmp_path / name, **options)
        data = (tmp_path / name).read_bytes()
        for size in (None, (64, 96)):
            from_file, source = decode_image(tmp_path / name, size)
            from_bytes, source_bytes = decode_image(data, size)
            assert source == source_bytes == (300, 200) and torch.equal(from_file, from_bytes)
    with pytest.raises(InputError, match="^upload: empty file"):
        decode_image(b"", name="upload")
    with pytest.raises(InputError, match="^image: not a readable image"):
        decode_image(b"not an image at all")


def test_list_images_and_folder_batches(tmp_path, rng):
    with pytest.raises(InputError, match="no such folder"):
        list_images(tmp_path / "nope")
    with pytest.raises(InputError, match="no images found"):
        list_images(tmp_path)
    for name in ("b.png", "a.png", "c.PNG"):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png", "c.PNG"]
    batches = list(iter_batches(tmp_path, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 1] and batches[0].shape[1:] == (3, 6, 6)
    Image.fromarray(rng.integers(0, 256, (9, 6, 3), dtype=np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(InputError, match="different sizes"):
        list(iter_batches(tmp_path, batch_size=8))
    assert next(iter_batches(tmp_path, batch_size=8, size=5)).shape == (4, 3, 5, 5)


def test_tensor_and_iterable_inputs():
    x = torch.rand(5, 3, 8, 8)
    assert [b.shape[0] for b in iter_batches(x, batch_size=2)] == [2, 2, 1]
    assert next(iter_batches(torch.rand(3, 8, 8))).shape == (1, 3, 8, 8)
    assert next(iter_batches(torch.rand(2, 1, 8, 8))).shape == (2, 3, 8, 8)
    loader = [{"image": x[:2], "mask": None}, (x[2:], torch.zeros(3))]
    assert [b.shape[0] for b in iter_batches(loader)] == [2, 3]
    assert check_batch(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)).dtype == torch.uint8
    with pytest.raises(InputError, match="float tensor in \\[0, 1\\] or a uint8"):
        check_batch(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(InputError, match="channels"):
        check_batch(torch.zeros(1, 4, 4, 4))
    with pytest.raises(InputError, match="empty"):
        list(iter_batches([]))
    with pytest.raises(InputError, match="'image' key"):
        list(iter_batches([{"img": x}]))


def _mixed_folder(folder, rng, n=7, size=(40, 48)):
    """n files of one size in several formats and modes (8-bit RGB, JPEG, RGBA, 16-bit grey)."""
    for i in range(n):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        kind = i % 4
        if kind == 0:
            Image.fromarray(pixels).save(folder / f"{i}.png")
        elif kind == 1:
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        elif kind == 2:
            alpha = rng.integers(0, 256, (*size, 1), dtype=np.uint8)
            Image.fromarray(np.concatenate([pixels, alpha], 2), "RGBA").save(folder / f"{i}.png")
        else:
            Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(folder / f"{i}.png")
    return list_images(folder)


def test_parallel_pipeline_equals_sequential_decoding(tmp_path, rng):
    paths = _mixed_folder(tmp_path, rng)
    for size in (None, 16, (20, 12)):
        batches = list(iter_batches(tmp_path, batch_size=3, size=size))
        assert [b.shape[0] for b in batches] == [3, 3, 1]
        got = torch.cat([as_float(b) for b in batches])
        torch.testing.assert_close(got, torch.stack([load_image(p, size) for p in paths]), rtol=0, atol=0)
    only_8bit = [p for i, p in enumerate(paths) if i % 4 != 3]
    batch = next(iter_batches(only_8bit, batch_size=8))
    assert batch.dtype == torch.uint8 and batch.is_contiguous(memory_format=torch.channels_last)
    # file_size: decoded straight to it, each batch still knows the files' own size.
    batches = list(iter_image_batches(paths, batch_size=4, file_size=10))
    assert [tuple(b.images.shape) for b in batches] == [(4, 3, 10, 10), (3, 3, 10, 10)]
    assert {b.source_size for b in batches} == {(40, 48)}


def test_pipeline_names_the_bad_file(tmp_path, rng):
    paths = _mixed_folder(tmp_path, rng, n=6)
    (tmp_path / "4.png").write_bytes(b"not an image")
    batches = iter_batches(paths, batch_size=2, size=8)
    assert next(batches).shape == (2, 3, 8, 8)
    assert next(batches).shape == (2, 3, 8, 8)
    with pytest.raises(InputError, match=r"4\.png: not a readable image"):
        next(batches)
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "4.png")
    with pytest.raises(InputError, match="different sizes"):
        list(iter_image_batches(paths, batch_size=6, file_size=8))


def test_reduce_on_decode_matches_a_full_decode(tmp_path):
    ys, xs = np.mgrid[0:512, 0:768]
    smooth = np.stack([ys / 2, xs / 3, (ys + xs) / 5], 2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "big.png")
    for name in ("big.jpg", "big.png"):
        image, source = decode_image(tmp_path / name, (64, 96))
        assert source == (512, 768) and image.shape == (3, 64, 96) and image.dtype == torch.uint8
        full = resize(load_image(tmp_path / name)[None], (64, 96))[0]
        assert (as_float(image) - full).abs().mean() < 1.5 / 255


def test_uint8_tensors_are_images_in_0_255():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(as_float(next(iter_batches(x))), x.float() / 255, rtol=0, atol=0)
