"""deepkern: hand-written CPU and CUDA kernels under drop-in PyTorch modules.

Importing the package loads the compiled extension, which registers every op under
``torch.ops.deepkern``, and attaches the fake kernels and autograd rules defined in
``deepkern.ops``.
"""

import logging
from importlib import metadata

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from deepkern import _C
from deepkern import nn as nn
from deepkern import ops as ops

logging.getLogger("deepkern").addHandler(logging.NullHandler())

try:
    __version__ = metadata.version("deepkern")
except metadata.PackageNotFoundError:  # running from a source tree with a copied extension
    __version__ = _C.build_info()["version"]


def build_info() -> dict:
    """What the installed extension was compiled with.

    Returns:
        dict with ``version``, ``torch_version`` (the torch it was built against), ``cuda``
        (whether the CUDA kernels are compiled in), ``cuda_version`` and ``cuda_archs``
        (for example ``"80;90"``; empty without CUDA).

    Example:
        >>> deepkern.build_info()["cuda"]
        False
    """
    return dict(_C.build_info())


__all__ = ["__version__", "build_info", "ops"]
