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


@pytest.fixture
def torch_threads():
    """set(n): torch's intra-op thread count for this test (the threaded execution shares it out
    between blocks); the count before the test is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def triton_device():
    """Where the Triton kernel tests run: CPU tensors under TRITON_INTERPRET=1 (CI), CUDA tensors
    when the kernels are compiled for a GPU (bench/gpu_check.sh runs pytest with TRITON_INTERPRET=0).
    On CUDA, tensors the tests create land on the GPU through torch's default device."""
    from noprop import dispatch

    if dispatch.triton_interpreted():
        yield torch.device("cpu")
        return
    if not torch.cuda.is_available():
        pytest.skip("the Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1")
    torch.set_default_device("cuda")
    try:
        yield torch.device("cuda")
    finally:
        torch.set_default_device(None)  # None clears the override ("cpu" would leave one set)
