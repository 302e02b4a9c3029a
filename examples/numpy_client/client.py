"""A client with no torch at all: softmax regression in plain numpy, via the client API.

Weights are a dict of numpy arrays; the script receives the global ones,
takes a few epochs of gradient steps on its own slice of scikit-learn's
digits, and sends the new ones back.
"""

import numpy as np
from sklearn.datasets import load_digits

import fedlearn.client_api as flc

info = flc.init()
digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int64)
rows = np.array_split(np.arange(len(y_all)), info.num_clients or 1)[info.client_index or 0]
test, train = rows[: len(rows) // 5], rows[len(rows) // 5 :]


def logits(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return x @ w["weight"] + w["bias"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


while flc.is_running():
    task = flc.receive()
    if task is None:
        break
    w = {k: v.astype(np.float32).copy() for k, v in task.weights.items()}
    if task.kind == "evaluate":
        p = softmax(logits(w, x_all[test]))
        acc = float((p.argmax(1) == y_all[test]).mean())
        loss = float(-np.log(p[np.arange(len(test)), y_all[test]] + 1e-12).mean())
        flc.send(metrics={"accuracy": acc, "loss": loss}, num_examples=len(test))
        continue
    rng = np.random.default_rng(task.seed)
    lr = float(task.config["lr"])
    for _ in range(int(task.config["epochs"])):
        for batch in np.array_split(rng.permutation(train), max(1, len(train) // 32)):
            x, y = x_all[batch], y_all[batch]
            grad = softmax(logits(w, x))
            grad[np.arange(len(y)), y] -= 1.0
            grad /= len(y)
            w["weight"] -= lr * (x.T @ grad)
            w["bias"] -= lr * grad.sum(axis=0)
    flc.send(weights=w, num_examples=len(train))
