"""smca.data.image: every mode PIL opens read as a viewer shows it, or refused by name."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from smca.data.image import ImageError, _to_rgb, image_size, read_image


def _image(mode, values, size=None, palette=None):
    """A PIL image of `mode` whose pixels are `values` in row order (one row unless size)."""
    image = Image.new(mode, size or (len(values), 1))
    if palette is not None:
        image.putpalette(palette)
    image.putdata(values)
    return image


def _png16(path, pixels, color_type):
    """A 16-bit PNG (PIL writes none but grey): pixels (H, W, C) uint16; color_type 0 grey,
    2 RGB, 4 grey + alpha, 6 RGBA."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def _pixels(path):
    """read_image's first row as a list of (r, g, b)."""
    image = read_image(str(path))
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    return [tuple(p) for p in image[:, 0].T.tolist()]


def _grey(*values):
    return [(v, v, v) for v in values]


def _over_white(colour, alpha):
    return round((colour * alpha + 255 * (255 - alpha)) / 255)


RED_GREEN = [255, 0, 0, 0, 255, 0]
# (file name, PIL image written to it with the save keywords, the mode it opens as, expected pixels)
CASES = {
    "1": ("a.png", _image("1", [0, 1]), {}, "1", _grey(0, 255)),
    "L": ("a.png", _image("L", [0, 77, 255]), {}, "L", _grey(0, 77, 255)),
    "L-transparent-value": ("a.png", _image("L", [0, 77]), dict(transparency=0), "L", _grey(255, 77)),
    "LA": (
        "a.png",
        _image("LA", [(100, 0), (100, 128), (100, 255)]),
        {},
        "LA",
        _grey(255, _over_white(100, 128), 100),
    ),
    "P": ("a.png", _image("P", [0, 1], palette=RED_GREEN), {}, "P", [(255, 0, 0), (0, 255, 0)]),
    "P-transparent-index": (
        "a.png",
        _image("P", [0, 1], palette=RED_GREEN),
        dict(transparency=1),
        "P",
        [(255, 0, 0), (255, 255, 255)],
    ),
    "P-gif-transparent-index": (
        "a.gif",
        _image("P", [0, 1], palette=RED_GREEN),
        dict(transparency=1),
        "P",
        [(255, 0, 0), (255, 255, 255)],
    ),
    "PA": ("a.tif", _image("PA", [(0, 255), (1, 0)], palette=RED_GREEN), {}, "PA", [(255, 0, 0), (255, 255, 255)]),
    "RGB": ("a.png", _image("RGB", [(0, 0, 0), (10, 20, 30)]), {}, "RGB", [(0, 0, 0), (10, 20, 30)]),
    "RGB-transparent-colour": (
        "a.png",
        _image("RGB", [(0, 0, 0), (10, 20, 30)]),
        dict(transparency=(0, 0, 0)),
        "RGB",
        [(255, 255, 255), (10, 20, 30)],
    ),
    "RGB-webp": ("a.webp", _image("RGB", [(1, 2, 3)]), dict(lossless=True), "RGB", [(1, 2, 3)]),
    "RGBA": (
        "a.png",
        _image("RGBA", [(200, 100, 0, 0), (200, 100, 0, 128), (200, 100, 0, 255)]),
        {},
        "RGBA",
        [(255, 255, 255), tuple(_over_white(c, 128) for c in (200, 100, 0)), (200, 100, 0)],
    ),
    "CMYK": (
        "a.tif",
        _image("CMYK", [(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0), (0, 0, 0, 128)]),
        {},
        "CMYK",
        [(255, 0, 0), (0, 0, 0), (255, 255, 255), (127, 127, 127)],
    ),
    "YCbCr": ("a.tif", _image("YCbCr", [(255, 128, 128), (100, 128, 128)]), {}, "YCbCr", _grey(255, 100)),
    # 16-bit grey: value / 257, rounded; 128 / 257 = 0.498, 129 / 257 = 0.502.
    "I;16": ("a.png", _image("I;16", [0, 128, 129, 257, 32896, 65535]), {}, "I;16", _grey(0, 0, 1, 1, 128, 255)),
    "I;16-transparent-value": (
        "a.png",
        _image("I;16", [0, 65535, 32896]),
        dict(transparency=0),
        "I;16",
        _grey(255, 255, 128),
    ),
    "I;16-tiff": ("a.tif", _image("I;16", [0, 257, 32896, 65535]), {}, "I;16", _grey(0, 1, 128, 255)),
    "I;16B": ("a.tif", _image("I;16B", [0, 257, 32896, 65535]), {}, "I;16B", _grey(0, 1, 128, 255)),
    "I": ("a.tif", _image("I", [0, 257, 32896, 65535]), {}, "I", _grey(0, 1, 128, 255)),
    "I-pgm16": ("a.pgm", _image("I;16", [0, 257, 32896, 65535]), {}, "I", _grey(0, 1, 128, 255)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_reads_as_it_looks(tmp_path, case):
    name, image, save_kwargs, mode, expected = CASES[case]
    path = tmp_path / name
    image.save(path, **save_kwargs)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the case exercises the mode it is named after
    assert _pixels(path) == expected
    assert image_size(str(path)) == image.size


def test_lab_reads_as_it_looks(tmp_path):
    """L* 100 is white and 0 black; PIL's conversion is within one level of it."""
    _image("LAB", [(255, 128, 128), (0, 128, 128)]).save(tmp_path / "a.tif")
    got = torch.tensor(_pixels(tmp_path / "a.tif"))
    assert (got - torch.tensor([[255] * 3, [0] * 3])).abs().max() <= 1


def test_cmyk_jpeg_reads_as_it_looks(tmp_path):
    """PIL undoes the inverted CMYK of Adobe's JPEGs (lossy: within a few levels)."""
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "a.jpg", quality=95)
    got = read_image(str(tmp_path / "a.jpg"))[:, 8, 8].int()
    assert (got - torch.tensor([255, 0, 0])).abs().max() <= 4


@pytest.mark.parametrize(
    "color_type, channels, expected",
    [
        (0, [[0x8000, 0xFFFF, 0x80FF]], _grey(128, 255, 128)),  # grey: value / 257 rounded
        (2, [[0x8000, 0xFFFF, 0x80FF], [0, 0, 0], [0, 0, 0]], [(128, 0, 0), (255, 0, 0), (128, 0, 0)]),
        (4, [[0x8000, 0xFFFF, 0x80FF], [0xFFFF, 0x8000, 0]], _grey(128, _over_white(255, 128), 255)),
        (
            6,
            [[0x8000, 0xFFFF, 0x80FF], [0, 0, 0], [0, 0, 0], [0xFFFF, 0x8000, 0]],
            [(128, 0, 0), (255, _over_white(0, 128), _over_white(0, 128)), (255, 255, 255)],
        ),
    ],
)
def test_16_bit_pngs_read_as_they_look(tmp_path, color_type, channels, expected):
    """Colour 16-bit PNGs: PIL keeps each sample's high byte (value // 256)."""
    pixels = np.array(channels, dtype=np.uint16).T[None]  # (1, W, C)
    _png16(tmp_path / "a.png", pixels, color_type)
    assert _pixels(tmp_path / "a.png") == expected


# EXIF orientation -> the displayed picture of the stored one, from the tag's definition (where
# the stored first row and first column are shown), not from PIL's table.
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,  # top-right: mirrored left-right
    3: lambda a: np.rot90(a, 2),  # bottom-right: turned half round
    4: np.flipud,  # bottom-left: mirrored top-bottom
    5: lambda a: a.T,  # left-top: the first row shown as the left column, top down
    6: lambda a: np.rot90(a, -1),  # right-top: turned a quarter clockwise
    7: lambda a: np.rot90(a, 2).T,  # right-bottom
    8: lambda a: np.rot90(a, 1),  # left-bottom: turned a quarter anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "a.png", exif=exif.tobytes())
    expected = ORIENTATIONS[orientation](stored)
    image = read_image(str(tmp_path / "a.png"))
    assert image.shape == (3, *expected.shape)
    assert all(np.array_equal(image[c].numpy(), expected) for c in range(3))
    assert image_size(str(tmp_path / "a.png")) == (expected.shape[1], expected.shape[0])


def test_exif_orientation_of_a_jpeg(tmp_path):
    """A portrait photo stored sideways (orientation 6) comes out upright: left half dark
    stored becomes the top half."""
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif.tobytes(), quality=95)
    image = read_image(str(tmp_path / "a.jpg")).float()
    assert image.shape == (3, 64, 32) and image_size(str(tmp_path / "a.jpg")) == (32, 64)
    assert image[:, :24].mean() < 10 and image[:, 40:].mean() > 245


