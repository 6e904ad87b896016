"""Networks used by imaml, always called functionally through ``torch.func.functional_call``."""

from imaml_cli.models.conv4 import ConvNet, miniimagenet_convnet, omniglot_convnet
from imaml_cli.models.mlp import MLP, sinusoid_mlp

__all__ = ["ConvNet", "MLP", "build_model", "miniimagenet_convnet", "omniglot_convnet", "sinusoid_mlp"]

MODELS = ("omniglot_conv", "miniimagenet_conv", "sinusoid_mlp")


def build_model(name: str, num_outputs: int, activation: str = "relu"):
    """The network called ``name`` in the config group ``model``, with ``num_outputs`` outputs."""
    if name == "omniglot_conv":
        return omniglot_convnet(num_outputs, activation)
    if name == "miniimagenet_conv":
        return miniimagenet_convnet(num_outputs, activation)
    if name == "sinusoid_mlp":
        return sinusoid_mlp(num_outputs, activation)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
