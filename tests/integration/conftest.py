from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chainguard_identity_operator.testing.harness import World, world


@pytest.fixture
async def sandbox() -> AsyncIterator[World]:
    async with world() as the_world:
        yield the_world