def test_first_frame_of_an_animation(tmp_path):
    frames = [_image("P", [c, c], palette=RED_GREEN) for c in (0, 1)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert _pixels(tmp_path / "a.gif") == [(255, 0, 0)] * 2


@pytest.mark.parametrize("mode", ["HSV", "RGBX", "RGBa"])
def test_in_memory_only_modes_go_through_pil(mode):
    """Modes PIL has that no file format here opens as still go through PIL's conversion (RGBa:
    alpha premultiplied, half-transparent pure red over white)."""
    values = {"HSV": [(0, 255, 255)], "RGBX": [(255, 0, 0, 0)], "RGBa": [(128, 0, 0, 128)]}[mode]
    expected = {"HSV": (255, 0, 0), "RGBX": (255, 0, 0), "RGBa": (255, 127, 127)}[mode]
    assert _to_rgb(_image(mode, values), "x").getpixel((0, 0)) == expected


@pytest.mark.parametrize("values, message", [([0, -1], "from -1 to 0"), ([0, 65536], "from 0 to 65536")])
def test_32_bit_integers_outside_16_bits_are_refused(tmp_path, values, message):
    _image("I", values).save(tmp_path / "a.tif")
    assert image_size(str(tmp_path / "a.tif")) == (2, 1)  # only the pixels tell
    with pytest.raises(ImageError, match=f"a.tif' has 32-bit integer pixels {message}; expected 16-bit"):
        read_image(str(tmp_path / "a.tif"))


def test_float_pixels_are_refused(tmp_path):
    _image("F", [0.0, 0.5]).save(tmp_path / "a.tif")
    for read in (read_image, image_size):
        with pytest.raises(ImageError, match=r"a.tif' has 32-bit floating-point pixels \(PIL mode F\)"):
            read(str(tmp_path / "a.tif"))


def _noise_image(path, quality=None):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **({} if quality is None else dict(quality=quality)))


@pytest.mark.parametrize("name", ["a.png", "a.jpg"])
def test_truncated_file_is_named(tmp_path, name):
    """A file cut off halfway has a whole header (image_size passes); decoding names it."""
    path = tmp_path / name
    _noise_image(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert image_size(str(path)) == (64, 64)
    with pytest.raises(ImageError, match=f"image '{path}' cannot be decoded \\(OSError: image file is truncated"):
        read_image(str(path))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("folder", "is not a file"),
        ("empty", r"is empty \(0 bytes\)"),
        ("text", "cannot be opened as an image"),
        ("png_signature_only", "cannot be opened as an image"),
    ],
)
def test_unreadable_file_is_named(tmp_path, kind, message):
    path = tmp_path / "a.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("<html>404 Not Found</html>")
    elif kind == "png_signature_only":
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    for read in (read_image, image_size):
        with pytest.raises(ImageError, match=f"image '{path}' {message}"):
            read(str(path))
