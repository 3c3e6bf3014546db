"""Read-only access to MVTec AD and any folder in its layout.

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/test/<defect type>/*.png          ("good" = normal test images)
    ROOT/CATEGORY/ground_truth/<defect type>/<name>_mask.png
    ROOT/CATEGORY/calibration/good/*.png              (optional, not MVTec AD's own: good
                                                       images from the line, for calibration)

    cat = load_category(root, "bottle")
    cat.train_paths                     # [Path]
    for item in cat.test_items: ...     # TestItem(path, defect, label, mask_path)
    loader = DataLoader(cat.test_set(size=256), batch_size=16)  # dicts: image, mask, label, ...

Every problem a user can make with such a folder is reported as an InputError naming the
path: checks run when the category is opened (layout, masks present, mask sizes equal to
image sizes, no stray files), so a long run does not fail half way; unreadable image data
is reported by load_image when the file is read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .images import IMAGE_SUFFIXES, load_image, open_image, resize

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper")
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OS_CLUTTER = ("Thumbs.db", "desktop.ini")  # skipped like hidden files (.DS_Store, ...)


@dataclass(frozen=True)
class TestItem:
    """One test image: its defect type ("good" for normal), label (0 good, 1 defective) and
    its ground-truth mask file (None for good images)."""

    __test__ = False  # not a pytest test class, despite the name

    path: Path
    defect: str
    label: int
    mask_path: Path | None


def list_categories(root: str | os.PathLike) -> list[str]:
    """Names of the sub-folders of `root` that hold a train/good folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such data folder")
    names = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not names:
        raise InputError(f"{root}: no categories found (expected CATEGORY/train/good/ folders, "
                         "MVTec AD layout)")
    return names


def load_category(root: str | os.PathLike, name: str) -> "Category":
    """Opens and checks one category folder root/name (see Category)."""
    return Category(root, name)


class Category:
    """One category of an MVTec-format data set, checked when opened.

    Attributes:
        name: category name; path: its folder.
        train_paths: sorted image paths in train/good (at least one).
        test_items: TestItems of every test/<defect>/ image, sorted by (defect, name); empty
            when there is no test folder (enough for fitting).
        defect_types: sorted defect types of the test set, without "good".
        calibration_paths: sorted image paths in calibration/good (good images from the
            line that set the threshold instead of a held-out share of train/good); empty
            without that folder.
        is_texture: True for the MVTec AD texture categories and synthetic textures (from
            the generator's meta.json), False otherwise.
        poses: {image path: theta [2, 3] as nested lists} of every image whose true pose the
            folder records (the generator's meta.json: theta takes the canonical frame into
            the image), or None.

    Raises:
        InputError: missing root, category or train/good; no training images; a file that
            is not an image in an image folder; a defective test image without its mask; a
            mask whose size differs from its image's.
    """

    def __init__(self, root: str | os.PathLike, name: str):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: no such data folder")
        self.name, self.path = name, root / name
        if not self.path.is_dir():
            found = [p.name for p in sorted(root.iterdir()) if (p / "train").is_dir()]
            raise InputError(f"{self.path}: no such category folder (found: {', '.join(found) or 'none'})")
        train = self.path / "train" / "good"
        if not train.is_dir():
            raise InputError(f"{train}: missing training folder (MVTec layout: CATEGORY/train/good/)")
        self.train_paths = _images_in(train)
        if not self.train_paths:
            raise InputError(f"{train}: no training images")
        self.test_items = self._test_items()
        line = self.path / "calibration" / "good"
        self.calibration_paths = _images_in(line) if line.is_dir() else []
        self.defect_types = sorted({t.defect for t in self.test_items} - {"good"})
        meta = _synthetic_meta(self.path)
        self.is_texture = name in MVTEC_TEXTURES or (meta or {}).get("kind") == "texture"
        self.poses = None if meta is None else meta["poses"]

    def __repr__(self) -> str:
        return (f"Category({self.name!r}, train={len(self.train_paths)}, "
                f"test={len(self.test_items)}, defects={self.defect_types})")

    def _test_items(self) -> list[TestItem]:
        test = self.path / "test"
        if not test.is_dir():
            return []
        items = []
        for folder in sorted(test.iterdir()):
            if folder.name.startswith(".") or folder.name in OS_CLUTTER:
                continue
            if not folder.is_dir():
                raise InputError(f"{folder}: unexpected file; test images go in test/<defect type>/")
            defect = folder.name
            for path in _images_in(folder):
                if defect == "good":
                    items.append(TestItem(path, defect, 0, None))
                    continue
                mask = self._mask_for(path, defect)
                _check_same_size(path, mask)
                items.append(TestItem(path, defect, 1, mask))
        return items

    def _mask_for(self, image: Path, defect: str) -> Path:
        folder = self.path / "ground_truth" / defect
        for candidate in (folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"):
            if candidate.is_file():
                return candidate
        raise InputError(f"{image}: defective test image has no mask "
                         f"(expected {folder / (image.stem + '_mask.png')})")

    def test_set(self, size: int | tuple[int, int] | None = None) -> "TestSet":
        """The test items as a torch Dataset (see TestSet)."""
        return TestSet(self.test_items, size)


class TestSet(torch.utils.data.Dataset):
    """Test images with masks and labels, for a DataLoader.

    Each item is a dict: "image" float [3, H, W] in [0, 1], "mask" bool [H, W] (all False
    for good images), "label" int, "defect" str, "path" str. With `size`, image and mask
    are resized to it (else images of one category must share a size to be batched).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, items: list[TestItem], size: int | tuple[int, int] | None = None):
        self.items, self.size = list(items), size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image = load_image(item.path, self.size)
        if item.mask_path is None:
            mask = torch.zeros(image.shape[1:], dtype=torch.bool)
        else:
            mask = load_mask(item.mask_path, self.size)
        return {"image": image, "mask": mask, "label": item.label, "defect": item.defect,
                "path": str(item.path)}


def load_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Reads a ground-truth mask as bool [H, W] (any non-zero pixel is defective).

    Args:
        path: mask image (MVTec: 0/255 L-mode PNG; RGB or palette masks also work).
        size: optional (H, W) or int; resized by area averaging, then thresholded at 0.5,
            so thin defects are kept as well as the resolution allows.
    """
    path = Path(path)
    binary = load_image(path).amax(0) > 0  # load_image checks existence and readability
    if size is None:
        return binary
    return resize(binary[None, None].float(), size)[0, 0] >= 0.5


def _images_in(folder: Path) -> list[Path]:
    """Image files of `folder`, sorted; hidden files skipped; anything else is an error."""
    paths = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name in OS_CLUTTER:
            continue
        if path.is_dir():
            raise InputError(f"{path}: unexpected folder inside an image folder")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        paths.append(path)
    return paths


def _image_size(path: Path) -> tuple[int, int]:
    with open_image(path) as img:  # reads the header only; the format and pixel checks apply
        return img.size


def _check_same_size(image: Path, mask: Path) -> None:
    image_size, mask_size = _image_size(image), _image_size(mask)
    if image_size != mask_size:
        raise InputError(f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image {image} is "
                         f"{image_size[0]}x{image_size[1]} (W x H)")


def _synthetic_meta(folder: Path) -> dict | None:
    """{"kind", "poses"} from the generator's meta.json, or None without a readable one."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return {"kind": meta["spec"]["kind"],
                "poses": {folder / rel: entry["theta"] for rel, entry in meta["images"].items()}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
