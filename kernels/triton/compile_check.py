"""Compile every Triton kernel for a GPU architecture on a machine without a GPU.

    python -m noprop.kernels.triton.compile_check [--arch 90] [--quick] [--json PATH]

Sessions with a GPU are rare and short here, and the Triton interpreter accepts programs that do not
compile for a real GPU (a `tl.dot` dimension below 16, for one). This runs each op's launcher on CPU
tensors of the shapes and dtypes the tests use, records the kernel launches instead of running them,
and compiles each distinct specialization ahead of time (`triton.compile(ASTSource, GPUTarget)`) down
to a cubin, then asks ptxas for its registers and spills. A kernel that fails to compile fails the
check; spills are listed (they cost speed, not correctness) and fail it only with --strict.
Nothing here touches a GPU or a CUDA driver.

The specialization follows what Triton's launcher would do on a GPU: tensor arguments become typed
pointers, integers typed by their range, integers equal to 1 constants (Triton's value
specialization), keyword tile sizes and flags constexprs. Triton also specializes pointers and
integers on divisibility by 16 (which only changes vectorization, not whether the kernel compiles);
this check compiles without those hints, so register counts may differ slightly from a real launch.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

_DTYPE_CODES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Launch:
    """One recorded kernel launch, reduced to what decides its compiled code."""

    kernel: object  # triton JITFunction
    signature: dict
    constexprs: dict
    options: dict
    shape: str = ""  # the op call that launched it (for the report)

    @property
    def key(self):
        return (self.kernel.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))


@dataclass
class Result:
    kernel: str
    shape: str
    constexprs: dict
    options: dict
    ok: bool
    seconds: float
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None
    notes: list = field(default_factory=list)


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPE_CODES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


def _record(kernel, args, kwargs) -> Launch:
    names = kernel.arg_names
    params = {p.name: p for p in kernel.params}
    values = dict(zip(names, args))
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    values.update(kwargs)
    missing = []
    unspecialized = set(getattr(kernel, "do_not_specialize", ()) or ())
    signature, constexprs = {}, {}
    for name in names:
        if name not in values:
            if params[name].is_constexpr and params[name].has_default:  # a constexpr left at its default
                constexprs[name] = params[name].default
                signature[name] = "constexpr"
                continue
            missing.append(name)
            continue
        value = values[name]
        p = params[name]
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif (isinstance(value, int) and not isinstance(value, bool) and value == 1
              and name not in unspecialized and names.index(name) not in unspecialized):
            signature[name], constexprs[name] = "constexpr", 1  # Triton specializes integers equal to 1
        else:
            signature[name] = _arg_type(value)
    if missing:
        raise TypeError(f"{kernel.__name__}: launch without arguments {missing}")
    return Launch(kernel, signature, constexprs, options)


@contextlib.contextmanager
def recording(launches: list):
    """Within the block, `kernel[grid](...)` of any Triton JITFunction records a Launch instead of running."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_record(self, args, dict(kwargs)))

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = real


