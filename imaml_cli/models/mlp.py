"""The 1-40-40-1 regression network of MAML's sinusoid experiments."""

import torch
from torch import nn

from imaml_cli.models.activations import activation_fn


class MLP(nn.Module):
    """Fully connected layers with PyTorch's default (Kaiming-uniform) initialisation."""

    def __init__(self, sizes: tuple[int, ...], activation: str = "relu"):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def sinusoid_mlp(num_outputs: int = 1, activation: str = "relu") -> MLP:
    """1-40-40-1: 1,761 parameters."""
    return MLP((1, 40, 40, num_outputs), activation)
