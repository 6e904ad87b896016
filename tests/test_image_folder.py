"""dataset=image_folder: the three layouts, the pixels, the cache, episodes from uneven classes,
one-line errors, and whole runs of imaml-train and imaml-eval on generated folders."""

import codecs
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, run_cli
from imaml_cli.config import validate
from imaml_cli.data import image_folder, make_episode_source
from imaml_cli.data.image_folder import load_image_folder
from imaml_cli.engine import components
from imaml_cli.engine.loop import train
from imaml_cli.errors import UserError

SIZE = 12


def pixels(class_index: int, image_index: int) -> np.ndarray:
    """An RGB image whose pixels say which class and image it is, and no two rows alike: dark noise
    with a bright 3x3 square in one of 16 places, the class's own (classes below 16 apart differ
    at a glance, in colour or grey)."""
    rng = np.random.default_rng(1000 * class_index + image_index)
    image = rng.integers(0, 96, (SIZE, SIZE, 3), dtype=np.uint8)
    row, column = divmod(class_index % 16, 4)
    image[3 * row:3 * row + 3, 3 * column:3 * column + 3] = rng.integers(224, 256, (3, 3, 3), dtype=np.uint8)
    image[0, 0] = (class_index, image_index, 7)
    return image


def write_classes(folder, names, counts, first_index=0):
    """Class folders of PNGs; returns {class name: [arrays]} in file order."""
    written = {}
    for offset, (name, count) in enumerate(zip(names, counts)):
        (folder / name).mkdir(parents=True)
        written[name] = [pixels(first_index + offset, i) for i in range(count)]
        for i, array in enumerate(written[name]):
            Image.fromarray(array).save(folder / name / f"{i:03d}.png")
    return written


def split_folders(root):
    written = {}
    for k, split in enumerate(("train", "val", "test")):
        names = [f"{split}{i}" for i in range(4)]
        written[split] = write_classes(root / split, names, [5, 6, 5, 7], first_index=10 * k)
    return written


def load(root, split, **options):
    return load_image_folder(root, split, **{"image_size": SIZE, "channels": 3, **options})


def as_arrays(data, name):
    start = sum(data.counts[:data.classes.index(name)])
    block = data.images[start:start + data.counts[data.classes.index(name)]]
    return [image.permute(1, 2, 0).numpy() for image in block]


def test_split_folders_keep_every_pixel_of_every_class(tmp_path, cache_dir):
    written = split_folders(tmp_path / "root")
    for split in ("train", "val", "test"):
        data = load(tmp_path / "root", split)
        assert data.classes == sorted(written[split]) and data.counts == [5, 6, 5, 7]
        assert data.images.dtype == torch.uint8 and data.images.shape == (23, 3, SIZE, SIZE)
        for name, arrays in written[split].items():
            assert all(np.array_equal(a, b) for a, b in zip(as_arrays(data, name), arrays))


def test_grayscale_is_the_luma_of_the_rgb_pixels(tmp_path, cache_dir):
    written = write_classes(tmp_path / "root" / "train", ["a", "b"], [2, 2])
    data = load(tmp_path / "root", "train", channels=1)
    assert data.images.shape == (4, 1, SIZE, SIZE)
    rgb = written["a"][1].astype(np.int64)
    # ITU-R 601-2 luma, the definition PIL documents for convert("L"), in its integer rounding.
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    np.testing.assert_array_equal(data.images[1, 0].numpy(), luma)


def test_images_of_any_shape_are_resized_to_the_square_side(tmp_path, cache_dir):
    folder = tmp_path / "root" / "train" / "flat"
    folder.mkdir(parents=True)
    Image.new("RGB", (30, 17), (200, 40, 90)).save(folder / "wide.png")
    Image.new("L", (9, 40), 77).save(folder / "tall.jpg", quality=100)
    data = load(tmp_path / "root", "train", image_size=8)
    assert data.images.shape == (2, 3, 8, 8)
    assert (data.images[1] == torch.tensor([200, 40, 90]).view(3, 1, 1)).all()
    assert (data.images[0] - 77).abs().max() <= 1  # a constant grey stays grey (JPEG rounding)


