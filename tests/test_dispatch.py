"""noprop.dispatch: the one place that picks triton / cuda / eager per call (device and dtype)."""
import threading

import pytest
import torch

import noprop.kernels.triton as T
from noprop import dispatch, ops
from noprop.ops import eager


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    # small networks / many small eager ops: one torch thread on the shared 2-core machine
    yield


@pytest.fixture(autouse=True)
def _fresh_choices():
    # Tests here fake availability (monkeypatched probes): nothing they make dispatch remember may
    # outlive them, and each starts from an empty memory.
    dispatch.forget_choices()
    yield
    dispatch.forget_choices()


# Tests that run Triton on CPU tensors: only under TRITON_INTERPRET=1 (CI); bench/gpu_check.sh runs
# this file with compiled kernels, where CPU tensors cannot go to Triton at all.
needs_interpreter = pytest.mark.skipif(not dispatch.triton_interpreted(),
                                       reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")


def _loss_args(dtype=torch.float32):
    return (torch.randn(2, 3, 10, dtype=dtype), torch.randn(10, 4, dtype=dtype), torch.tensor([0, 3, 9]),
            torch.rand(2, dtype=dtype))


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args):
        calls.append(name)
        return real(*args)
    monkeypatch.setattr(module, name, spy)
    return calls


def test_cuda_on_cpu_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="NOPROP_BACKEND=cuda cannot run on cpu: .*CUDA tensors only"):
        dispatch.backend_name(torch.device("cpu"))
    with pytest.raises(dispatch.BackendUnavailable, match="CUDA tensors only"):
        ops.local_loss(*_loss_args())


@pytest.mark.parametrize("name", ["tpu", "", "triton,eager"])
def test_invalid_backend_name_raises(monkeypatch, name):
    monkeypatch.setenv("NOPROP_BACKEND", name)
    with pytest.raises(ValueError, match="is not one of auto"):
        dispatch.requested_backend()
    with pytest.raises(ValueError, match="is not one of auto"):
        ops.local_loss(*_loss_args())


def test_invalid_name_in_use_backend_raises_at_entry():
    with pytest.raises(ValueError, match="is not one of auto"):
        with dispatch.use_backend("bogus"):
            pass
    assert dispatch.requested_backend() == "auto"  # the bad override did not stick


