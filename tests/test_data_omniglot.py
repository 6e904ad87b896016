"""Omniglot loading: layouts, preprocessing, the cache, the packaged split and bad input."""

import io
import json
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from imaml_cli.data import make_episode_source, omniglot
from imaml_cli.data.episodes import SPLITS
from imaml_cli.data.omniglot import load_omniglot, split_characters
from imaml_cli.errors import UserError

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"

# A tiny Omniglot: alphabet -> number of characters, per archive.
TINY = {"background": {"Alpha": 2, "Beta": 2}, "evaluation": {"Gamma": 2}}
TINY_SPLIT = {"background": {"Alpha": ["character02"]},
              "evaluation": {"Gamma": ["character01", "character02"]}}
# Three disjoint splits of the tiny archives, each taking characters from both archives but test.
TINY_SPLITS = {"train": {"background": {"Alpha": ["character01"], "Beta": ["character02"]}},
               "val": {"background": {"Alpha": ["character02"]}, "evaluation": {"Gamma": ["character01"]}},
               "test": {"background": {"Beta": ["character01"]}, "evaluation": {"Gamma": ["character02"]}}}


def _png(seed: int, jitter: int = 0) -> bytes:
    """A 105x105 1-bit image, white with a black bar 12 pixels high whose height depends on ``seed``
    (13 pixels apart for consecutive seeds) and whose horizontal place on ``jitter``."""
    image = Image.new("1", (105, 105), 1)
    top = 4 + (seed * 13) % 80
    ImageDraw.Draw(image).rectangle([10 + 2 * jitter, top, 60 + 2 * jitter, top + 12], fill=0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _members(archive: str, images: int = 20):
    # The images of a character are its own bar, shifted a little: characters are told apart at a
    # glance. Characters are numbered across both archives.
    archives = list(TINY)
    character = sum(sum(TINY[a].values()) for a in archives[:archives.index(archive)])
    for alphabet, count in TINY[archive].items():
        for c in range(1, count + 1):
            character += 1
            for i in range(1, images + 1):
                name = f"images_{archive}/{alphabet}/character{c:02d}/{character:04d}_{i:02d}.png"
                yield name, _png(character, i % 5)


def make_zips(root: Path, images: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for archive in TINY:
        with zipfile.ZipFile(root / f"images_{archive}.zip", "w") as zf:
            for name, data in _members(archive, images):
                zf.writestr(name, data)
    return root


def make_folders(root: Path) -> Path:
    for archive in TINY:
        for name, data in _members(archive):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def use_tiny_splits(folder: Path, monkeypatch) -> None:
    """Route the splits to ``TINY_SPLITS`` through lists in the packaged format, as
    ``split_characters`` reads them."""
    folder.mkdir(parents=True)
    for split, characters in TINY_SPLITS.items():
        (folder / f"omniglot_{split}.json").write_text(json.dumps(characters), encoding="utf-8")
    monkeypatch.setattr(omniglot, "SPLIT_LISTS", folder)


def load_tiny(root, cache_dir, **kwargs):
    return load_omniglot(root, "tiny", cache_dir=cache_dir, characters=TINY_SPLIT, **kwargs)


def test_zip_layout_shapes_inversion_and_rotations(tmp_path):
    root = make_zips(tmp_path / "data")
    images = load_tiny(root, tmp_path / "cache")
    assert images.shape == (3 * 4, 20, 1, 28, 28) and images.dtype == torch.uint8
    # Strokes are bright on a dark background after inversion.
    assert images[0, 0].float().mean() < 60 and images[0, 0].max() == 255
    assert images[0, 0, 0, 0, 0] == 0
    for k in range(4):
        assert torch.equal(images[k], images[0].rot90(k, dims=(-2, -1)))
    # Characters keep the split's order: Alpha/character02 comes before Gamma's.
    assert not torch.equal(images[0], images[4]) and not torch.equal(images[4], images[8])


def test_folder_layout_under_omniglot_py_matches_zip(tmp_path):
    from_zip = load_tiny(make_zips(tmp_path / "a"), tmp_path / "cache")
    from_folder = load_tiny(make_folders(tmp_path / "b" / "omniglot-py"), tmp_path / "cache")
    assert torch.equal(from_zip, from_folder)


def test_options_without_rotations_and_other_size(tmp_path):
    images = load_tiny(make_zips(tmp_path / "data"), tmp_path / "cache", rotations=False,
                       image_size=14)
    assert images.shape == (3, 20, 1, 14, 14)


def test_cache_is_reused_and_never_written_into_the_data_root(tmp_path, monkeypatch):
    root = make_zips(tmp_path / "data")
    before = snapshot(root)
    first = load_tiny(root, tmp_path / "cache")
    assert snapshot(root) == before
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 2
    monkeypatch.setattr(omniglot, "_build", lambda *a: pytest.fail("cache not used"))
    assert torch.equal(load_tiny(root, tmp_path / "cache"), first)


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAML_CACHE_DIR", str(tmp_path / "env-cache"))
    load_tiny(make_zips(tmp_path / "data"), None)
    assert len(list((tmp_path / "env-cache").glob("omniglot-*.pt"))) == 2


def _count_builds(monkeypatch):
    calls = []
    real = omniglot._build

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(omniglot, "_build", counting)
    return calls


def test_stale_cache_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    root = make_zips(tmp_path / "data")
    load_tiny(root, tmp_path / "cache")
    calls = _count_builds(monkeypatch)
    zip_path = root / "images_evaluation.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:  # same names, other pictures
        for name, _ in _members("evaluation"):
            zf.writestr(name, _png(99))
    images = load_tiny(root, tmp_path / "cache")
    assert len(calls) == 1
    assert torch.equal(images[4, 0], images[8, 0])  # both Gamma characters are now alike


@pytest.mark.parametrize("damage", ["truncate", "payload"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, damage):
    root = make_zips(tmp_path / "data")
    good = load_tiny(root, tmp_path / "cache")
    for path in (tmp_path / "cache").glob("omniglot-*.pt"):
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:  # the header still matches, the pixels do not
            data = torch.load(path, weights_only=True)
            data["images"][0, 0, 0, 0, 0] ^= 1
            torch.save(data, path)
    calls = _count_builds(monkeypatch)
    assert torch.equal(load_tiny(root, tmp_path / "cache"), good)
    assert len(calls) == 2
    calls.clear()
    load_tiny(root, tmp_path / "cache")  # the rebuilt files are valid again
    assert not calls


def test_packaged_split_sizes_and_disjointness():
    sets = {}
    for split in SPLITS:
        chars = split_characters(split)
        sets[split] = {(archive, alphabet, c) for archive, alphabets in chars.items()
                       for alphabet, names in alphabets.items() for c in names}
    assert {s: len(v) for s, v in sets.items()} == {"train": 1028, "val": 172, "test": 423}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]


def test_each_split_loads_its_own_characters_from_its_own_list(tmp_path, monkeypatch):
    root = make_zips(tmp_path / "data")
    use_tiny_splits(tmp_path / "splits", monkeypatch)
    cache = tmp_path / "cache"

    def character(archive, alphabet, name):
        return load_omniglot(root, "any", rotations=False, cache_dir=cache,
                             characters={archive: {alphabet: [name]}})[0]

    loaded = {}
    for split in SPLITS:
        images = load_omniglot(root, split, rotations=False, cache_dir=cache)
        expected = [character(archive, alphabet, name) for archive, alphabets in TINY_SPLITS[split].items()
                    for alphabet, names in alphabets.items() for name in names]
        assert images.shape == (len(expected), 20, 1, 28, 28)
        for got, want in zip(images, expected):
            assert torch.equal(got, want)
        loaded[split] = images
    # Disjoint: no image of one split is in another (every character's bar has its own height).
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        firsts = {tuple(image.flatten().tolist()) for image in loaded[a][:, 0]}
        assert not firsts & {tuple(image.flatten().tolist()) for image in loaded[b][:, 0]}


@pytest.mark.parametrize("split", SPLITS)
def test_episodes_of_a_split_show_only_its_characters(tmp_path, monkeypatch, split):
    """Through the factory that training and evaluation call, with rotations."""
    root = make_zips(tmp_path / "data")
    use_tiny_splits(tmp_path / "splits", monkeypatch)
    cache = tmp_path / "cache"
    own = load_omniglot(root, "any", cache_dir=cache, characters=TINY_SPLITS[split])
    others = torch.cat([load_omniglot(root, "any", cache_dir=cache, characters=TINY_SPLITS[s])
                        for s in SPLITS if s != split])
    source = make_episode_source("omniglot", split, root=root, ways=8, shots=1, queries=1, device="cpu",
                                 cache_dir=cache)
    batch = source.sample(6, torch.Generator().manual_seed(0))
    shown = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    pixels = (shown * 255).round().to(torch.uint8)
    known = {tuple(image.flatten().tolist()) for image in own.flatten(0, 1)}
    foreign = {tuple(image.flatten().tolist()) for image in others.flatten(0, 1)}
    assert all(tuple(image.flatten().tolist()) in known for image in pixels)
    assert not any(tuple(image.flatten().tolist()) in foreign for image in pixels)


def test_unknown_split(tmp_path):
    with pytest.raises(UserError, match="unknown Omniglot split 'dev'; choose one of train"):
        load_omniglot(tmp_path, "dev", cache_dir=tmp_path / "cache")


def test_missing_data_names_the_paths_and_where_to_get_the_data(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as info:
        load_omniglot(tmp_path / "empty", "val", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "images_background.zip") in message
    assert str(tmp_path / "empty" / "omniglot-py" / "images_background") in message
    assert "github" in message and "dataset.download=true" in message


def test_a_root_that_does_not_exist_is_named_first(tmp_path):
    """Setting dataset.download=true alone cannot help there: downloads go only into a folder that exists."""
    with pytest.raises(UserError) as info:
        load_omniglot(tmp_path / "nowhere", "val", cache_dir=tmp_path / "cache")
    assert str(info.value) == (
        f"dataset.root={tmp_path / 'nowhere'} does not exist; create it and put images_background.zip and "
        f"images_evaluation.zip from {omniglot.URL} there, or create it and set dataset.download=true to fetch "
        "them into it")


def test_characters_missing_from_the_archive(tmp_path):
    root = make_zips(tmp_path / "data")
    wanted = {"background": {"Alpha": ["character01", "character07"]}}
    with pytest.raises(UserError, match=r"1 of the 2 characters .* \(first: Alpha/character07\)"):
        load_omniglot(root, "val", cache_dir=tmp_path / "cache", characters=wanted)


def test_incomplete_character_is_named(tmp_path):
    root = make_folders(tmp_path / "data")
    next((root / "images_background" / "Beta" / "character01").glob("*.png")).unlink()
    with pytest.raises(UserError, match="Beta/character01 .* has 19 images instead of 20"):
        load_tiny(root, tmp_path / "cache")


def test_corrupt_zip_is_named(tmp_path):
    root = make_zips(tmp_path / "data")
    (root / "images_background.zip").write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match=r"images_background\.zip is not a readable zip file"):
        load_tiny(root, tmp_path / "cache")


def test_unreadable_image_is_named(tmp_path):
    root = tmp_path / "data"
    make_zips(root)
    members = list(_members("background"))
    with zipfile.ZipFile(root / "images_background.zip", "w") as zf:
        for i, (name, data) in enumerate(members):
            zf.writestr(name, b"\x89PNG garbage" if i == 25 else data)
    with pytest.raises(UserError, match=r"cannot decode the image .*images_background\.zip:"
                                        + members[25][0]):
        load_tiny(root, tmp_path / "cache")


@pytest.mark.parametrize("member", ["../escape.png", "/etc/evil.png",
                                    "images_background/a/../../x.png", "C:/x.png"])
def test_zip_slip_member_names_are_refused(tmp_path, member):
    root = make_zips(tmp_path / "data")
    with zipfile.ZipFile(root / "images_background.zip", "a") as zf:
        zf.writestr(zipfile.ZipInfo(member), _png(1))
    with pytest.raises(UserError, match="unsafe member name"):
        load_tiny(root, tmp_path / "cache")


def test_download_offline_says_where_to_put_the_zips(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    def offline(url, root, filename=None, md5=None):
        Path(root, filename).write_bytes(b"partial")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(utils, "download_url", offline)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match=f"could not download .*put images_background.zip and "
                                        f"images_evaluation.zip into {root}"):
        load_omniglot(root, "val", cache_dir=tmp_path / "cache", download=True)
    assert list(root.iterdir()) == []


def test_download_checks_the_published_md5(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    tiny = make_zips(tmp_path / "tiny")
    fetched = []

    def fake_download(url, root, filename=None, md5=None):
        fetched.append(url)
        name = url.rsplit("/", 1)[1]
        Path(root, filename).write_bytes((tiny / name).read_bytes())

    monkeypatch.setattr(utils, "download_url", fake_download)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match="does not match its published MD5"):
        load_tiny(root, tmp_path / "cache", download=True)
    assert list(root.iterdir()) == []

    monkeypatch.setattr(omniglot, "MD5", {a: utils.calculate_md5(str(tiny / f"images_{a}.zip"))
                                          for a in omniglot.ARCHIVES})
    images = load_tiny(root, tmp_path / "cache", download=True)
    assert images.shape[0] == 12
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip",
                                                      "images_evaluation.zip"]
    assert fetched[-1] == omniglot.URL + "images_evaluation.zip"


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason=f"no Omniglot at {REAL_ROOT}")
def test_real_omniglot(real_omniglot_cache):
    before = snapshot(REAL_ROOT)
    cache = real_omniglot_cache
    sizes = {}
    for split in SPLITS:
        images = load_omniglot(REAL_ROOT, split, cache_dir=cache)
        assert images.shape[1:] == (20, 1, 28, 28) and images.dtype == torch.uint8
        sizes[split] = images.shape[0]
    assert sizes == {"train": 4112, "val": 688, "test": 1692}
    characters = {}
    for path in cache.glob("omniglot-*.pt"):
        data = torch.load(path, weights_only=True)
        characters[json.loads(data["key"])["archive"]] = data["images"].shape[0]
        assert data["images"].shape[1] == 20
    assert characters == {"background": 964, "evaluation": 659}
    assert 20 * sum(characters.values()) == 32460
    assert snapshot(REAL_ROOT) == before

    with pytest.raises(UserError, match=r"dataset.ways=700 but the omniglot 'val' split has "
                                        r"only 688 classes; lower dataset.ways"):
        make_episode_source("omniglot", "val", root=REAL_ROOT, ways=700, shots=1, queries=1,
                            device="cpu", cache_dir=cache)
    source = make_episode_source("omniglot", "val", root=REAL_ROOT, ways=5, shots=1,
                                 queries=15, device="cpu", cache_dir=cache)
    batch = source.sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 5, 1, 28, 28)
    assert 0.0 <= batch.query_x.min() and batch.query_x.max() <= 1.0


def test_no_temporary_files_are_left_in_the_cache_dir(tmp_path):
    load_tiny(make_zips(tmp_path / "data"), tmp_path / "cache")
    assert all(p.suffix == ".pt" for p in (tmp_path / "cache").iterdir())


def test_unwritable_cache_dir_warns_and_still_loads(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        images = load_tiny(make_zips(tmp_path / "data"), blocker)
    assert images.shape[0] == 12