def test_class_lists_pick_each_splits_classes(tmp_path, cache_dir):
    root = tmp_path / "root"
    written = write_classes(root, [f"c{i}" for i in range(6)], [5] * 6)
    lists = tmp_path / "lists"
    lists.mkdir()
    for split, names in (("train", "c0 c3 c5"), ("val", "c1"), ("test", "c2 c4")):
        (lists / f"{split}.txt").write_text("# a comment\n" + "\n".join(names.split()) + "\n\n")
    data = load(root, "train", class_lists=lists)
    assert data.classes == ["c0", "c3", "c5"]
    assert all(np.array_equal(a, b) for a, b in zip(as_arrays(data, "c3"), written["c3"]))
    assert load(root, "test", class_lists=lists).classes == ["c2", "c4"]
    # Lists in the root itself need no setting.
    for split in ("train", "val", "test"):
        (root / f"{split}.txt").write_text((lists / f"{split}.txt").read_text())
    assert load(root, "val").classes == ["c1"]


def test_class_lists_as_editors_write_them(tmp_path, cache_dir):
    """A byte-order mark, CRLF line ends, spaces and tabs around names, blank lines and comments."""
    root = tmp_path / "root"
    write_classes(root, [f"c{i}" for i in range(6)], [3] * 6)
    lists = {"train": "c0  \r\n\tc3\t\r\n\r\n   \r\n# not a class\r\n  # nor this\r\nc5 \t",
             "val": "# the first line a comment\nc1\n", "test": "c2\nc4"}
    for split, text in lists.items():
        (root / f"{split}.txt").write_bytes(codecs.BOM_UTF8 + text.encode())
    assert load(root, "train").classes == ["c0", "c3", "c5"]
    assert load(root, "val").classes == ["c1"]
    assert load(root, "test").classes == ["c2", "c4"]


def test_a_seeded_random_split_partitions_the_classes(tmp_path, cache_dir):
    root = tmp_path / "root"
    write_classes(root, [f"c{i:02d}" for i in range(25)], [3] * 25)
    splits = {s: load(root, s, split_fractions=[0.6, 0.2, 0.2], split_seed=3).classes for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [15, 5, 5]
    assert sorted(sum(splits.values(), [])) == [f"c{i:02d}" for i in range(25)]
    assert load(root, "val", split_fractions=[0.6, 0.2, 0.2], split_seed=3).classes == splits["val"]
    assert load(root, "val", split_fractions=[0.6, 0.2, 0.2], split_seed=4).classes != splits["val"]


def test_rotations_are_extra_classes_of_the_same_split(tmp_path, cache_dir):
    written = write_classes(tmp_path / "root" / "train", ["a", "b"], [2, 3])
    data = load(tmp_path / "root", "train", rotations=True)
    assert data.classes == ["a@0", "a@90", "a@180", "a@270", "b@0", "b@90", "b@180", "b@270"]
    assert data.counts == [2, 2, 2, 2, 3, 3, 3, 3]
    for k in range(4):
        # torch's rot90 over (H, W) is numpy's over its first two axes.
        assert np.array_equal(as_arrays(data, f"b@{90 * k}")[2], np.rot90(written["b"][2], k))


def test_read_once_then_from_the_cache_until_a_file_changes(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "root"
    split_folders(root)
    first = load(root, "train")
    decode = image_folder._load_image

    def refuse(*args, **kwargs):
        raise AssertionError("decoded an image although the cache holds it")
    monkeypatch.setattr(image_folder, "_load_image", refuse)
    assert torch.equal(load(root, "train").images, first.images)
    # Another size is another cache entry, and a changed file rebuilds the stale one.
    with pytest.raises(AssertionError, match="decoded"):
        load(root, "train", image_size=SIZE // 2)
    monkeypatch.setattr(image_folder, "_load_image", decode)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "train" / "train1" / "000.png")
    changed = load(root, "train")
    assert changed.images[5].sum() == 0 and not torch.equal(changed.images, first.images)


def test_episodes_from_classes_of_different_sizes_use_each_image_of_its_own_class(tmp_path, cache_dir):
    root = tmp_path / "root"
    split_folders(root)
    source = make_episode_source("image_folder", "train", root=root, ways=3, shots=2, queries=3, device="cpu",
                                 image_size=SIZE, channels=3, rotations=False)
    seen = {}
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = source.sample(8, generator)
        for task in range(8):
            x = torch.cat([batch.support_x[task], batch.query_x[task]])
            y = torch.cat([batch.support_y[task], batch.query_y[task]])
            # The first pixel's red and green values are the class and image index (pixels above).
            ids = (x[:, :, 0, 0] * 255).round().long()
            for label in range(3):
                members = ids[y == label]
                assert len(set(members[:, 0].tolist())) == 1  # one class per label
                assert len(set(members[:, 1].tolist())) == 5  # no image twice
                seen.setdefault(members[0, 0].item(), set()).update(members[:, 1].tolist())
    # Every image of every class is drawn, and none past a class's own count.
    assert seen == {0: set(range(5)), 1: set(range(6)), 2: set(range(5)), 3: set(range(7))}


def test_normalisation_uses_the_given_mean_and_std(tmp_path, cache_dir):
    written = write_classes(tmp_path / "root" / "train", ["a", "b"], [2, 2])
    source = make_episode_source("image_folder", "train", root=tmp_path / "root", ways=2, shots=1, queries=1,
                                 device="cpu", image_size=SIZE, channels=3, rotations=False,
                                 mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0])
    batch = source.sample(1, torch.Generator().manual_seed(0))
    x = torch.cat([batch.support_x[0], batch.query_x[0]])
    ids = (x[:, 0, 0, 0] * 0.5 + 0.5) * 255
    image = written["ab"[round(ids[0].item())]][round(((x[0, 1, 0, 0] * 0.25 + 0.25) * 255).item())]
    expected = (torch.tensor(image).permute(2, 0, 1) / 255.0 - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1)) \
        / torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(x[0], expected)


