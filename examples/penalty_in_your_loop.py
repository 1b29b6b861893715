"""A gradreg penalty in your own training loop: any nn.Module, any optimizer, one extra term.

    python examples/penalty_in_your_loop.py [--epochs 5]
"""
import argparse

import torch
from torch import nn
from torch.nn import functional as F

import gradreg

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

# --- the part that is about gradreg ----------------------------------------------------------
bundle = gradreg.data.load("digits")  # or your own tensors in [0, 1]
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
penalty = gradreg.penalties.make("gn")  # ½‖∇ₓ CE‖² (gradient norm); try "sgr", "datagrad", "trades"
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(args.epochs):
    for i in range(0, len(bundle.train_y), 64):
        x, y = bundle.train_x[i:i + 64], bundle.train_y[i:i + 64]
        loss = F.cross_entropy(model(x), y) + 0.1 * penalty(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
# ----------------------------------------------------------------------------------------------
threat = gradreg.ThreatModel("linf", 0.1, bundle.bounds)
print(gradreg.evaluate(model, bundle.test_x, bundle.test_y, threat, attacks=["pgd"], steps=10).summary())
