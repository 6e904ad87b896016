"""Activations by name: ReLU for training, smooth ones for finite-difference checks."""

import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "softplus": F.softplus, "tanh": F.tanh}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
