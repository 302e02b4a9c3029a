"""A user's own BatchNorm CNN on a folder of images per class (one folder per client).

    python examples/image_folder/make_data.py
    fedlearn run --task examples/image_folder/task.py:task \
        --data 'examples/image_folder/data/client-{i}' --clients 3 --rounds 5
    fedlearn sim --task examples/image_folder/task.py:task \
        --data 'examples/image_folder/data/client-{i}' --clients 3 --per-round 3 --rounds 5
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

import fedlearn
from fedlearn.data import read_local

HERE = Path(__file__).resolve().parent
SIZE = (16, 16)
CLASSES = [f"digit-{d}" for d in range(10)]


class ScanNet(nn.Module):
    """conv-BN-ReLU-pool twice, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x).flatten(1))


def test_images() -> fedlearn.Data | None:
    """The server's test set: data/test, when make_data.py has written it."""
    folder = HERE / "data" / "test"
    if not folder.is_dir():
        return None
    local = read_local(folder, image_size=SIZE, channels=1, classes=CLASSES)
    return fedlearn.Data(local.x, local.y)


task = fedlearn.Task(
    name="digit-scans",
    model=ScanNet,
    test_data=test_images,
    num_classes=10,
    # how `--data FOLDER` is read: resized to 16x16 grayscale, class folders in this order
    reader={"image_size": SIZE, "channels": 1, "classes": CLASSES},
    config={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 16},
)
