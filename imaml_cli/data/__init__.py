"""Datasets read once into uint8 tensors, and episodes sampled from them a meta-batch at a time."""

from __future__ import annotations

import os

import torch

from imaml_cli.data.cache import default_cache_dir
from imaml_cli.data.episodes import ClassificationEpisodes, TaskBatch, check_split, fixed_episodes
from imaml_cli.data.sinusoid import SinusoidTasks
from imaml_cli.errors import UserError

DATASETS = ("omniglot", "miniimagenet", "sinusoid", "image_folder")
DEFAULT_IMAGE_SIZE = {"omniglot": 28, "miniimagenet": 84}

__all__ = ["ClassificationEpisodes", "SinusoidTasks", "TaskBatch", "default_cache_dir",
           "fixed_episodes", "make_episode_source"]


def make_episode_source(name: str, split: str, *, root: str | os.PathLike | None, ways: int,
                        shots: int, queries: int, device: torch.device | str,
                        download: bool = False, cache_dir: str | os.PathLike | None = None,
                        rotations: bool = True, image_size: int | None = None, **folder,
                        ) -> ClassificationEpisodes | SinusoidTasks:
    """The episode source for ``dataset.name`` and ``split``, with image data on ``device``.

    The sinusoid ignores ``root`` and ``ways``; each split draws its tasks from seeds of its own,
    so no split shares a task with another. ``download`` and ``rotations`` only
    apply to Omniglot (``rotations`` to image_folder too); ``image_size`` defaults to
    ``DEFAULT_IMAGE_SIZE``. ``folder`` holds image_folder's own options (``channels``, ``mean``,
    ``std``, ``class_lists``, ``split_fractions``, ``split_seed``; see ``load_image_folder``).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset.name {name!r}; choose one of {', '.join(DATASETS)}")
    check_split(split)
    if name == "sinusoid":
        return SinusoidTasks(shots, queries, device=device, split=split)
    if root is None:
        raise UserError(f"dataset.root is not set; point it at the folder holding the {name} data")
    if name == "image_folder":
        from imaml_cli.data import image_folder

        mean, std = folder.pop("mean", None), folder.pop("std", None)
        data = image_folder.load_image_folder(root, split, image_size=image_size, rotations=rotations,
                                              cache_dir=cache_dir, **folder)
        image_folder.check_fits(data, split, ways, shots, queries)
        return ClassificationEpisodes(data.images, ways, shots, queries, mean=mean, std=std, device=device,
                                      name=f"the {split!r} split of {data.where}", counts=data.counts)
    size = DEFAULT_IMAGE_SIZE[name] if image_size is None else image_size
    # Imported on demand: the loaders pull in PIL and numpy.
    if name == "omniglot":
        from imaml_cli.data import omniglot as module

        images = module.load_omniglot(root, split, rotations=rotations, image_size=size,
                                      cache_dir=cache_dir, download=download)
    else:
        from imaml_cli.data import miniimagenet as module

        images = module.load_miniimagenet(root, split, image_size=size, cache_dir=cache_dir)
    return ClassificationEpisodes(images, ways, shots, queries, mean=module.MEAN, std=module.STD,
                                  device=device, name=f"the {name} {split!r} split")
