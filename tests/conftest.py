import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

RULES = ["sago", "sago_prefer_retain", "pcgrad", "pcgrad_global", "sum"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
