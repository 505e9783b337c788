"""Shared pytest fixtures."""

import pytest

from fewstep.testing import one_thread


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (see :func:`fewstep.testing.one_thread`)."""
    with one_thread():
        yield
