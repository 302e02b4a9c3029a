"""Split scikit-learn's breast-cancer data into one CSV file per client (hospital).

    python examples/tabular_csv/make_data.py        # -> examples/tabular_csv/data/client-{0,1,2}.csv

Each file has the 30 numeric features and a `diagnosis` column (0 malignant,
1 benign). Nothing is kept for the server: it evaluates nothing itself, and
the clients report metrics on their own held-out rows (federated evaluation).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE / "data", clients: int = 3) -> None:
    bunch = load_breast_cancer()
    names = [n.replace(" ", "_") for n in bunch.feature_names]
    order = np.random.default_rng(0).permutation(len(bunch.target))
    out.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(np.array_split(order, clients)):
        with (out / f"client-{i}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([*names, "diagnosis"])
            for r in rows:
                writer.writerow([*(f"{v:.6g}" for v in bunch.data[r]), int(bunch.target[r])])
    print(f"wrote {clients} CSV files to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data")
