import os

import pytest
import torch

pytest_plugins = ["restoreflow.testing"]

# tiny float64 ops dominate the suite: one thread avoids oversubscription on the 2-core CI machine
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
