"""Omniglot (Lake et al. 2015) as a ``[classes, 20, 1, size, size]`` uint8 tensor.

Pixels are inverted so that strokes are 255 and the background 0 (as in Finn et al.'s MAML code):
after scaling to [0, 1] the input is sparse with strokes at 1. No further normalisation
(``MEAN``/``STD`` are None). Images are resized from 105x105 with antialiased bilinear
interpolation (torchvision's ``Resize``); rotations by 90, 180 and 270 degrees are extra classes.

Each of the two archives (``images_background``, ``images_evaluation``) is read once, from its
zip (in memory) or its extracted folder, and cached; a split then picks its characters.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
import zlib
from collections import defaultdict
from functools import partial
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

import torch
from PIL import Image

from imaml_cli.data.cache import default_cache_dir, fingerprint, load_or_build
from imaml_cli.data.episodes import check_positive, check_split
from imaml_cli.data.resize import resize_uint8
from imaml_cli.errors import UserError

ARCHIVES = ("background", "evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
MD5 = {"background": "68d2efa1b9178cc56df9314c21c6e718",
       "evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
IMAGES_PER_CHARACTER = 20
SOURCE_SIZE = 105
MEAN = None
STD = None

# {"background"|"evaluation": {alphabet: [character folder, ...]}}, the packaged split format.
Characters = Mapping[str, Mapping[str, Sequence[str]]]

# The folder of omniglot_<split>.json, one list per split. A module attribute so that tests can
# route the splits of generated archives through the same code as the packaged lists.
SPLIT_LISTS = resources.files("imaml_cli.data").joinpath("splits")


def split_characters(split: str) -> Characters:
    """The characters of a split of Vinyals et al. (1028 / 172 / 423), from ``SPLIT_LISTS``."""
    check_split(split, "Omniglot")
    return json.loads(SPLIT_LISTS.joinpath(f"omniglot_{split}.json").read_text(encoding="utf-8"))


def load_omniglot(root: str | os.PathLike, split: str, rotations: bool = True,
                  image_size: int = 28, cache_dir: str | os.PathLike | None = None,
                  download: bool = False, characters: Characters | None = None) -> torch.Tensor:
    """Images of ``split`` as uint8 ``[classes, 20, 1, image_size, image_size]``.

    ``characters`` replaces the packaged split lists (same format; tests use tiny ones).
    With rotations the four rotations of a character are consecutive classes.
    """
    check_positive(image_size, "dataset.image_size")
    if characters is None:
        characters = split_characters(split)
    # Resolved, so that the cache does not take another spelling of the path for another source.
    root = Path(root).expanduser().resolve()
    if root.is_file():
        raise UserError(f"dataset.root={root} is a file; set dataset.root to the folder that holds "
                        f"images_background.zip and images_evaluation.zip (such as {root.parent})")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    parts = []
    for archive in ARCHIVES:
        wanted = [f"{alphabet}/{character}"
                  for alphabet, names in characters.get(archive, {}).items() for character in names]
        if not wanted:
            continue
        source = _find_source(root, archive, download)
        images, names = load_or_build(
            cache_dir, "omniglot",
            {"archive": archive, "source": str(source.resolve()), "image_size": image_size},
            fingerprint(_png_files(source) if source.is_dir() else [source]),
            partial(_build, source, image_size))
        index = {name: i for i, name in enumerate(names)}
        missing = [name for name in wanted if name not in index]
        if missing:
            raise UserError(f"{len(missing)} of the {len(wanted)} characters the {split!r} split "
                            f"takes from images_{archive} are not in {source} (first: "
                            f"{missing[0]}); the data is incomplete, get it again from {URL}")
        parts.append(images[[index[name] for name in wanted]])
    images = torch.cat(parts)
    if rotations:
        images = torch.stack([images.rot90(k, dims=(-2, -1)) for k in range(4)], dim=1)
        images = images.flatten(0, 1)
    return images


def _candidates(root: Path, archive: str) -> list[Path]:
    # A zip before its extracted folder: a folder may be half extracted, a zip is whole or fails.
    return [base / f"images_{archive}{ext}"
            for base in (root, root / "omniglot-py") for ext in (".zip", "")]


def _find_source(root: Path, archive: str, download: bool) -> Path:
    for path in _candidates(root, archive):
        if path.is_file() if path.suffix == ".zip" else path.is_dir():
            return path
    if download:
        # The root is only read unless the user made it a folder to download into.
        if not root.is_dir() or not os.access(root, os.W_OK):
            state = "does not exist" if not root.exists() else "is not a writable folder"
            raise UserError(f"Omniglot is not in dataset.root={root}, which {state}, so nothing is downloaded; "
                            f"point dataset.root at the folder that holds images_background.zip and "
                            f"images_evaluation.zip, or create it to download them there from {URL}")
        return _download(root, archive)
    if not root.exists():
        raise UserError(f"dataset.root={root} does not exist; create it and put images_background.zip and "
                        f"images_evaluation.zip from {URL} there, or create it and set dataset.download=true "
                        "to fetch them into it")
    looked = ", ".join(str(p) for p in _candidates(root, archive))
    raise UserError(f"Omniglot images_{archive} not found (looked for {looked}); put "
                    f"images_background.zip and images_evaluation.zip from {URL} into {root} "
                    f"or set dataset.download=true")


def _download(root: Path, archive: str) -> Path:
    from torchvision.datasets import utils  # slow to import; only needed here

    filename = f"images_{archive}.zip"
    partial = root / f"{filename}.part"
    try:
        utils.download_url(URL + filename, str(root), filename=partial.name)
    except (OSError, RuntimeError) as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"could not download {URL}{filename} ({exc}); when offline, put "
                        f"images_background.zip and images_evaluation.zip into {root}") from exc
    if not utils.check_integrity(str(partial), MD5[archive]):
        partial.unlink()
        raise UserError(f"the download of {URL}{filename} does not match its published MD5 "
                        f"{MD5[archive]}; try again, or put the zip into {root} yourself")
    target = root / filename
    os.replace(partial, target)
    return target


def _png_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*/*.png"))


def _build(source: Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    groups = _read_zip(source) if source.is_file() else _read_folder(source)
    if not groups:
        raise UserError(f"no character images in {source}; expected "
                        f"<alphabet>/<character>/*.png as in the Omniglot zips from {URL}")
    names = sorted(groups)
    raw = torch.empty(len(names) * IMAGES_PER_CHARACTER, 1, SOURCE_SIZE, SOURCE_SIZE,
                      dtype=torch.uint8)
    for c, name in enumerate(names):
        files = sorted(groups[name])
        if len(files) != IMAGES_PER_CHARACTER:
            raise UserError(f"{name} in {source} has {len(files)} images instead of "
                            f"{IMAGES_PER_CHARACTER}; the data is incomplete, get it again "
                            f"from {URL}")
        for i, (label, data) in enumerate(files):
            raw[c * IMAGES_PER_CHARACTER + i] = _decode(label, data)
    images = 255 - resize_uint8(raw, image_size)
    return images.view(len(names), IMAGES_PER_CHARACTER, 1, image_size, image_size), names


def _decode(label: str, data: bytes) -> torch.Tensor:
    # PIL rather than torchvision.io, whose decoders are deprecated from torchvision 0.29 on.
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            pixels = image.convert("L").tobytes()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode the image {label} ({exc}); the file is damaged, "
                        f"get the data again from {URL}") from exc
    if size != (SOURCE_SIZE, SOURCE_SIZE):
        raise UserError(f"the image {label} is {size[0]}x{size[1]} pixels; Omniglot images "
                        f"are {SOURCE_SIZE}x{SOURCE_SIZE}, get them from {URL}")
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(1, *size)


Groups = dict[str, list[tuple[str, bytes]]]


def _read_folder(folder: Path) -> Groups:
    groups: Groups = defaultdict(list)
    for path in _png_files(folder):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read the image {path} ({exc.strerror}); check the file "
                            f"or get the data again from {URL}") from exc
        groups[f"{path.parent.parent.name}/{path.parent.name}"].append((str(path), data))
    return groups


def _read_zip(path: Path) -> Groups:
    groups: Groups = defaultdict(list)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(path, info.filename)
            for info in infos:
                parts = info.filename.split("/")
                if (info.is_dir() or not parts[-1].endswith(".png") or len(parts) < 3
                        or parts[0] == "__MACOSX" or parts[-1].startswith(".")):
                    continue
                label = f"{path}:{info.filename}"
                try:
                    data = zf.read(info)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise UserError(f"cannot read {label} ({exc}); the zip is damaged, get it "
                                    f"again from {URL}") from exc
                groups[f"{parts[-3]}/{parts[-2]}"].append((label, data))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UserError(f"{path} is not a readable zip file ({exc}); get it again "
                        f"from {URL}") from exc
    return groups


_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_member_name(archive: Path, name: str) -> None:
    # Reading in memory cannot escape a folder, but such names mean a tampered archive.
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts:
        raise UserError(f"{archive} holds the unsafe member name {name!r} (absolute, or with "
                        f"'..'); refusing the archive, get it again from {URL}")
