"""dataset=image_folder: your own images, one folder per class, read into a uint8 tensor.

One of three layouts under ``root``, tried in this order:
  ``train|val|test/<class>/*``  split folders: a split's classes are its folder's subfolders;
  ``<class>/*`` + class lists    ``train.txt``, ``val.txt``, ``test.txt`` (one class folder name a
                                 line, UTF-8 with or without a byte-order mark; whitespace around a
                                 name, blank lines and lines starting with ``#`` are ignored) in
                                 ``class_lists``, or in ``root`` when that is null;
  ``<class>/*``                  the classes shuffled with ``split_seed`` and cut by ``split_fractions``.
Image files (``IMAGE_SUFFIXES``; other files are skipped) are converted to ``channels`` (1:
grayscale, 3: RGB) and resized to ``image_size`` squared, ignoring the aspect ratio, with PIL's
Lanczos filter (as Ravi & Larochelle's Mini-ImageNet script does). Classes may differ in size.

A folder of class folders is read once into the cache, keyed on its resolved path, the size and
the channels, and rebuilt when a file in it changes; a split then picks its classes. Rotations by
90, 180 and 270 degrees, as for Omniglot, become extra classes of the same split.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from imaml_cli.data.cache import default_cache_dir, fingerprint, load_or_build
from imaml_cli.data.episodes import SPLITS, check_split
from imaml_cli.errors import UserError

log = logging.getLogger("imaml")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MODES = {1: "L", 3: "RGB"}
LAYOUTS = ("ROOT/train|val|test/<class>/*, or ROOT/<class>/* (split by train.txt, val.txt and test.txt "
           "class lists, or at random by dataset.split_fractions)")


@dataclass(frozen=True)
class ImageFolder:
    """The classes of one split: their images one class after another, as ``ClassificationEpisodes``
    takes them with ``counts``."""

    images: torch.Tensor  # [n, channels, image_size, image_size] uint8
    counts: list[int]
    classes: list[str]
    where: str  # the split's source, for messages


def load_image_folder(root: str | os.PathLike, split: str, *, image_size: int, channels: int,
                      rotations: bool = False, class_lists: str | os.PathLike | None = None,
                      split_fractions: Sequence[float] = (0.64, 0.16, 0.2), split_seed: int = 0,
                      cache_dir: str | os.PathLike | None = None) -> ImageFolder:
    """The classes of ``split`` (class folders without image files are skipped)."""
    check_split(split)
    # Resolved before anything hashes a path under it: another spelling of the same folder (a link,
    # a relative path) must find the same cache entry, not rebuild it.
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"dataset.root={root} is not a folder; point it at your images: {LAYOUTS}")
    lists = root if class_lists is None else Path(class_lists).expanduser()
    if class_lists is None and any((root / s).is_dir() for s in SPLITS):
        folder, where = root / split, str(root / split)
        if not folder.is_dir():
            raise UserError(f"{root} has split folders but no {split}/; add {folder} with class folders "
                            f"(to train without validation, set train.val_every=0)")
    else:
        folder = root
        if class_lists is not None or any((lists / f"{s}.txt").is_file() for s in SPLITS):
            where = f"{root} (classes listed in {lists / split}.txt)"
            wanted = _read_class_list(lists / f"{split}.txt", root)
        else:
            where = f"{root} (classes split at random, dataset.split_seed={split_seed})"
            wanted = None
    groups = scan_classes(folder)
    # Before the cache: a folder without images must not leave a cache file of nothing behind.
    if not any(groups.values()):
        raise UserError(f"no images in {folder}; expected {LAYOUTS}, with image files ({', '.join(IMAGE_SUFFIXES)})")
    images, names = _load_classes(folder, groups, image_size, channels, cache_dir)
    counts = {name: len(list(run)) for name, run in groupby(names)}
    if folder == root:
        if wanted is None:
            wanted = _random_split(sorted(counts), split, split_fractions, split_seed)
        unknown = [name for name in wanted if name not in counts]
        if unknown:
            raise UserError(f"{lists / split}.txt names the class {unknown[0]!r}, which is not a folder with "
                            f"images in {root}; fix the list or add the folder")
        images = _select(images, list(counts), list(counts.values()), wanted)
        counts = {name: counts[name] for name in wanted}
    classes, sizes = list(counts), list(counts.values())
    # Said every time: a split that got fewer classes than meant is the commonest surprise here.
    log.info("the %r split of %s: %d classes, %d images%s", split, where, len(classes), sum(sizes),
             " (before rotations)" if rotations else "")
    if rotations:
        images, classes, sizes = _rotate(images, classes, sizes)
    return ImageFolder(images, sizes, classes, where)


def check_fits(data: ImageFolder, split: str, ways: int, shots: int, queries: int) -> None:
    """One line naming the problem when a split cannot give ``ways``-way episodes of ``shots`` +
    ``queries`` images per class."""
    if len(data.classes) < ways:
        raise UserError(f"dataset.ways={ways} but the {split!r} split of {data.where} has only "
                        f"{len(data.classes)} classes; lower dataset.ways or give the split more classes")
    fewest = min(range(len(data.classes)), key=data.counts.__getitem__)
    if data.counts[fewest] < shots + queries:
        raise UserError(f"class {data.classes[fewest]!r} of the {split!r} split of {data.where} has "
                        f"{data.counts[fewest]} images but dataset.shots + dataset.queries = {shots + queries}; "
                        f"add images to it, remove it, or lower dataset.shots or dataset.queries")


def _read_class_list(path: Path, root: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"the class list {path} is missing; with class lists, every split needs one "
                        f"(one class folder name of {root} a line)")
    try:
        # utf-8-sig drops the byte-order mark that Windows editors write, which strip() would keep.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the class list {path} ({exc}); it must be UTF-8 text") from exc
    names = (line.strip() for line in lines)
    return [name for name in names if name and not name.startswith("#")]


def _random_split(classes: list[str], split: str, fractions: Sequence[float], seed: int) -> list[str]:
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [0, round(fractions[0] * len(classes)), round((fractions[0] + fractions[1]) * len(classes)),
              len(classes)]
    i = SPLITS.index(split)
    return sorted(classes[j] for j in order[bounds[i]:bounds[i + 1]])


def _select(images: torch.Tensor, classes: list[str], counts: list[int], wanted: list[str]) -> torch.Tensor:
    starts = dict(zip(classes, torch.tensor(counts).cumsum(0).sub(torch.tensor(counts)).tolist()))
    sizes = dict(zip(classes, counts))
    index = torch.cat([torch.arange(starts[name], starts[name] + sizes[name]) for name in wanted])
    return images[index]


def _rotate(images: torch.Tensor, classes: list[str], counts: list[int]):
    # The four rotations of a class are consecutive classes, as for Omniglot.
    blocks = images.split(counts)
    rotated = [block.rot90(k, dims=(-2, -1)) for block in blocks for k in range(4)]
    names = [f"{name}@{90 * k}" for name in classes for k in range(4)]
    return torch.cat(rotated), names, [n for n in counts for _ in range(4)]


def scan_classes(folder: Path) -> dict[str, list[Path]]:
    """The image files of each class folder of ``folder``, by class name; hidden files and folders skipped."""
    return {d.name: sorted(p for p in d.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
            for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _load_classes(folder: Path, groups: dict[str, list[Path]], image_size: int, channels: int,
                  cache_dir: str | os.PathLike | None) -> tuple[torch.Tensor, list[str]]:
    """Every image of ``groups`` (``folder``'s class folders), and the class of each (the cache's format)."""
    files = [p for paths in groups.values() for p in paths]
    return load_or_build(default_cache_dir() if cache_dir is None else cache_dir, "image_folder",
                         {"source": str(folder.resolve()), "image_size": image_size, "channels": channels},
                         fingerprint(files), partial(_build, groups, image_size, channels))


def _build(groups: dict[str, list[Path]], image_size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    images = read_images([p for paths in groups.values() for p in paths], image_size, channels)
    return images, [name for name, paths in groups.items() for _ in paths]


def read_images(paths: list[Path], image_size: int, channels: int) -> torch.Tensor:
    """The files as uint8 ``[len(paths), channels, image_size, image_size]``, resized as the module says."""
    out = torch.empty(len(paths), channels, image_size, image_size, dtype=torch.uint8)
    # PIL releases the GIL while decoding, so threads use all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for i, image in enumerate(pool.map(partial(_load_image, size=image_size, channels=channels), paths)):
            out[i] = image
    return out


def _load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    mode = MODES[channels]
    try:
        with Image.open(path) as image:
            # JPEGs decode at a reduced scale (still >= 2x the target), several times faster on
            # large photos (full-size ImageNet files); Lanczos below does the actual downscaling.
            image.draft(mode, (2 * size, 2 * size))
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            data = image.tobytes()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read the image {path} ({exc}); replace or remove the file") from exc
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(size, size, channels).permute(2, 0, 1)
