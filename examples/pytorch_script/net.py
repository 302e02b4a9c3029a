"""The script's model, shared by train.py and task.py."""

from torch import nn


class Net(nn.Module):
    """64-32-10 MLP for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.layers(x)