def broken_image(root):
    split_folders(root)
    (root / "train" / "train2" / "002.png").write_bytes(b"not a png")
    return root / "train" / "train2" / "002.png"


@pytest.mark.parametrize("make, options, message", [
    (split_folders, {"ways": 5}, r"dataset.ways=5 but the 'train' split of .*/train has only 4 classes; lower "
                                 r"dataset.ways or give the split more classes"),
    (split_folders, {"shots": 2, "queries": 4}, r"class 'train0' of the 'train' split of .*/train has 5 images but "
                                                r"dataset.shots \+ dataset.queries = 6; add images to it"),
    (broken_image, {}, r"cannot read the image .*/train/train2/002.png \(.*\); replace or remove the file"),
    (lambda root: root.mkdir(), {}, r"no images in .*/root; expected ROOT/train\|val\|test/<class>/\*"),
    (lambda root: None, {}, r"dataset.root=.*/root is not a folder; point it at your images"),
    (lambda root: write_classes(root / "train", ["a", "b"], [3, 3]), {},
     r".*/root has split folders but no val/; add .*/val with class folders"),
    (lambda root: (write_classes(root, ["a", "b"], [3, 3]), (root / "val.txt").write_text("a\nz\n")), {},
     r".*/val.txt names the class 'z', which is not a folder with images in .*/root"),
])
def test_bad_folders_get_one_line_naming_the_problem_and_the_fix(tmp_path, cache_dir, make, options, message):
    root = tmp_path / "root"
    make(root)
    settings = {"ways": 2, "shots": 1, "queries": 1, **options}
    with pytest.raises(UserError, match=message) as error:
        make_episode_source("image_folder", "val" if "val" in message else "train", root=root, device="cpu",
                            image_size=SIZE, channels=3, rotations=False, **settings)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model, channels, size, width", [("omniglot_conv", 3, 20, 64), ("miniimagenet_conv", 1, 16, 32)])
def test_the_conv_nets_keep_their_design_and_take_the_folders_images(model, channels, size, width):
    config = validate(compose(["dataset=image_folder", "dataset.root=x", f"model={model}",
                               f"dataset.channels={channels}", f"dataset.image_size={size}"]))
    network = components.build_network(config, torch.device("cpu"))
    assert [block.conv.out_channels for block in network.features] == [width] * 4
    assert network(torch.zeros(2, channels, size, size)).shape == (2, 5)
    # The hand-written batched passes still apply.
    assert components.build_learner(config, network, torch.device("cpu"))._fused_model() is not None


