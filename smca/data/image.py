"""Image files read as a person sees them: the one reader of training, evaluation and predict.

A viewer shows a picture upright (its EXIF orientation applied), in colour, over a white page
where it is transparent, and 16-bit pixels spread over the whole range from black to white.
read_image returns exactly that as 8-bit RGB; image_size gives the size of that picture from
the file's header alone, cheaply enough to check every file of a data set up front;
image_extensions names the file extensions of the formats read_image can read.
"""

import os
from typing import FrozenSet, Tuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

__all__ = ["ImageError", "read_image", "image_size", "image_extensions"]

# 16-bit grey (little-, big- and native-endian) and 32-bit signed integer grey.
INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF orientations that turn the stored picture by a quarter (5..8): width and height swap.
QUARTER_TURNS = (5, 6, 7, 8)
WHITE = (255, 255, 255, 255)


class ImageError(ValueError):
    """An image file is missing, cannot be decoded, or has pixels with no standard appearance."""


def _is_stub(factory) -> bool:
    """PIL recognises a stub format (HDF5, GRIB, BUFR, WMF off Windows) but decodes it only
    through a handler an application registers."""
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def image_extensions() -> FrozenSet[str]:
    """The file name extensions (lower case, with the dot: ".png", ".jpg", ...) of the image
    formats PIL opens and decodes, the files read_image can read."""
    Image.init()  # registers every plugin PIL ships
    formats = {name for name, (factory, _) in Image.OPEN.items() if not _is_stub(factory)}
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in formats)


def _open(path: str) -> Image.Image:
    """The file opened by PIL (header read, pixels not yet decoded); ImageError naming the file
    when it is missing, empty, not an image PIL knows, of a format it cannot decode, or of mode F."""
    if not os.path.exists(path):
        raise ImageError(f"image {path!r} does not exist")
    if not os.path.isfile(path):
        raise ImageError(f"image {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"image {path!r} is empty (0 bytes)")
    try:
        image = Image.open(path)
    except Exception as err:  # PIL's failures differ by format: UnidentifiedImageError, OSError, SyntaxError...
        raise ImageError(f"image {path!r} cannot be opened as an image ({type(err).__name__}: {err})") from err
    if isinstance(image, ImageFile.StubImageFile):
        image.close()
        raise ImageError(f"image {path!r} is {image.format} data, a format PIL recognises but cannot decode")
    if image.mode == "F":
        image.close()
        raise ImageError(
            f"image {path!r} has 32-bit floating-point pixels (PIL mode F), which have no standard range "
            "from black to white; save it with 8- or 16-bit integer pixels"
        )
    return image


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) in pixels of the picture read_image returns, from the file's header only.

    Raises ImageError when the file is missing, not an image PIL can open or of mode F (what
    can be known without decoding the pixels; a truncated file passes).
    """
    with _open(path) as image:
        # Image.getexif reads what the header holds; PNG's own version decodes every pixel to
        # look for an eXIf chunk after them.
        orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
        width, height = image.size
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    """A decoded PIL image of any mode -> mode RGB, as it looks; ImageError for 32-bit integer
    pixels outside 0..65535."""
    if image.mode in INTEGER_MODES:
        values = np.asarray(image, dtype=np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageError(
                f"image {path!r} has 32-bit integer pixels from {low} to {high}; expected 16-bit values "
                "0..65535 (0 black, 65535 white)"
            )
        grey = (values * 255 + 32767) // 65535  # value / 257 rounded: 0 -> 0, 65535 -> 255
        if "transparency" in image.info:  # a 16-bit grey PNG's transparent value: white shows through
            grey[values == image.info["transparency"]] = 255
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:  # an alpha band, a palette with alpha or a transparent colour
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_image(path: str) -> Tensor:
    """The picture in an image file as a person sees it: (3, H, W) uint8 RGB, H x W its
    displayed size (image_size).

    Every mode PIL opens is read as a viewer shows it:
    - the EXIF orientation is applied (a portrait photo stored sideways comes out upright);
    - 1, L, P, RGB, CMYK, YCbCr, LAB and the other colour modes: PIL's conversion to RGB
      (grey repeated over the three channels);
    - transparency (an alpha band as in LA, PA, RGBA, a palette with alpha, a transparent
      colour): composited over white, out = round((colour * alpha + 255 * (255 - alpha)) / 255);
    - 16-bit grey (I;16, I;16B, ...) and 32-bit integer grey (I): the range 0..65535 spread
      over 0..255, out = round(value / 257), so 65535 is white; I values outside 0..65535
      raise ImageError (no standard range to show them in);
    - 16-bit RGB(A) PNGs: PIL reads their high bytes (round down of value / 256);
    - F (32-bit floating point): ImageError (no standard range either).
    Only the first frame of an animation or a multi-page file is read.

    Raises ImageError naming the file when it is missing, not an image, damaged (a truncated
    PNG or JPEG) or of the modes above that have no standard look.
    """
    with _open(path) as image:
        try:
            ImageOps.exif_transpose(image, in_place=True)  # decodes the pixels
            return pil_to_tensor(_to_rgb(image, path))
        except ImageError:
            raise
        except Exception as err:  # decoders fail with OSError, SyntaxError, ValueError... by format
            raise ImageError(f"image {path!r} cannot be decoded ({type(err).__name__}: {err})") from err
