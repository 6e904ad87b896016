"""A preprocessed dataset kept as one uint8 tensor file, rebuilt whenever it is stale or damaged.

A cache file holds a dict: ``key`` (JSON of the source fingerprint and the preprocessing options),
``images`` (uint8 tensor), ``classes`` (class names, one per leading row of ``images``) and
``digest`` (a checksum of the image bytes). It is read with ``torch.load(weights_only=True)``, so
opening it never runs code, and used only if the key and digest match; anything else (truncated,
stale, foreign) is rebuilt and atomically replaced. Files go to ``cache_dir`` only, never beside
the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

# Bump when the preprocessing changes so that old cache files stop matching.
FORMAT_VERSION = 1

Built = tuple[torch.Tensor, list[str]]


def default_cache_dir() -> Path:
    """``$IMAML_CACHE_DIR``, else ``$XDG_CACHE_HOME/imaml``, else ``~/.cache/imaml``."""
    if os.environ.get("IMAML_CACHE_DIR"):
        return Path(os.environ["IMAML_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "imaml"
    return Path.home() / ".cache" / "imaml"


def fingerprint(paths: Iterable[Path]) -> str:
    """Hash of the paths, sizes and modification times: cheap, and changes when a file does."""
    h = hashlib.sha256()
    for path in sorted(paths):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_or_build(cache_dir: Path | str, name: str, identity: dict, source_fingerprint: str,
                  build: Callable[[], Built]) -> Built:
    """Return ``(images, classes)`` from ``cache_dir``, or call ``build`` and store its result.

    ``identity`` (dataset, source path, options) names the file, so a changed source overwrites
    its own stale entry instead of piling up new ones.
    """
    identity = {"format": FORMAT_VERSION, **identity}
    key = json.dumps({**identity, "fingerprint": source_fingerprint}, sort_keys=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"{name}-{digest}.pt"

    cached = _read(path, key)
    if cached is not None:
        return cached
    log.info("building the %s cache %s (once; later runs load it)", name, path)
    images, classes = build()
    _write(path, key, images, classes)
    return images, classes


def _payload_digest(images: torch.Tensor) -> str:
    # CRC-32 catches truncation and bit rot (no adversary here) at several GB/s.
    return f"crc32:{zlib.crc32(images.contiguous().view(-1).numpy()):08x}"


def _read(path: Path, key: str) -> Built | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        images, classes = data["images"], data["classes"]
        valid = (data["key"] == key and images.dtype == torch.uint8
                 and len(classes) == images.shape[0]
                 and data["digest"] == _payload_digest(images))
    except Exception as exc:  # any damage means "rebuild"; the reason only goes to the log
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, exc)
        return None
    if not valid:
        log.info("cache file %s is stale or damaged; rebuilding it", path)
        return None
    return images, list(classes)


def _write(path: Path, key: str, images: torch.Tensor, classes: list[str]) -> None:
    images = images.contiguous()
    data = {"key": key, "images": images, "classes": list(classes),
            "digest": _payload_digest(images)}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        # Readers only ever see a complete file: the old one or the new one.
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        # The data is in memory already; a run without a cache is slower, not wrong.
        warnings.warn(f"could not write the dataset cache {path} ({exc}); the data will be "
                      f"preprocessed again next time; set $IMAML_CACHE_DIR to a writable folder",
                      stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
