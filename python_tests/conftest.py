"""Device parametrisation shared by every test: a test that takes a ``device`` argument runs
on the CPU always and on CUDA when a GPU is present. The CUDA parameters carry the ``cuda``
marker (declared in pyproject.toml), so ``-m cuda`` selects exactly the GPU cases and
``-m "not cuda"`` the CPU ones."""

import pytest
import torch

DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    # Helpers draw from their own seeded generators; this only pins anything that uses the
    # global RNG (e.g. opcheck's internals) so failures reproduce.
    torch.manual_seed(0)
