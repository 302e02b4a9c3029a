"""Split scikit-learn's diabetes data (a regression target) into one .npz per client.

    python examples/regression/make_data.py     # -> examples/regression/data/

Each client file holds arrays ``x`` (10 standardised features) and ``y`` (disease
progression, scaled to unit variance); data/test.npz is the server's test set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE / "data", clients: int = 3) -> None:
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "test.npz", x=x[order[:90]], y=y[order[:90]])
    for i, rows in enumerate(np.array_split(order[90:], clients)):
        np.savez(out / f"client-{i}.npz", x=x[rows], y=y[rows])
    print(f"wrote {clients} client files and test.npz to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data")
