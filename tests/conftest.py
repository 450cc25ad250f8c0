# The Triton interpreter must be switched on before any module defining @triton.jit kernels is
# imported, so this comes first: CPU tests then run the Triton kernels interpreted.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NOPROP_BACKEND", "auto")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