def op_calls(quick: bool):
    """(description, thunk) pairs: every Triton op launcher on CPU tensors of the tested shapes, dtypes and variants."""
    from noprop.kernels import triton as T

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    Ks, Bs, ms, ds = (1, 10), (1, 7, 128, 1000), (10, 100), (10, 20, 784)
    if quick:  # the largest tiles (most registers) and the degenerate B = 1, in the widest conversions
        dtypes, Ks, Bs, ds = (torch.bfloat16,), (10,), (1, 1000), (10, 784)
    for dtype, K, B, m, d in itertools.product(dtypes, Ks, Bs, ms, ds):
        W = torch.zeros(m, d, dtype=dtype)
        y = torch.zeros(B, dtype=torch.int64)
        seed = torch.zeros(1, dtype=torch.int64)
        tag = f"{str(dtype)[6:]} K={K} B={B} m={m} d={d}"
        for per_sample in (False, True):
            coef = torch.zeros((K, B) if per_sample else (K,), dtype=dtype)
            ctag = f"{tag} coef{'[K,B]' if per_sample else '[K]'}"
            yield f"noise_inject {ctag}", lambda: T.noise_inject(W, y, coef, coef, seed)
            yield f"noise_inject_backward {ctag}", lambda: T.noise_inject_backward(
                torch.zeros(K, B, d, dtype=dtype), W, y, coef, coef, seed)
            logits = torch.zeros(K, B, m, dtype=dtype)
            for softmax, offset in ((True, None), (False, torch.zeros(B, d, dtype=dtype))):
                vtag = f"{ctag}{'' if softmax else ' fm'}"
                yield f"local_loss {vtag}", lambda: T.local_loss(logits, W, y, coef, offset, softmax)
                yield f"local_loss_backward {vtag}", lambda: T.local_loss_backward(
                    torch.zeros(K), logits, W, y, coef, offset, softmax)
        if K == min(Ks):
            for softmax in (True, False):
                yield f"denoise_step {tag} softmax={softmax}", lambda: T.denoise_step(
                    torch.zeros(B, m, dtype=dtype), W, torch.zeros(B, d, dtype=dtype), 0.5, 0.5, 0.1, seed, softmax)


def bank_conv_calls(quick: bool):
    """(description, thunk) pairs for the bank convolution's three launchers: the DT block's
    convolutions (a shared 1-channel 28x28 input, then 32->64 and 64->128 per block) and the tests'
    odd channel counts, in every dtype (fp16 takes tl.dot's native path, fp32/bf16 the ieee one)."""
    from noprop.kernels.triton import bank_conv

    dtypes = (torch.bfloat16, torch.float16) if quick else (torch.float32, torch.float16, torch.bfloat16)
    convs = [(True, 1, 32, 28), (False, 32, 64, 13), (False, 64, 128, 11)]  # (shared, C, O, H = W)
    if not quick:
        convs += [(True, 3, 5, 9), (False, 3, 5, 9)]
    sizes = ((1, 1), (7, 3)) if quick else tuple(itertools.product((1, 7), (1, 3)))  # (B, T): 1 is a constant
    for dtype, (shared, C, O, H), (B, T) in itertools.product(dtypes, convs, sizes):
        x = torch.zeros(B if shared else B * T, C, H, H, dtype=dtype)
        w, b = torch.zeros(T, O, C, 3, 3, dtype=dtype), torch.zeros(T, O, dtype=dtype)
        dy = torch.zeros(B * T, O, H - 2, H - 2, dtype=dtype)
        tag = f"{str(dtype)[6:]} T={T} B={B} {'shared ' if shared else ''}C={C} O={O} {H}x{H}"
        yield f"bank_conv forward {tag}", lambda: bank_conv.forward(x, w, b, T, shared, (0, 0))
        yield f"bank_conv input_grad {tag}", lambda: bank_conv.input_grad(dy, x, w, T, shared, (0, 0))
        yield f"bank_conv weight_grad {tag}", lambda: bank_conv.weight_grad(dy, x, w, T, shared, (0, 0))


