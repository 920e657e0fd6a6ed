"""Image classification data that needs no download.

- :func:`load_digits_split`: scikit-learn's handwritten digits (1797 scanned 8x8 grey images of
  the digits 0-9, shipped inside the scikit-learn package), split, normalised and resized.
- :func:`load_npz_split`: any image set that a user has saved as one ``.npz`` file (for
  example CIFAR-10 for a full-size run), read without unpickling anything.
- :func:`load_photo_patches`: colour texture patches cut from the two photographs that
  scikit-learn ships (``load_sample_images``), labelled by the region they come from.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits_split", "load_npz_split", "load_photo_patches"]

Split = tuple[Tensor, Tensor, Tensor, Tensor]


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _standardise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    # Statistics of the training images only, per channel, so that the test set stays unseen.
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits_split(
    seed: int,
    test_fraction: float = 0.2,
    size: int = 8,
    dtype: torch.dtype = torch.float32,
    scaling: str = "standardise",
) -> Split:
    """scikit-learn's handwritten digits as a stratified, seeded train/test split.

    The 1797 images are scaled to [0, 1], resized with bilinear interpolation when ``size`` is
    not 8, and standardised with the mean and standard deviation of the training images
    (``scaling="standardise"``) or mapped to [-1, 1] (``scaling="symmetric"``, the range of a
    generator with a tanh output). Each class keeps its share in both parts.

    Args:
        seed: the seed of the split; the same seed gives the same split.
        test_fraction (float in (0, 1)): share of the images held out for testing.
        size (int >= 1): side of the returned images, for example 8 (as scanned), 16 or 32.
        dtype: floating-point type of the images.
        scaling ("standardise" or "symmetric"): zero mean and unit variance over the training
            images, or pixel values in [-1, 1] (blank paper at -1, full ink at 1).

    Returns:
        (x_train, y_train, x_test, y_test): x as Tensor[N, 1, size, size] of ``dtype``, y as
        Tensor[N] int64 with values 0-9. With the defaults N is 1437 and 360.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: test_fraction outside (0, 1), size below 1, a non-floating dtype or an
            unknown scaling.

    Example:
        >>> x_train, y_train, x_test, y_test = load_digits_split(seed=0, size=16)
        >>> x_train.shape
        torch.Size([1437, 1, 16, 16])
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    if scaling not in ("standardise", "symmetric"):
        raise ValueError(f"scaling must be 'standardise' or 'symmetric', got {scaling!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "load_digits_split needs scikit-learn; install it with: pip install deepkern[models]"
        ) from error

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    train_idx, test_idx = train_test_split(
        np.arange(len(images)),
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    x = _resize(x, size)
    if scaling == "symmetric":
        # Bilinear interpolation stays within [0, 1], so the result stays within [-1, 1].
        x_train, x_test = 2.0 * x[train_idx] - 1.0, 2.0 * x[test_idx] - 1.0
    else:
        x_train, x_test = _standardise(x[train_idx], x[test_idx])
    return x_train.to(dtype), y[train_idx], x_test.to(dtype), y[test_idx]


def _to_nchw(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{name} must have 3 or 4 dimensions, got shape {x.shape}")
    # Channels last (N, H, W, C) is how most image sets are stored; channels are few.
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    return x


def load_npz_split(
    path: str | os.PathLike, size: int | None = None, dtype: torch.dtype = torch.float32
) -> Split:
    """A train/test image set from one ``.npz`` file, standardised per channel.

    The file holds four arrays: ``x_train`` and ``x_test`` (N, H, W), (N, C, H, W) or
    (N, H, W, C), any numeric type (uint8 pixels are scaled to [0, 1]), and ``y_train`` and
    ``y_test`` (N,) integer labels. CIFAR-10 fits this layout; build the file once from the
    official archive with numpy and pass its path on the command line.

    Args:
        path: the ``.npz`` file.
        size: resize the images to ``size`` x ``size`` (bilinear); None keeps them.
        dtype: floating-point type of the images.

    Returns:
        (x_train, y_train, x_test, y_test): x as Tensor[N, C, H, W] of ``dtype``, y as
        Tensor[N] int64.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a missing array, shapes that disagree, or labels that are not integers.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image set at {os.fspath(path)!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy's message would suggest unpickling an untrusted file
        raise ValueError(
            f"{os.fspath(path)!r} is not a .npz archive of plain arrays "
            "(x_train, y_train, x_test, y_test)"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{os.fspath(path)!r} holds one array, not a .npz archive of four")
    with archive as arrays:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
        if missing:
            raise ValueError(f"{os.fspath(path)!r} lacks the arrays {sorted(missing)}")
        parts = {name: arrays[name] for name in ("x_train", "y_train", "x_test", "y_test")}

    xs = []
    for name in ("x_train", "x_test"):
        x = _to_nchw(parts[name], name)
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        xs.append(torch.from_numpy(x.astype(np.float64) / scale))
    ys = []
    for name, x in zip(("y_train", "y_test"), xs):
        y = parts[name]
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
            raise ValueError(
                f"{name} must be integers shaped ({x.shape[0]},), got {y.dtype} {y.shape}"
            )
        ys.append(torch.from_numpy(y.astype(np.int64)))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise ValueError(
            f"x_train and x_test images differ: {tuple(xs[0].shape)} and {tuple(xs[1].shape)}"
        )

    if size is not None:
        xs = [_resize(x, size) for x in xs]
    x_train, x_test = _standardise(xs[0], xs[1])
    return x_train.to(dtype), ys[0], x_test.to(dtype), ys[1]


# The photographs are shrunk so that a patch covers what 64x64 pixels cover at full size:
# large enough to hold texture (roof tiles, leaves, petals), small enough for many patches.
_PATCH_FOOTPRINT = 64


def load_photo_patches(
    seed: int,
    size: int = 16,
    train_per_region: int = 250,
    test_per_region: int = 60,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Colour patches of the two photographs that scikit-learn ships, labelled by region.

    ``sklearn.datasets.load_sample_images`` holds two 427x640 RGB photographs (a temple in a
    landscape and a flower) inside the scikit-learn package, so nothing is downloaded. Each
    photograph is shrunk by ``size / 64`` and cut into a 2x2 grid of regions; the label of a
    patch is its region (0-3 the first photograph, 4-7 the second, row by row). Patches are
    ``size`` x ``size`` at seeded random positions anywhere in their region, training and test
    patches drawn independently: the test set is a fresh sample of the same distribution, not
    disjoint from the training set (patches overlap, within and across the parts). The set is
    small and its patches correlated.

    Args:
        seed: the seed of the patch positions.
        size (int in [4, 64]): side of the patches.
        train_per_region, test_per_region (int >= 1): patches per region and part.
        dtype: floating-point type of the images.

    Returns:
        (x_train, y_train, x_test, y_test): x as Tensor[N, 3, size, size] of ``dtype`` with
        values in [-1, 1], y as Tensor[N] int64 with values 0-7; N is 8 * train_per_region
        and 8 * test_per_region.

    Raises:
        ImportError: scikit-learn or Pillow (which reads the photographs) is not installed.
        ValueError: a size outside [4, 64], counts below 1, or a non-floating dtype.

    Example:
        >>> x_train, y_train, x_test, y_test = load_photo_patches(seed=0, size=16)
        >>> x_train.shape
        torch.Size([2000, 3, 16, 16])
    """
    if not isinstance(size, int) or not 4 <= size <= _PATCH_FOOTPRINT:
        raise ValueError(f"size must be an integer in [4, {_PATCH_FOOTPRINT}], got {size!r}")
    for name, count in (
        ("train_per_region", train_per_region),
        ("test_per_region", test_per_region),
    ):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
    except ImportError as error:
        raise ImportError(
            "load_photo_patches needs scikit-learn and Pillow; install them with: "
            "pip install deepkern[models]"
        ) from error

    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, tuple[list[Tensor], list[int]]] = {"train": ([], []), "test": ([], [])}
    for photo_index, photo in enumerate(photos):
        image = torch.from_numpy(np.asarray(photo, dtype=np.float64) / 255.0).permute(2, 0, 1)
        height = round(image.shape[1] * size / _PATCH_FOOTPRINT)
        width = round(image.shape[2] * size / _PATCH_FOOTPRINT)
        image = F.interpolate(
            image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0.0, 1.0)
        for row in range(2):
            for col in range(2):
                top, bottom = row * height // 2, (row + 1) * height // 2
                left, right = col * width // 2, (col + 1) * width // 2
                label = 4 * photo_index + 2 * row + col
                for part, count in (("train", train_per_region), ("test", test_per_region)):
                    ys = torch.randint(top, bottom - size + 1, (count,), generator=generator)
                    xs = torch.randint(left, right - size + 1, (count,), generator=generator)
                    for y0, x0 in zip(ys.tolist(), xs.tolist()):
                        parts[part][0].append(image[:, y0 : y0 + size, x0 : x0 + size])
                    parts[part][1].extend([label] * count)

    result = []
    for part in ("train", "test"):
        patches, labels = parts[part]
        result.append((2.0 * torch.stack(patches) - 1.0).to(dtype))
        result.append(torch.tensor(labels, dtype=torch.int64))
    return result[0], result[1], result[2], result[3]
