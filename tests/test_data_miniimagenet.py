"""Mini-ImageNet loading: the three layouts, the safe pickle reader, the cache and bad input."""

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imaml_cli.data import make_episode_source, miniimagenet
from imaml_cli.data.miniimagenet import load_miniimagenet
from imaml_cli.errors import UserError

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "miniimagenet"

# Three classes of four images; each image one flat colour, so resizing keeps it exactly.
WNIDS = ["n03000000", "n01000000", "n02000000"]
PER_CLASS = 4


def colour(c: int, i: int) -> tuple[int, int, int]:
    return (40 * c + 10, 30 * i + 20, 200 - 40 * c)


def _image(c: int, i: int, size=(100, 90)) -> Image.Image:
    return Image.new("RGB", size, colour(c, i))


def expected() -> torch.Tensor:
    """What the loader should give: classes sorted by wnid, colours per image."""
    order = sorted(range(len(WNIDS)), key=lambda c: WNIDS[c])
    out = torch.empty(len(WNIDS), PER_CLASS, 3, 84, 84, dtype=torch.uint8)
    for row, c in enumerate(order):
        for i in range(PER_CLASS):
            out[row, i] = torch.tensor(colour(c, i), dtype=torch.uint8).view(3, 1, 1)
    return out


def make_csv_layout(root: Path, split="train") -> Path:
    (root / "images").mkdir(parents=True)
    lines = ["filename,label"]
    for c, wnid in enumerate(WNIDS):
        for i in range(PER_CLASS):
            name = f"{wnid}{i + 1:08d}.jpg"  # full-size JPEGs, as in the original files
            _image(c, i, size=(400, 300)).save(root / "images" / name, quality=95)
            lines.append(f"{name},{wnid}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def make_folder_layout(root: Path, split="train") -> Path:
    for c, wnid in enumerate(WNIDS):
        (root / split / wnid).mkdir(parents=True)
        for i in range(PER_CLASS):
            _image(c, i, size=(84, 84)).save(root / split / wnid / f"{wnid}_{i}.png")
    return root


def make_pickle(root: Path, protocol: int, split="train") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    # Images stored class-interleaved, so class_dict really has to be followed.
    data = np.empty((len(WNIDS) * PER_CLASS, 84, 84, 3), np.uint8)
    class_dict = {wnid: [] for wnid in WNIDS}
    for c, wnid in enumerate(WNIDS):
        for i in range(PER_CLASS):
            data[i * len(WNIDS) + c] = colour(c, i)
            class_dict[wnid].append(i * len(WNIDS) + c)
    class_dict[WNIDS[0]][0] = np.int64(class_dict[WNIDS[0]][0])  # numpy scalars occur too
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
        pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=protocol)
    return root


def test_csv_layout(tmp_path):
    images = load_miniimagenet(make_csv_layout(tmp_path / "data"), "train",
                               cache_dir=tmp_path / "cache")
    assert images.dtype == torch.uint8 and images.shape == expected().shape
    assert (images.int() - expected().int()).abs().max() <= 3  # JPEG rounding


def test_class_folder_layout(tmp_path):
    images = load_miniimagenet(make_folder_layout(tmp_path / "data", "val"), "val",
                               cache_dir=tmp_path / "cache")
    assert torch.equal(images, expected())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_layout(tmp_path, protocol):
    images = load_miniimagenet(make_pickle(tmp_path / "data", protocol), "train",
                               cache_dir=tmp_path / "cache")
    assert torch.equal(images, expected())


def test_pickle_resized_to_another_size(tmp_path):
    images = load_miniimagenet(make_pickle(tmp_path / "data", 4), "train", image_size=32,
                               cache_dir=tmp_path / "cache")
    assert images.shape == (3, PER_CLASS, 3, 32, 32)
    assert torch.equal(images[:, :, :, :1, :1], expected()[:, :, :, :1, :1])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.mkdir, (str(self.marker),)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "data"
    root.mkdir()
    path = root / "mini-imagenet-cache-test.pkl"
    path.write_bytes(pickle.dumps({"image_data": _Payload(marker), "class_dict": {}}))
    with pytest.raises(UserError, match=rf"{path} asks to load (posix|os|nt)\.mkdir.*refusing"):
        load_miniimagenet(root, "test", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_pickle_of_the_wrong_shape(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    path = root / "mini-imagenet-cache-val.pkl"
    path.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84), np.uint8),
                                   "class_dict": {"n1": [0, 1]}}))
    with pytest.raises(UserError, match="is not a Mini-ImageNet cache"):
        load_miniimagenet(root, "val", cache_dir=tmp_path / "cache")


