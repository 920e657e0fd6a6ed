"""Where the public verification benchmark files are, for the tests that use them."""

from __future__ import annotations

import os

import pytest


def verification_data() -> str:
    """The folder of the verification benchmarks, or "" when absent.

    The files live in shared/data/verification beside the repository (or beside the folder
    that holds its worktrees); DEEPKERN_VERIFICATION_DATA overrides.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [
        os.environ.get("DEEPKERN_VERIFICATION_DATA", ""),
        os.path.join(root, "..", "shared", "data", "verification"),
        os.path.join(root, "..", "..", "shared", "data", "verification"),
    ]
    return next((os.path.abspath(c) for c in candidates if c and os.path.isdir(c)), "")


SHARED = verification_data()
needs_data = pytest.mark.skipif(not SHARED, reason="shared verification data absent")
