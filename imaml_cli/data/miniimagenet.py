"""Mini-ImageNet (Vinyals et al. 2016; split of Ravi & Larochelle 2017) as a uint8 tensor.

One of three layouts under ``root``, tried in this order for a split:
  ``mini-imagenet-cache-<split>.pkl``  the common pickle (``image_data`` N x 84 x 84 x 3 uint8,
                                       ``class_dict`` wnid -> indices), read without running code;
  ``<split>.csv`` + ``images/``        Ravi & Larochelle's ``filename,label`` lists and files;
  ``<split>/<wnid>/*.jpg``             one folder per class.
Class folders are scanned and image files read by dataset=image_folder's code (its image
suffixes; hidden files and folders skipped): resized to ``image_size`` squared ignoring the
aspect ratio, as Ravi & Larochelle's script does (PIL Lanczos). Pickled arrays, if another size
is asked for, are resized with antialiased bilinear interpolation. Classes are ordered by wnid.
Every class must hold the same number of images (600 in the real data; tests use fewer); a class
keeps the layout's order.
"""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from imaml_cli.data import image_folder, safe_pickle
from imaml_cli.data.cache import default_cache_dir, fingerprint, load_or_build
from imaml_cli.data.episodes import check_positive, check_split
from imaml_cli.data.resize import resize_uint8
from imaml_cli.errors import UserError

MEAN = (0.485, 0.456, 0.406)  # ImageNet channel statistics, on pixels scaled to [0, 1]
STD = (0.229, 0.224, 0.225)
WHERE_TO_GET = ("get the images as described at github.com/twitter-research/meta-learning-lstm "
                "(Ravi & Larochelle's split) and put them there")

Groups = dict[str, list[Path]]


def load_miniimagenet(root: str | os.PathLike, split: str, image_size: int = 84,
                      cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Images of ``split`` as uint8 ``[classes, images_per_class, 3, image_size, image_size]``."""
    check_split(split, "Mini-ImageNet")
    check_positive(image_size, "dataset.image_size")
    # Resolved, so that the cache does not take another spelling of the path for another source.
    root = Path(root).expanduser().resolve()
    if root.is_file():
        raise UserError(f"dataset.root={root} is a file; set dataset.root to the folder that holds the "
                        f"Mini-ImageNet split (such as {root.parent})")
    pickled = root / f"mini-imagenet-cache-{split}.pkl"
    listing, folder = root / f"{split}.csv", root / split
    if pickled.is_file():
        source, files = pickled, [pickled]
        build = partial(_from_pickle, pickled, image_size)
    elif listing.is_file():
        groups = _read_csv(listing, root / "images")
        source, files = listing, [listing, *(p for paths in groups.values() for p in paths)]
        build = partial(_from_files, groups, image_size)
    elif folder.is_dir():
        groups = _scan_folder(folder)
        source, files = folder, [p for paths in groups.values() for p in paths]
        build = partial(_from_files, groups, image_size)
    else:
        raise UserError(f"no Mini-ImageNet {split!r} split under {root}: looked for {pickled}, "
                        f"{listing} with {root / 'images'}/ and {folder}/<wnid>/*.jpg; "
                        f"{WHERE_TO_GET}")
    images, _ = load_or_build(
        default_cache_dir() if cache_dir is None else cache_dir, "miniimagenet",
        {"split": split, "source": str(source.resolve()), "image_size": image_size},
        fingerprint(files), build)
    return images


def _check_counts(groups: dict[str, list], where: Path) -> None:
    if not groups:
        raise UserError(f"no classes found in {where}; {WHERE_TO_GET}")
    counts = {name: len(items) for name, items in groups.items()}
    low, high = min(counts, key=counts.get), max(counts, key=counts.get)
    if counts[low] == 0:
        raise UserError(f"class {low} in {where} has no images; {WHERE_TO_GET}")
    if counts[low] != counts[high]:
        raise UserError(f"every class needs the same number of images, but in {where} {high} "
                        f"has {counts[high]} and {low} has {counts[low]}; complete the data")


def _read_csv(listing: Path, image_dir: Path) -> Groups:
    with open(listing, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["filename", "label"] or any(len(r) != 2 for r in rows[1:]):
        raise UserError(f"{listing} is not a Ravi & Larochelle split file (a 'filename,label' "
                        f"header, then one filename,wnid row per image)")
    groups: Groups = {}
    for filename, label in rows[1:]:
        groups.setdefault(label, []).append(image_dir / filename)
    _check_counts(groups, listing)
    if not image_dir.is_dir():
        raise UserError(f"found {listing} but not the image folder {image_dir} beside it; put "
                        f"the images it lists (such as {rows[1][0]}) there; {WHERE_TO_GET}")
    missing = [p for paths in groups.values() for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images listed in {listing} are missing from "
                        f"{image_dir} (first: {missing[0].name}); {WHERE_TO_GET}")
    return groups


def _scan_folder(folder: Path) -> Groups:
    groups = image_folder.scan_classes(folder)
    _check_counts(groups, folder)
    return groups


def _from_files(groups: Groups, image_size: int) -> tuple[torch.Tensor, list[str]]:
    classes = sorted(groups)
    images = image_folder.read_images([p for c in classes for p in groups[c]], image_size, channels=3)
    return images.view(len(classes), -1, 3, image_size, image_size), classes


def _from_pickle(path: Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    data = safe_pickle.load(path)
    images = data.get("image_data") if isinstance(data, dict) else None
    class_dict = data.get("class_dict") if isinstance(data, dict) else None
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
            or images.shape[3] != 3 or not isinstance(class_dict, dict)):
        raise UserError(f"{path} is not a Mini-ImageNet cache (a dict with 'image_data', "
                        f"N x H x W x 3 uint8, and 'class_dict', wnid -> image indices)")
    try:
        lists = {str(c): [int(i) for i in v] for c, v in class_dict.items()}
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: class_dict must map each wnid to a list of image "
                        f"indices ({exc})") from exc
    _check_counts(lists, path)
    classes = sorted(lists)
    index = torch.tensor([lists[c] for c in classes])
    if index.min() < 0 or index.max() >= images.shape[0]:
        raise UserError(f"{path}: class_dict refers to images beyond the {images.shape[0]} in "
                        f"image_data; recreate the file")
    # Indexing in numpy copies into a writable array, which torch can then share.
    picked = torch.from_numpy(images[index.view(-1).numpy()]).permute(0, 3, 1, 2)
    picked = resize_uint8(picked, image_size).contiguous()
    return picked.view(len(classes), -1, 3, image_size, image_size), classes
