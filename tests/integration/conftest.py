from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cgid_testkit.harness import World, world


@pytest.fixture
async def sandbox() -> AsyncIterator[World]:
    async with world() as the_world:
        yield the_world
