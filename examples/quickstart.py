"""Quickstart: the seed's truegrad.nn example, finite and with a readable result.

Trains ``Linear -> LayerNorm -> ReLU -> Linear`` with TGAdamW on a small regression
problem built in memory (no download) and prints the loss as it falls.
"""

from __future__ import annotations

import torch

from truegrad import nn
from truegrad.optim import TGAdamW


def main(steps: int = 300) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(nn.Linear(1, 10), nn.LayerNorm(10), torch.nn.ReLU(), nn.Linear(10, 1))
    optim = TGAdamW(model.parameters(), lr=1e-2)
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        x = torch.randn(16, 1)
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(3 * x))
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"done: final training loss {loss.item():.4f} (TGAdamW, every parameter with its exact sum_grad_squared)")
    return loss.item()


if __name__ == "__main__":
    main()
