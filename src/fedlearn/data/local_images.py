"""Reading a folder of images, one sub-folder per class, into normalised arrays.

The layout is the usual one (``PATH/cat/001.jpg``, ``PATH/dog/002.png``):
each sub-folder's name is a class and its images are that class's examples.
Pillow is imported only when a folder is read. Hidden entries (names starting
with ``.``) and files that are not images are skipped; everything else is
read in sorted order, so the same folder always gives the same arrays.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedlearn.errors import ConfigError, DatasetCorruptError, DatasetError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "read_image_folder"]

#: File suffixes read as images (compared case-insensitively).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)

#: Pillow modes that hold one channel; anything else is read as RGB unless told otherwise.
GRAY_MODES: frozenset[str] = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

LAYOUT_HINT = "put one sub-folder of images per class in it, e.g. PATH/cat/1.png"


def read_image_folder(
    path: Path,
    *,
    image_size: tuple[int, int] | None,
    channels: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    classes: tuple[str, ...] | None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read ``path/<class>/<image>`` into ``(x, y, classes)``.

    ``x`` is float32 (N, C, H, W): pixels divided by 255, then ``(x - mean) /
    std`` per channel (a single value applies to every channel). ``y`` is the
    int64 index of each image's folder in ``classes`` (sorted folder names
    when None). Images are converted to ``channels`` (1: grayscale, 3: RGB;
    None: as the first image) and resized bilinearly to ``image_size`` (H, W)
    when given; without it, images of different sizes are an error.
    """
    folders = _class_folders(path)
    names = classes if classes is not None else tuple(f.name for f in folders)
    index = {name: i for i, name in enumerate(names)}
    files: list[tuple[Path, int]] = []
    for folder in folders:
        if folder.name not in index:
            raise DatasetError(
                f"Folder {folder.name!r} in {path} is not one of the task's classes "
                f"{', '.join(names)}; remove it or add it to the classes."
            )
        images = sorted(
            f for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DatasetError(
                f"Class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add some or remove the folder."
            )
        files.extend((f, index[folder.name]) for f in images)
    pixels = _read_pixels([f for f, _ in files], image_size=image_size, channels=channels)
    x = _normalise(pixels, mean, std)
    y = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    return x, y, names


def _class_folders(path: Path) -> list[Path]:
    try:
        entries = sorted(e for e in path.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise DatasetError(
            f"{path} cannot be listed ({exc.strerror or exc}); check its permissions."
        ) from exc
    if not entries:
        raise DatasetError(f"{path} is empty; {LAYOUT_HINT}.")
    folders = [e for e in entries if e.is_dir()]
    if not folders:
        raise DatasetError(f"{path} has no class sub-folders; {LAYOUT_HINT}.")
    return folders


def _read_pixels(
    files: list[Path], *, image_size: tuple[int, int] | None, channels: int | None
) -> np.ndarray:
    """uint8 (N, C, H, W) pixels of ``files``, all converted to one mode and size."""
    from PIL import Image

    mode: str | None = None if channels is None else ("L" if channels == 1 else "RGB")
    arrays: list[np.ndarray] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for file in files:
        image = _open(file)
        if mode is None:
            mode = "L" if image.mode in GRAY_MODES else "RGB"
        if image.mode in ("P", "PA"):
            # Palette images with transparency must pass through RGBA to convert cleanly.
            image = image.convert("RGBA")
        image = image.convert(mode)
        if image_size is not None:
            height, width = image_size
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
        hw = (image.height, image.width)
        if first is None:
            first = (file, hw)
        elif hw != first[1]:
            raise DatasetError(
                f"Images differ in size: {first[0]} is {_hw(first[1])} but {file} is {_hw(hw)} "
                "(height x width); set the task's image size to resize them all."
            )
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None, :, :] if array.ndim == 2 else array.transpose(2, 0, 1))
    return np.stack(arrays)


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _open(file: Path) -> Image.Image:
    """The fully decoded, upright image in ``file``, or DatasetCorruptError naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
            image.load()
            return image
    # Pillow's decoders raise several unrelated types on damaged files.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        raise DatasetCorruptError(
            f"Image {file} cannot be read ({exc}); replace or delete it."
        ) from exc


def _normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(pixels / 255 - mean) / std`` per channel, as float32."""
    num_channels = pixels.shape[1]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, num_channels):
            raise ConfigError(
                f"Normalisation {name} has {len(values)} values but the images have "
                f"{num_channels} channels; give one value or {num_channels}."
            )
    x = pixels.astype(np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return x
