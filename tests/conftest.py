import os
import sys

import pytest

# The spawned ranks import tests/ranks/*.py (as ranks.<name>) and tests/distributed.py by module
# name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def _shared_ranks_stop_with_the_session():
    """run_ranks(..., shared=True) keeps its pools of ranks for the whole session: stop them
    at its end (before pytest's own teardown, rather than at interpreter exit)."""
    yield
    import distributed

    distributed.close_shared()