def test_max_pooling_needs_images_of_at_least_16_pixels():
    with pytest.raises(UserError, match=r"model=miniimagenet_conv halves the image by max-pooling four times "
                                        r"and needs dataset.image_size >= 16, not 12; use model=omniglot_conv"):
        validate(compose(["dataset=image_folder", "dataset.root=x", "model=miniimagenet_conv", "dataset.image_size=12"]))


RUN = ["dataset=image_folder", f"dataset.image_size={SIZE}", "dataset.ways=3", "dataset.queries=2", "train.meta_steps=2", "train.meta_batch_size=2",
       "train.val_every=1", "train.val_episodes=2", "inner_solver.steps=2", "cg.steps=2", "eval.episodes=4",
       "eval.batch_size=2", "train.progress=false"]


def make_layout(root, layout):
    """Ten classes of 4 or 5 images (three splits of at least 3 classes) in ``layout``."""
    if layout == "split_folders":
        split_folders(root)
        return
    write_classes(root, [f"c{i}" for i in range(10)], [4, 5] * 5)
    if layout == "class_lists":
        for split, names in (("train", "c0 c1 c2 c3"), ("val", "c4 c5 c6"), ("test", "c7 c8 c9")):
            (root / f"{split}.txt").write_text("\n".join(names.split()))


@pytest.mark.parametrize("layout, channels", [("split_folders", 1), ("class_lists", 3), ("random_split", 3)])
def test_the_commands_train_and_evaluate_on_each_layout(tmp_path, cache_dir, layout, channels):
    """The installed scripts, from another folder, with a network built for the folder's images."""
    root = tmp_path / "root"
    make_layout(root, layout)
    env = {"IMAML_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    trained = run_cli("imaml-train", *RUN, "inner_solver.steps=5", f"dataset.root={root}",
                      f"dataset.channels={channels}", "dataset.split_fractions=[0.4,0.3,0.3]",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["metric"] == "accuracy" and results["test"]["ways"] == 3
    assert results["checkpoint"] == "best" and results["meta_steps"] == 2
    assert f"test accuracy {results['test']['mean']:.2f}%" in trained.stdout
    # Each class has its bright square in a place of its own: five inner steps from one example per
    # class tell them apart (100% here), far above the 33% of chance.
    assert results["test"]["mean"] >= 70 and results["best_val"] >= 70
    evaluated = run_cli("imaml-eval", f"checkpoint={tmp_path / 'run'}", "eval.episodes=6", "eval.split=val",
                        f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["episodes"] == 6 and result["split"] == "val" and result["ways"] == 3
    assert f"val accuracy {result['mean']:.2f}%" in evaluated.stdout and result["mean"] >= 70


def test_a_folder_without_images_is_refused_before_any_cache_is_written(tmp_path, cache_dir):
    """imaml-train on class folders that hold only other files; an empty folder, in this process."""
    root = tmp_path / "root"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        (root / name / "notes.txt").write_text("not an image")
    (root / "a" / "table.csv").write_text("1,2")
    done = run_cli("imaml-train", "dataset=image_folder", f"dataset.root={root}", "train.progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"IMAML_CACHE_DIR": str(cache_dir)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: no images in {root}; expected ROOT/train|val|test/<class>/*, "
                                               f"or ROOT/<class>/* (split by train.txt, val.txt and test.txt class "
                                               f"lists, or at random by dataset.split_fractions), with image files "
                                               f"({', '.join(image_folder.IMAGE_SUFFIXES)})"]
    assert "cache" not in done.stdout + done.stderr
    assert not cache_dir.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        load(tmp_path / "empty", "train")
    assert not cache_dir.exists()


def test_a_folder_that_cannot_serve_the_settings_stops_the_run_before_training(tmp_path, cache_dir):
    split_folders(tmp_path / "root")
    with pytest.raises(UserError, match=r"^dataset.ways=9 but the 'train' split of .* has only 4 classes"):
        train(compose(RUN + [f"dataset.root={tmp_path / 'root'}", "dataset.ways=9"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
