"""`noprop.info`: the op x backend availability report."""
import subprocess
import sys
import types

from noprop import dispatch, info
from noprop.ops import OPS


def test_main_prints_every_op_and_backend(capsys):
    assert info.main() == 0
    out = capsys.readouterr().out
    for name in OPS + dispatch.BACKENDS:
        assert name in out
    assert "device cpu" in out and "auto picks: eager" in out
    assert "torch " in out and "triton " in out
    # every "no [i]" cell has its footnote with the reason from dispatch.why_unavailable
    assert "CUDA tensors only" in out


def test_says_how_blocks_execute_for_the_thread_count(capsys, torch_threads):
    torch_threads(2)
    info.main()
    assert "block execution auto: threads (groups of blocks on 2 CPU threads at once)" in capsys.readouterr().out
    torch_threads(1)
    info.main()
    assert "block execution auto: loop (one block after another: 1 torch thread" in capsys.readouterr().out


def test_says_from_how_many_blocks_cuda_stacks():
    # The engine's CUDA rule needs no GPU to state: stacked from CUDA_VMAP_MIN_BLOCKS blocks on.
    import torch

    from noprop import engine
    n = engine.CUDA_VMAP_MIN_BLOCKS
    assert info._execution_pick(torch.device("cuda")) == (
        f"bank (identical blocks held as one bank of stacked parameters, run as one) for models of >= {n} blocks, "
        "loop for fewer")


def test_says_which_convolution_a_bank_runs(monkeypatch, capsys):
    import torch

    monkeypatch.delenv("NOPROP_BANK_CONV", raising=False)
    assert info._bank_conv(torch.device("cuda")).startswith("grouped: one grouped convolution over the blocks [default")
    info.main()
    assert "bank convolutions: loop: one convolution per block" in capsys.readouterr().out
    monkeypatch.setenv("NOPROP_BANK_CONV", "gemm")
    assert info._bank_conv(torch.device("cpu")).startswith("gemm: unfold + one batched matrix multiply")
    monkeypatch.setenv("NOPROP_BANK_CONV", "fft")
    assert info._bank_conv(torch.device("cpu")).startswith("invalid (NOPROP_BANK_CONV must be")


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "noprop.info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(op in done.stdout for op in OPS)


def test_says_whether_nvml_is_installed(monkeypatch, capsys):
    # Both states faked, so the test holds whether or not nvidia-ml-py is installed here.
    monkeypatch.setitem(sys.modules, "pynvml", None)  # None in sys.modules: import raises ImportError
    info.main()
    assert ("NVML (nvidia-ml-py): not installed: pip install nvidia-ml-py, or noprop's bench extra"
            in capsys.readouterr().out)
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))
    info.main()
    out = capsys.readouterr().out
    assert "NVML (nvidia-ml-py): installed (" in out and "not installed" not in out
