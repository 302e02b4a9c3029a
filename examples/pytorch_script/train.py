"""An existing PyTorch training script on scikit-learn's digits, turned into a client.

The lines marked `# fedlearn` are all that was added: receive the global
weights and the round's config, train as before, send the new weights back.
Run it through its task (task.py), e.g. `fedlearn run --task
examples/pytorch_script/task.py:task --clients 3 --rounds 5`.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import fedlearn.client_api as flc  # fedlearn

from net import Net

info = flc.init()  # fedlearn: which client this is

# Load the data as the script always did; each client keeps its own slice.
digits = load_digits()
x = torch.tensor(digits.images.reshape(-1, 64) / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target, dtype=torch.int64)
part = np.array_split(np.arange(len(y)), info.num_clients or 1)[info.client_index or 0]
held_out = part[: len(part) // 5]
train_rows = part[len(part) // 5 :]

model = Net()
loss_fn = nn.CrossEntropyLoss()

while flc.is_running():  # fedlearn
    task = flc.receive()  # fedlearn: global weights + config
    if task is None:  # fedlearn
        break  # fedlearn
    model.load_state_dict({k: torch.from_numpy(v) for k, v in task.weights.items()})
    if task.kind == "evaluate":  # fedlearn: measure the global model on local data
        model.eval()
        with torch.no_grad():
            out = model(x[held_out])
            acc = float((out.argmax(1) == y[held_out]).float().mean())
            loss = float(loss_fn(out, y[held_out]))
        flc.send(metrics={"accuracy": acc, "loss": loss}, num_examples=len(held_out))
        continue
    # --- the training loop the script had, unchanged but for config values ---
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=task.config["lr"])
    gen = torch.Generator().manual_seed(task.seed)
    for _ in range(task.config["epochs"]):
        for batch in torch.randperm(len(train_rows), generator=gen).split(32):
            rows = torch.from_numpy(train_rows)[batch]
            opt.zero_grad()
            loss = loss_fn(model(x[rows]), y[rows])
            loss.backward()
            opt.step()
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    flc.send(weights=weights, num_examples=len(train_rows),  # fedlearn
             metrics={"train_loss": float(loss)})
