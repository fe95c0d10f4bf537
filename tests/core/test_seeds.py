"""Derived seeds: fixed by the request id, within the range asked for, and the images' seeds
unchanged by moving the function to core.seeds."""

from __future__ import annotations

import hashlib

import pytest

from core.seeds import derive_seed


def test_a_seed_is_fixed_by_the_request_id_and_within_range() -> None:
    assert derive_seed("r-1") == derive_seed("r-1") != derive_seed("r-2")
    assert all(0 <= derive_seed(f"r-{i}", 2**32 - 1) <= 2**32 - 1 for i in range(200))
    assert derive_seed("r-1", 0) == 0
    with pytest.raises(ValueError, match="maximum"):
        derive_seed("r-1", 2**63)


def test_the_default_range_gives_the_seeds_images_always_had() -> None:
    for request_id in ("r-1", "4f1c…", ""):
        digest = hashlib.sha256(request_id.encode()).digest()
        assert derive_seed(request_id) == int.from_bytes(digest[:8], "big") & (2**63 - 1)
