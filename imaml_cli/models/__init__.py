"""Networks used by imaml, always called functionally through ``torch.func.functional_call``."""

from imaml_cli.models.conv4 import CONV_IMPLS, ConvNet, miniimagenet_convnet, omniglot_convnet
from imaml_cli.models.custom import build_custom_model
from imaml_cli.models.mlp import MLP, sinusoid_mlp

__all__ = ["CONV_IMPLS", "ConvNet", "MLP", "build_custom_model", "build_model", "miniimagenet_convnet",
           "omniglot_convnet", "sinusoid_mlp"]

MODELS = ("omniglot_conv", "miniimagenet_conv", "sinusoid_mlp")


def build_model(name: str, num_outputs: int, activation: str = "relu", conv_impl: str = "im2col", **image):
    """The network called ``name`` in the config group ``model``, with ``num_outputs`` outputs.

    ``conv_impl`` (``im2col`` or ``native``) picks how the conv nets compute their convolutions;
    both give the same function of the same parameters (see ``models/conv4.py``). The MLP has no
    convolutions and ignores it. ``image`` (``in_channels``, ``image_size``) fits a conv net to
    images other than its dataset's.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {conv_impl!r}; expected one of {CONV_IMPLS}")
    if name == "omniglot_conv":
        return omniglot_convnet(num_outputs, activation, conv_impl, **image)
    if name == "miniimagenet_conv":
        return miniimagenet_convnet(num_outputs, activation, conv_impl, **image)
    if name == "sinusoid_mlp":
        return sinusoid_mlp(num_outputs, activation)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