def launched_kernels() -> set[str]:
    """Names of the Triton kernels in noprop.kernels.triton that launchers launch: every @triton.jit
    function that no other one calls (those are helpers, compiled inside their callers)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import noprop.kernels.triton as pkg
    fns = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        fns.update({n: v for n, v in vars(mod).items() if isinstance(v, JITFunction)})
    called = {n for n in fns for other, fn in fns.items() if other != n and re.search(rf"\b{n}\(", fn.src)}
    return set(fns) - called


def distinct_launches(quick: bool) -> list[Launch]:
    seen = {}
    for desc, call in itertools.chain(op_calls(quick), bank_conv_calls(quick)):
        launches: list[Launch] = []
        with recording(launches):
            call()
        for launch in launches:
            launch.shape = desc
            seen.setdefault(launch.key, launch)
    return list(seen.values())


def _ptxas(arch: int) -> str | None:
    """Triton's bundled ptxas (the one that built the cubin), else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            found = get_ptxas(arch)  # Triton 3.8
        except TypeError:
            found = get_ptxas()  # older Tritons take no argument
        return found if isinstance(found, str) else getattr(found, "path", None)
    except Exception:  # noqa: BLE001 - another Triton layout
        return shutil.which("ptxas")


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _resource_usage(ptx: str, arch: int) -> tuple[int | None, int | None, str | None]:
    """(registers, spill bytes, error) of the PTX, from `ptxas -v`."""
    ptxas = _ptxas(arch)
    if not ptxas:
        return None, None, "ptxas not found (Triton's bundled ptxas or one on PATH)"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        suffix = "a" if arch == 90 else ""
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return None, None, text.strip()[-500:]
    regs = _REGS.search(text)
    spill = _SPILL.search(text)
    return (int(regs.group(1)) if regs else None,
            int(spill.group(1)) + int(spill.group(2)) if spill else 0, None)


def compile_launch(launch: Launch, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    base = dict(kernel=launch.kernel.__name__, shape=launch.shape, constexprs=launch.constexprs,
                options=launch.options)
    try:
        src = ASTSource(launch.kernel, dict(launch.signature), dict(launch.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as exc:  # noqa: BLE001 - any compiler error is the finding
        msg = f"{type(exc).__name__}: {exc}"
        return Result(**base, ok=False, seconds=time.perf_counter() - t0, error=msg[-2000:])
    regs, spills, err = _resource_usage(compiled.asm["ptx"], arch)
    shared = getattr(compiled.metadata, "shared", None)
    res = Result(**base, ok=err is None, seconds=time.perf_counter() - t0, registers=regs,
                 spill_bytes=spills, shared_bytes=shared, error=err)
    if spills:
        res.notes.append(f"{spills} bytes of register spills")
    return res


def run(arch: int = 90, quick: bool = False, log=print) -> list[Result]:
    launches = distinct_launches(quick)
    log(f"compile_check: {len(launches)} distinct kernel specializations for sm_{arch}"
        f"{' (quick subset)' if quick else ''}")
    results = []
    for i, launch in enumerate(launches, 1):
        res = compile_launch(launch, arch)
        results.append(res)
        flags = " ".join(f"{k}={v}" for k, v in sorted(res.constexprs.items()))
        status = "FAILED" if not res.ok else ("spills" if res.spill_bytes else "ok")
        log(f"[{i:3d}/{len(launches)}] {status:<6} {res.kernel:<24} regs {res.registers or '-':>4} "
            f"spill {res.spill_bytes if res.spill_bytes is not None else '-':>4}  {flags}  "
            f"{res.options}  ({res.seconds:.1f} s; from {res.shape})")
        if res.error:
            log("    " + res.error.replace("\n", "\n    "))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m noprop.kernels.triton.compile_check",
                                description="Compile every Triton kernel for a GPU architecture, without a GPU.")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (CI)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--strict", action="store_true", help="fail on register spills too")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels are not compiled)", file=sys.stderr)
        return 2
    results = run(args.arch, args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=1, default=str)
    bad = [r for r in results if not r.ok]
    spilled = [r for r in results if r.spill_bytes]
    launched = {r.kernel for r in results}
    never = sorted(launched_kernels() - launched)
    worst = max((r.registers or 0 for r in results), default=0)
    print(f"compile_check: {len(results) - len(bad)}/{len(results)} specializations compiled for sm_{args.arch}, "
          f"{len(spilled)} with register spills (worst {max((r.spill_bytes for r in spilled), default=0)} bytes); "
          f"most registers per thread: {worst}; kernels covered: {', '.join(sorted(launched))}")
    for r in spilled:
        print(f"  spills: {r.kernel} {r.spill_bytes} bytes, from {r.shape}")
    if never:
        print(f"compile_check: kernels no op call launched (add them to op_calls): {', '.join(never)}")
    return 1 if bad or never or not results or (args.strict and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
