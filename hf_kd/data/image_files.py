"""Checks of image files before training, cheap enough for a COCO-size split: that a file opens as an image, is
complete, has a mode that converts to RGB faithfully, and is the size its annotations say.

JPEG and PNG files (nearly every detection dataset) are checked from their header and their last bytes, without
decoding pixels; a file of another format, or whose end marker is missing, is decoded once to tell a truncated file
from one with trailing data. A file damaged in the middle of its compressed data is only found when decoded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, NamedTuple

import PIL.Image
from tqdm.auto import tqdm

# Single-channel modes of more than 8 bits per pixel: `convert("RGB")` (what `datasets.Image(mode="RGB")` does) clips
# their values to 255, so a 16-bit grayscale PNG becomes an all-white image.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 64
_CHUNK_SIZE = 256

ImageFile = str | os.PathLike | bytes
ImageProblem = tuple[str, str]


def image_size(file: str | os.PathLike | BinaryIO) -> tuple[int, int]:
    """`(width, height)` of an image file as it is decoded (EXIF orientation applied, as `datasets.Image` does), read
    from its header."""
    with PIL.Image.open(file) as image:
        return _oriented_size(image)


def image_problem(
    file: ImageFile, image_id: int, name: str | None = None, expected_size: tuple[int, int] | None = None
) -> ImageProblem | None:
    """The `(kind, message)` of what makes an image file unusable, or None.

    Args:
        file: the file's path, or its bytes.
        image_id: the image's id, for the message.
        name: how the message names the file (defaults to its path).
        expected_size: `(width, height)` from the annotations, compared with the size as decoded (EXIF orientation
            applied).

    Kinds: `unreadable_image` (empty, not an image, truncated), `unsupported_image_mode` (more than 8 bits per
    channel, see `HIGH_BIT_DEPTH_MODES`) and `image_size_mismatch`.
    """
    name = name or (str(file) if not isinstance(file, bytes) else "<image bytes>")
    try:
        with _open_binary(file) as stream:
            if stream.seek(0, os.SEEK_END) == 0:
                return "unreadable_image", f"image id {image_id}: cannot decode {name}: the file is empty (0 bytes)"
            stream.seek(-min(_TAIL_BYTES, stream.tell()), os.SEEK_END)
            tail = stream.read()
            stream.seek(0)
            with PIL.Image.open(stream) as image:
                mode, size = image.mode, _oriented_size(image)
                if not _has_end_marker(image.format, tail):
                    image.load()  # a truncated file raises; one with trailing data after its end marker decodes
    except Exception as error:  # any failure to open or decode makes the file unreadable
        return "unreadable_image", f"image id {image_id}: cannot decode {name}: {error}"
    if mode in HIGH_BIT_DEPTH_MODES:
        return (
            "unsupported_image_mode",
            f"image id {image_id} ({name}): mode {mode!r} has more than 8 bits per pixel, which conversion to RGB "
            "clips (a 16-bit image would become white); convert it to 8-bit RGB with the scaling that suits the data",
        )
    if expected_size is not None and size != tuple(expected_size):
        return (
            "image_size_mismatch",
            f"image id {image_id} ({name}): decoded size {size[0]}x{size[1]} (EXIF orientation applied) does not "
            f"match width x height {expected_size[0]}x{expected_size[1]} in the annotations",
        )
    return None


class ImageCheck(NamedTuple):
    """An image file to check with [`image_problem`]: its path or bytes, id, name and expected `(width, height)`."""

    file: ImageFile
    image_id: int
    name: str | None = None
    expected_size: tuple[int, int] | None = None


def image_problems(
    images: Iterable[ImageCheck],
    *,
    total: int | None = None,
    progress: bool = False,
    description: str = "Checking images",
) -> list[ImageProblem | None]:
    """[`image_problem`] of every image, in order, checked in threads (with a progress bar with `progress`)."""
    problems: list[ImageProblem | None] = []
    with (
        ThreadPoolExecutor() as pool,
        tqdm(total=total, desc=description, unit="img", disable=not progress) as bar,
    ):
        for chunk_problems in pool.map(_check_chunk, _chunks(images, _CHUNK_SIZE)):
            problems.extend(chunk_problems)
            bar.update(len(chunk_problems))
    return problems


def _check_chunk(chunk: list[ImageCheck]) -> list[ImageProblem | None]:
    return [image_problem(*image) for image in chunk]


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_binary(file: ImageFile) -> BinaryIO:
    return io.BytesIO(file) if isinstance(file, bytes) else open(file, "rb")


def _oriented_size(image: PIL.Image.Image) -> tuple[int, int]:
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION_TAG) in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def _has_end_marker(image_format: str | None, tail: bytes) -> bool:
    if image_format == "JPEG":
        return tail.rstrip(b"\x00").endswith(_JPEG_END)
    if image_format == "PNG":
        return tail.endswith(_PNG_END)
    return False
