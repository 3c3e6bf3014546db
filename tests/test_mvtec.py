"""MVTec-format folder loader: generated data, and every way a folder can be broken."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from stnpadim_ext.data.mvtec import MVTEC_CATEGORIES, MVTEC_TEXTURES, list_categories, load_category, load_mask
from stnpadim_ext.data.synth import DEFECTS, make_dataset
from stnpadim_ext.errors import InputError

SIZE = 48


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    make_dataset(root, categories=["part_drift", "grain"], seed=1, image_size=SIZE, n_train=4,
                 n_test_good=2, n_test_defect=2, progress=False)
    return root


@pytest.fixture
def root(source, tmp_path):
    """A private copy of the data set, free to break."""
    shutil.copytree(source, tmp_path / "data")
    return tmp_path / "data"


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def test_mvtec_names():
    assert len(set(MVTEC_CATEGORIES)) == 15
    assert set(MVTEC_TEXTURES) < set(MVTEC_CATEGORIES)


def test_reads_generated_category(source):
    before = _snapshot(source)
    assert list_categories(source) == ["grain", "part_drift"]
    cat = load_category(source, "part_drift")
    assert [p.name for p in cat.train_paths] == ["000.png", "001.png", "002.png", "003.png"]
    assert cat.defect_types == sorted(DEFECTS)
    assert not cat.is_texture and load_category(source, "grain").is_texture
    assert len(cat.test_items) == 2 + 2 * len(DEFECTS)
    for item in cat.test_items:
        assert item.path.parent.name == item.defect
        if item.defect == "good":
            assert item.label == 0 and item.mask_path is None
        else:
            assert item.label == 1
            assert item.mask_path == source / "part_drift/ground_truth" / item.defect / f"{item.path.stem}_mask.png"
            mask = load_mask(item.mask_path)
            raw = np.asarray(Image.open(item.mask_path))
            assert mask.dtype == torch.bool and mask.shape == (SIZE, SIZE)
            assert torch.equal(mask, torch.from_numpy(raw > 0))
    dataset = cat.test_set(size=32)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    assert batch["image"].shape == (len(dataset), 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (len(dataset), 32, 32) and batch["mask"].dtype == torch.bool
    assert batch["label"].tolist() == [t.label for t in cat.test_items]
    assert not batch["mask"][batch["label"] == 0].any()
    assert batch["mask"].flatten(1).any(1)[batch["label"] == 1].all()  # defects survive resizing
    assert batch["path"] == [str(t.path) for t in cat.test_items]
    assert _snapshot(source) == before  # read-only


def test_true_poses_and_line_calibration_images(root):
    cat = load_category(root, "part_drift")
    assert cat.calibration_paths == [] and set(cat.poses) >= set(cat.train_paths)
    assert all(item.path in cat.poses for item in cat.test_items)
    assert torch.tensor(cat.poses[cat.train_paths[0]]).shape == (2, 3)
    line = root / "part_drift" / "calibration" / "good"
    line.mkdir(parents=True)
    shutil.copy(cat.train_paths[0], line / "b.png")
    shutil.copy(cat.train_paths[1], line / "a.png")
    assert [p.name for p in load_category(root, "part_drift").calibration_paths] == ["a.png", "b.png"]
    (line / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt"):
        load_category(root, "part_drift")
    (line / "notes.txt").unlink()
    (root / "part_drift" / "meta.json").write_text("{")  # a damaged record: no poses, no error
    assert load_category(root, "part_drift").poses is None


def test_mask_resize(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[8:24, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    small = load_mask(tmp_path / "m.png", size=20)
    assert small.shape == (20, 20)
    assert torch.equal(small, torch.from_numpy(mask[::2, ::2] > 0))
    assert load_mask(tmp_path / "m.png", size=(10, 20)).sum() == 4 * 10


def test_fit_only_category_without_test_folder(root):
    shutil.rmtree(root / "grain" / "test")
    cat = load_category(root, "grain")
    assert cat.test_items == [] and len(cat.train_paths) == 4


def test_hidden_files_are_skipped(root):
    (root / "grain/train/good/.DS_Store").write_bytes(b"\0\1junk")
    (root / "grain/test/hole/Thumbs.db").write_bytes(b"junk")
    (root / "grain/test/.DS_Store").write_bytes(b"junk")
    cat = load_category(root, "grain")
    assert len(cat.train_paths) == 4 and len(cat.test_items) == 2 + 2 * len(DEFECTS)


def _error(root, category="grain"):
    with pytest.raises(InputError) as info:
        load_category(root, category)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_root_and_category(root):
    assert "no such data folder" in _error(root / "nope")
    message = _error(root, "carpet")
    assert str(root / "carpet") in message and "grain" in message and "part_drift" in message
    with pytest.raises(InputError, match="no such data folder"):
        list_categories(root / "nope")
    with pytest.raises(InputError, match="no categories"):
        list_categories(root / "grain")


def test_missing_or_empty_train_good(root):
    shutil.rmtree(root / "grain/train/good")
    assert str(root / "grain/train/good") in _error(root) and "missing" in _error(root)
    (root / "grain/train/good").mkdir()
    (root / "grain/train/good/.DS_Store").write_bytes(b"x")
    assert "no training images" in _error(root)


def test_non_image_file(root):
    (root / "grain/test/stain/notes.txt").write_text("hello")
    message = _error(root)
    assert str(root / "grain/test/stain/notes.txt") in message and "not an image" in message
    (root / "grain/test/stain/notes.txt").unlink()
    (root / "part_drift/train/good/readme.md").write_text("hello")
    assert "readme.md" in _error(root, "part_drift")


def test_stray_file_or_folder(root):
    (root / "grain/test/list.csv").write_text("a,b")
    assert "list.csv" in _error(root)
    (root / "grain/test/list.csv").unlink()
    (root / "grain/train/good/sub").mkdir()
    assert "unexpected folder" in _error(root)


def test_mask_missing(root):
    (root / "grain/ground_truth/scratch/001_mask.png").unlink()
    message = _error(root)
    assert str(root / "grain/test/scratch/001.png") in message and "no mask" in message


def test_mask_size_differs(root):
    mask_path = root / "grain/ground_truth/hole/000_mask.png"
    Image.open(mask_path).resize((SIZE + 4, SIZE)).save(mask_path)
    message = _error(root)
    assert str(mask_path) in message and f"{SIZE + 4}x{SIZE}" in message and f"{SIZE}x{SIZE}" in message


def test_zero_byte_and_corrupt_defective_images_fail_when_opened(root):
    image = root / "grain/test/cut_paste/000.png"
    image.write_bytes(b"")
    assert str(image) in _error(root) and "0 bytes" in _error(root)
    image.write_bytes(os.urandom(300))
    assert str(image) in _error(root) and "not a readable image" in _error(root)


def test_truncated_and_zero_byte_images_fail_when_loaded(root):
    train = root / "part_drift/train/good"
    data = (train / "001.png").read_bytes()
    (train / "001.png").write_bytes(data[: len(data) // 2])
    (train / "002.png").write_bytes(b"")
    cat = load_category(root, "part_drift")  # headers are not read for training images
    from stnpadim_ext.data import load_image
    with pytest.raises(InputError, match="001.png: not a readable image"):
        load_image(cat.train_paths[1])
    with pytest.raises(InputError, match="002.png: empty file"):
        load_image(cat.train_paths[2])
    good = next(t for t in cat.test_items if t.defect == "good")
    good.path.write_bytes(data[:40])
    with pytest.raises(InputError, match=good.path.name):
        cat.test_set()[cat.test_items.index(good)]
