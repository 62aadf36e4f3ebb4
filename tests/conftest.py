import pytest
from hypothesis import HealthCheck, settings

from emu import Machine

# Hypothesis profiles for the stateful tests that follow the loaded profile
# (tests/test_stateful.py): "ci", the default, keeps the suite's runtime
# reasonable on a 2-core machine; "long" explores far more
# (pytest --hypothesis-profile=long; hypothesis's pytest plugin loads it
# after this file). Tests with their own explicit settings keep them.
_COMMON = {"deadline": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much]}
settings.register_profile("ci", max_examples=10, stateful_step_count=20, **_COMMON)
settings.register_profile("long", max_examples=300, stateful_step_count=50, **_COMMON)
settings.load_profile("ci")


@pytest.fixture(scope="module")
def machine64m() -> Machine:
    """A 64 MiB machine shared by a module's tests (each test resets CR3 use)."""
    return Machine(64 << 20)
