"""Several penalties plus adversarial training in one objective:

    J(θ) = w₀·CE(x, y) + 0.05·GN + 0.5·TRADES-KL + 1·PGD-AT

``Objective`` shares the clean forward pass between the terms; each term is a registered
penalty, so any mix of the family works the same way.

    python examples/several_penalties.py [--epochs 3] [--n-train 1437]
"""
import argparse

import torch

import gradreg
from gradreg.objective import Objective

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--n-train", type=int, default=None)
args = parser.parse_args()

torch.manual_seed(0)
bundle = gradreg.data.load("digits")
x_train, y_train = bundle.train_x[:args.n_train], bundle.train_y[:args.n_train]
model = gradreg.models.make("cw", in_shape=bundle.in_shape, num_classes=10, mean=bundle.mean, std=bundle.std)
objective = Objective([
    ("gn", gradreg.penalties.make("gn"), 0.05),
    ("trades", gradreg.penalties.make("trades", eps=0.1, steps=3), 0.5),
    ("pgd-at", gradreg.penalties.make("pgd-at", eps=0.1, steps=3), 1.0),
], task_weight=0.5)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
for epoch in range(args.epochs):
    for i in range(0, len(y_train), 64):
        out = objective(model, x_train[i:i + 64], y_train[i:i + 64])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {float(v):.3f}" for k, v in out.parts.items()))
model.eval()
threat = gradreg.ThreatModel("linf", 0.1, bundle.bounds)
print(gradreg.evaluate(model, bundle.test_x, bundle.test_y, threat, attacks=["pgd"], steps=10).summary())
