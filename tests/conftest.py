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


@pytest.fixture
def one_torch_thread():
    # The eager references are many small int64/float ops: on 2 shared cores, torch's intra-op
    # threads mostly wait on each other (10-25x slower under load). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