def test_truncated_pickle(tmp_path):
    root = make_pickle(tmp_path / "data", 4)
    path = root / "mini-imagenet-cache-train.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"cannot read {path} .*damaged"):
        load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")


def test_cache_is_reused(tmp_path, monkeypatch):
    root = make_csv_layout(tmp_path / "data")
    before = sorted(p.name for p in root.rglob("*"))
    first = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in root.rglob("*")) == before
    monkeypatch.setattr(miniimagenet, "_from_files", lambda *a: pytest.fail("cache not used"))
    assert torch.equal(load_miniimagenet(root, "train", cache_dir=tmp_path / "cache"), first)


def test_missing_root_names_every_layout(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        load_miniimagenet(root, "test", cache_dir=tmp_path / "cache")
    message = str(info.value)
    for looked in ("mini-imagenet-cache-test.pkl", "test.csv", "images", "test/<wnid>/*.jpg"):
        assert looked in message
    assert "meta-learning-lstm" in message and "\n" not in message


def test_missing_images_are_counted(tmp_path):
    root = make_csv_layout(tmp_path / "data")
    (root / "images" / f"{WNIDS[1]}00000002.jpg").unlink()
    with pytest.raises(UserError, match=f"1 images listed in .* are missing .*"
                                        f"first: {WNIDS[1]}00000002.jpg"):
        load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")


def test_unequal_classes(tmp_path):
    root = make_folder_layout(tmp_path / "data")
    next((root / "train" / WNIDS[2]).iterdir()).unlink()
    with pytest.raises(UserError, match=f"same number of images.*{WNIDS[2]} has 3"):
        load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")


def test_unreadable_image_is_named(tmp_path):
    root = make_folder_layout(tmp_path / "data")
    bad = root / "train" / WNIDS[0] / f"{WNIDS[0]}_1.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"cannot read the image {bad}"):
        load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")


def test_ways_and_shots_above_the_data(tmp_path):
    root = make_csv_layout(tmp_path / "data")
    common = dict(root=root, device="cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"dataset.ways=5 but the miniimagenet 'train' split has "
                                        r"only 3 classes; lower dataset.ways"):
        make_episode_source("miniimagenet", "train", ways=5, shots=1, queries=1, **common)
    with pytest.raises(UserError, match=r"dataset.shots=3 \+ dataset.queries=2 = 5 but .* only "
                                        r"4 images per class"):
        make_episode_source("miniimagenet", "train", ways=3, shots=3, queries=2, **common)
    source = make_episode_source("miniimagenet", "train", ways=3, shots=1, queries=3, **common)
    batch = source.sample(2, torch.Generator().manual_seed(0))
    assert batch.query_x.shape == (2, 9, 3, 84, 84)
    # Undoing the ImageNet normalisation gives back the stored pixels.
    pixels = (batch.support_x * torch.tensor(miniimagenet.STD).view(3, 1, 1)
              + torch.tensor(miniimagenet.MEAN).view(3, 1, 1)) * 255
    stored = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache").float()
    # Pixel levels are integers: 1e-3 is float32 rounding of the normalisation, far below one level.
    assert any(torch.allclose(pixels[0, 0], image, atol=1e-3) for image in stored.flatten(0, 1))


@pytest.mark.skipif(not (REAL_ROOT / "train.csv").is_file(), reason=f"no CSVs at {REAL_ROOT}")
@pytest.mark.parametrize("split, classes", [("train", 64), ("val", 16), ("test", 20)])
def test_real_split_files_without_images(tmp_path, split, classes):
    groups = {}
    for line in (REAL_ROOT / f"{split}.csv").read_text().splitlines()[1:]:
        groups.setdefault(line.split(",")[1], []).append(line)
    assert len(groups) == classes and {len(v) for v in groups.values()} == {600}
    # The loader names the folder it resolved: ../shared may be reached through a link.
    real = REAL_ROOT.resolve()
    with pytest.raises(UserError, match=re.escape(f"found {real / split}.csv but not the image folder "
                                                  f"{real / 'images'}")):
        load_miniimagenet(REAL_ROOT, split, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
