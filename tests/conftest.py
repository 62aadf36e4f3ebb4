import pytest

from emu import Machine


@pytest.fixture(scope="module")
def machine64m() -> Machine:
    """A 64 MiB machine shared by a module's tests (each test resets CR3 use)."""
    return Machine(64 << 20)
