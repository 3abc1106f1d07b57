import os

import pytest

pytest_plugins = ["tests.mlflow_server"]

# Variables that would silently change what a test's processes do (a leaked RANK/WORLD_SIZE
# halves what a reader sees; a leaked tracking URI sends test runs to someone's server).
LEAKY_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MLFLOW_TRACKING_URI",
    "ORCH_ROOT",
)


@pytest.fixture(autouse=True, scope="session")
def clean_environment():
    for name in LEAKY_VARIABLES:
        os.environ.pop(name, None)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny in-process models: they gain nothing from threads, lose a lot
    to them on a busy 2-core machine, and one thread keeps float results fixed across runs."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
