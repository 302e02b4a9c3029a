"""Write scikit-learn's digits as PNG files: one folder per client, one sub-folder per class.

    python examples/image_folder/make_data.py          # -> examples/image_folder/data/

Each of 3 clients gets a third of the training images (data/client-0 ... client-2);
data/test holds the held-out images the server evaluates on. Images are 16x16
grayscale PNGs (the 8x8 digits scaled up), written with Pillow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


def write(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / f"digit-{label}"
        target.mkdir(parents=True, exist_ok=True)
        pixels = (img * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((16, 16), Image.NEAREST).save(
            target / f"{i:04d}.png")


def main(out: Path = HERE / "data", clients: int = 3) -> None:
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images, labels = digits.images[order], digits.target[order]
    test = 300
    write(out / "test", images[:test], labels[:test])
    for i, rows in enumerate(np.array_split(np.arange(test, len(labels)), clients)):
        write(out / f"client-{i}", images[rows], labels[rows])
    print(f"wrote {len(labels)} images for {clients} clients and a test set to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data")