def test_names_are_case_and_space_insensitive(monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", " Eager ")
    assert dispatch.requested_backend() == "eager"


def test_auto_on_cpu_picks_eager(monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", "auto")
    assert dispatch.backend_name(torch.device("cpu")) == "eager"
    calls_e, calls_t = _spy(monkeypatch, eager, "local_loss"), _spy(monkeypatch, T, "local_loss")
    ops.local_loss(*_loss_args())
    assert calls_e == ["local_loss"] and calls_t == []


@needs_interpreter
def test_triton_selectable_under_the_interpreter(monkeypatch):
    assert dispatch.triton_interpreted()
    assert dispatch.why_unavailable("triton", torch.device("cpu")) is None
    calls_e, calls_t = _spy(monkeypatch, eager, "local_loss"), _spy(monkeypatch, T, "local_loss")
    with dispatch.use_backend("triton"):
        assert dispatch.backend_name(torch.device("cpu")) == "triton"
        ops.local_loss(*_loss_args())
    assert calls_t == ["local_loss"] and calls_e == []
    monkeypatch.setenv("NOPROP_BACKEND", "triton")  # the environment variable does the same
    ops.local_loss(*_loss_args())
    assert calls_t == ["local_loss"] * 2


@needs_interpreter
def test_float64_raises_under_explicit_triton_and_goes_to_eager_under_auto(monkeypatch):
    with dispatch.use_backend("triton"):
        with pytest.raises(dispatch.BackendUnavailable, match="float64 inputs run on the eager reference"):
            ops.local_loss(*_loss_args(torch.float64))
    calls_e = _spy(monkeypatch, eager, "local_loss")
    # auto on a CUDA device would take triton for float32 but eager for float64 (CUDA faked here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    assert dispatch.backend_name(cuda, [torch.float32]) == "triton"
    assert dispatch.backend_name(cuda, [torch.float32, torch.float64]) == "eager"
    assert "float32" in dispatch.why_unavailable("triton", cuda, torch.float64)
    assert dispatch.why_unavailable("triton", cuda, torch.bfloat16) is None
    loss = ops.local_loss(*_loss_args(torch.float64))  # auto on CPU: eager, float64 result
    assert loss.dtype == torch.float64 and calls_e == ["local_loss"]


def test_triton_without_interpreter_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in dispatch.why_unavailable("triton", torch.device("cpu"))
    with dispatch.use_backend("triton"), pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
        ops.local_loss(*_loss_args())


@needs_interpreter
def test_kernels_compiled_before_the_interpreter_was_switched_on(monkeypatch):
    monkeypatch.setattr(T, "INTERPRETED", False)
    assert "imported before TRITON_INTERPRET=1" in dispatch.why_unavailable("triton", torch.device("cpu"))


def test_cuda_device_without_gpu_and_unknown_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in dispatch.why_unavailable("triton", torch.device("cuda"))
    assert dispatch.backend_name(torch.device("cuda")) == "eager"  # auto falls back
    assert "no support for meta" in dispatch.why_unavailable("triton", torch.device("meta"))
    assert dispatch.why_unavailable("eager", torch.device("meta")) is None
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.why_unavailable("opencl", torch.device("cpu"))


def test_use_backend_nests_restores_and_is_thread_local():
    seen = {}
    with dispatch.use_backend("triton"):
        with dispatch.use_backend("eager"):
            assert dispatch.requested_backend() == "eager"
        assert dispatch.requested_backend() == "triton"
        worker = threading.Thread(target=lambda: seen.setdefault("other", dispatch.requested_backend()))
        worker.start()
        worker.join()
    assert seen["other"] == "auto" and dispatch.requested_backend() == "auto"


@pytest.mark.skipif(dispatch.why_unavailable("triton", torch.device("cpu")) is not None,
                    reason=str(dispatch.why_unavailable("triton", torch.device("cpu"))))
def test_backward_follows_the_forwards_backend_on_any_thread(monkeypatch):
    # On CUDA, autograd runs the backward on its own device thread, which does not see a
    # use_backend(...) request made on the training thread: the backward must follow the forward.
    monkeypatch.delenv("NOPROP_BACKEND", raising=False)
    calls = [_spy(monkeypatch, T, name) for name in ("local_loss_backward", "noise_inject_backward")]
    logits, W, y, weight = (t.requires_grad_() if t.is_floating_point() else t for t in _loss_args())
    with dispatch.use_backend("triton"):
        z = ops.noise_inject(W, y, weight.detach()[:1], weight.detach()[1:], ops.new_seed())
        loss = ops.local_loss(logits, W, y, weight).sum() + z.sum()
    worker = threading.Thread(target=loss.backward)  # outside the request, on another thread
    worker.start()
    worker.join()
    assert calls == [["local_loss_backward"], ["noise_inject_backward"]]
    assert W.grad is not None and logits.grad is not None


def _count_probes(monkeypatch):
    """Calls of dispatch.why_unavailable, the availability probe every choice goes through."""
    probes = []
    real = dispatch.why_unavailable

    def counting(*args):
        probes.append(args)
        return real(*args)
    monkeypatch.setattr(dispatch, "why_unavailable", counting)
    return probes


def test_a_repeated_call_does_not_choose_again(monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", "auto")
    probes, calls_e = _count_probes(monkeypatch), _spy(monkeypatch, eager, "local_loss")
    args = _loss_args()
    ops.local_loss(*args)
    first = len(probes)
    assert first > 0  # the first call chose
    for _ in range(3):
        ops.local_loss(*args)
    assert len(probes) == first and calls_e == ["local_loss"] * 4
    ops.local_loss(*_loss_args(torch.float64))  # new dtypes: a new choice, then remembered too
    second = len(probes)
    assert second > first
    ops.local_loss(*_loss_args(torch.float64))
    assert len(probes) == second
    dispatch.forget_choices()
    ops.local_loss(*args)
    assert len(probes) > second


def test_the_request_is_part_of_what_is_remembered(monkeypatch):
    # Triton made available on CPU (its probe and its function faked), so that auto (eager on CPU)
    # and an explicit triton request differ on this machine whatever TRITON_INTERPRET says.
    monkeypatch.delenv("NOPROP_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_triton_reason", lambda device: None)
    calls_t = []

    def fake_triton(*args):
        calls_t.append("local_loss")
        return eager.local_loss(*args)
    monkeypatch.setattr(T, "local_loss", fake_triton)
    calls_e = _spy(monkeypatch, eager, "local_loss")
    args = _loss_args()
    ops.local_loss(*args)
    assert calls_e == ["local_loss"] and calls_t == []
    with dispatch.use_backend("triton"):
        ops.local_loss(*args)
    assert calls_t == ["local_loss"] and len(calls_e) == 2  # the fake ran, then called eager itself
    ops.local_loss(*args)  # the request is over: auto's remembered choice again
    assert calls_t == ["local_loss"] and len(calls_e) == 3
    monkeypatch.setenv("NOPROP_BACKEND", "triton")  # the environment variable is read per call too
    ops.local_loss(*args)
    assert calls_t == ["local_loss"] * 2
    with dispatch.use_backend("cuda"), pytest.raises(dispatch.BackendUnavailable, match="CUDA tensors only"):
        ops.local_loss(*args)
    with dispatch.use_backend("eager"):
        ops.local_loss(*args)
    assert calls_t == ["local_loss"] * 2 and len(calls_e) == 5


def test_a_refusal_is_not_remembered(monkeypatch):
    # BackendUnavailable every time while the backend cannot run, and a working call once it can.
    reason = {"now": "faked: not yet"}
    monkeypatch.setattr(dispatch, "_triton_reason", lambda device: reason["now"])
    monkeypatch.setattr(T, "local_loss", eager.local_loss)
    with dispatch.use_backend("triton"):
        for _ in range(2):
            with pytest.raises(dispatch.BackendUnavailable, match="faked: not yet"):
                ops.local_loss(*_loss_args())
        reason["now"] = None
        assert ops.local_loss(*_loss_args()).shape == (2,)


def test_a_late_cuda_load_makes_dispatch_choose_again(monkeypatch):
    # load() after a failed first look (JIT build faked): choices made before it are dropped.
    import noprop.kernels.cuda as cuda_ext
    dispatch.why_unavailable("cuda", torch.device("cuda"))  # dispatch has looked at the extension
    monkeypatch.setattr(cuda_ext, "_ensure_loaded", lambda: "faked: not built")
    monkeypatch.setattr(cuda_ext, "_jit_build", lambda verbose: None)
    monkeypatch.setattr(cuda_ext, "_register_fakes", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setitem(cuda_ext._state, "error", cuda_ext._state["error"])  # restored afterwards
    probes = _count_probes(monkeypatch)
    ops.local_loss(*_loss_args())
    seen = len(probes)
    ops.local_loss(*_loss_args())
    assert len(probes) == seen
    cuda_ext.load()
    ops.local_loss(*_loss_args())
    assert len(probes) > seen
