"""One whole NoProp-DT (or backprop baseline) training step captured in a CUDA graph (`--cuda-graph`).

A NoProp-DT step in the parallel mode is a fixed sequence of a few hundred small
kernels per minibatch (noise for z_0..z_T, T block forwards, the losses, T block backwards, one
fused AdamW); at small batches the GPU waits on Python to launch them. `CapturedStep` records that
sequence once with `torch.cuda.CUDAGraph` and then replays it with one launch per step, following
PyTorch's whole-network capture recipe (docs: "CUDA Graphs", whole-network capture). The backprop
baseline's end-to-end step is captured the same way, so `noprop bench --cuda-graph` compares a
replayed NoProp step with a replayed backprop step, not with an eager one:

- warm-up steps on a side stream before capture (Triton compilation, cuBLAS/cuDNN handles, the
  optimizer's lazily created state), then the model, optimizer state and RNG are restored, so the
  warm-up changes nothing and the first replay is the first training step;
- static input buffers: every call copies its batch (x, y) into them, so batches must keep the
  captured shape and dtype (a different one raises ValueError; `fit` runs the eager step instead
  for a last, partial batch);
- grads are set to None before capture, so the captured backward *writes* them (from the graph's
  private memory pool) rather than accumulating;
- the optimizers must be capturable (`Optimizers(model, cfg)` with `cfg.cuda_graph=True`);
- the loss is a static tensor, read (`.item()`) only after the replay.

Noise: the step's Philox seed (`noprop.ops.new_seed`, a `torch.randint` on the device) is drawn
INSIDE the captured region from torch's CUDA generator. Graph capture registers that generator, and
every replay reads its current seed/offset and advances the offset, so each replay draws a fresh
seed (and fresh dropout masks) — the same draws, in the same order, as the eager `train_step`
would make from the same generator state.

Non-finite losses: the graph cannot branch on the host, so the captured optimizer step is told
through `found_inf` (the flag GradScaler gives fused optimizers) to skip its update when the loss
is not finite; the call then raises FloatingPointError, like the eager step, with the parameters
and optimizer state untouched.

What a graph bakes in at capture: the tensors' addresses (the model's parameters and buffers, the
optimizer's state tensors), the learning rates and other hyper-parameters, train/eval mode. Calls
check the hyper-parameters and the mode and raise if they changed; replacing parameter or optimizer
state tensors (e.g. `Optimizers.load_state_dict` after capture) is not detected: build a new
CapturedStep after that.
"""
from __future__ import annotations

import math
import warnings

import torch

from noprop import dispatch
from noprop.models import BackpropDT, NoPropDT
from noprop.ops.checks import labels as check_labels
from noprop.training.config import WHY_ONLY_PARALLEL
from noprop.training.precision import check as check_precision, prepare_input
from noprop.training.step import captured_body, skips_nonfinite

_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


class TrainingState:
    """A copy of the model's parameters and buffers, the optimizers' state and the RNG of `device`,
    restored in place (the same tensors, so captured addresses stay valid)."""

    def __init__(self, model, opts, device: torch.device):
        self.model, self.opts, self.device = model, opts, torch.device(device)
        with torch.no_grad():
            self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.optim = [{p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                           for p, st in opt.state.items()} for opt in opts.all()]
        self.rng = _rng_state(self.device)

    @torch.no_grad()
    def restore(self) -> None:
        current = self.model.state_dict()
        for k, v in self.tensors.items():
            current[k].copy_(v)
        for opt, saved in zip(self.opts.all(), self.optim):
            for p, st in opt.state.items():
                old = saved.get(p)
                for k, v in st.items():
                    if not torch.is_tensor(v):
                        if old is not None and k in old:
                            st[k] = old[k]
                    elif old is not None and k in old:
                        v.copy_(old[k])
                    else:  # state created after the snapshot: Adam(W) starts it at zero (step 0, moments 0)
                        v.zero_()
        _set_rng_state(self.device, self.rng)


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def why_not_capturable(model, opts) -> str | None:
    """None if `CapturedStep(model, opts, ...)` can be built here, else the reason."""
    if not isinstance(model, (NoPropDT, BackpropDT)):
        return f"{WHY_ONLY_PARALLEL}; got a {type(model).__name__}"
    if getattr(opts, "blocks", None):
        return f"{WHY_ONLY_PARALLEL}; these optimizers are per block (the sequential mode)"
    device = next(model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available():
        where = "no CUDA device is visible to torch" if not torch.cuda.is_available() else f"the model is on {device}"
        return f"CUDA graphs need a CUDA device: {where} (train on --device cuda, or drop --cuda-graph)"
    if dispatch.triton_interpreted() and dispatch.backend_name(device) == "triton":
        return ("the fused ops would run Triton interpreted (TRITON_INTERPRET=1), which copies tensors to the host "
                "and cannot be captured: unset TRITON_INTERPRET, or pick NOPROP_BACKEND=cuda or eager")
    if not all(group.get("capturable") for opt in opts.all() for group in opt.param_groups):
        return ("the optimizers were not built capturable: use Optimizers(model, cfg) with cfg.cuda_graph=True "
                "(or capturable=True)")
    return None


class CapturedStep:
    """One parallel-mode NoProp-DT training step of `model` (or the backprop baseline's), captured as a CUDA graph.

    step = CapturedStep(model, opts, x, y)  # (x, y): a batch of the shape and dtype every call will have
    loss = step(x, y)  # = train_step(model, opts, x, y), one graph launch; returns the loss as a float

    precision: the step's (config.PRECISIONS), captured with it: the graph records bf16 autocast's
    casts and the kernels TF32 picks, so a replay runs in the precision of the capture.

    `replay(x, y)` does the same without the host sync and returns the static loss tensor (overwritten
    by the next call). `seed` is the Philox seed the last replay drew (None for backprop). `accepts(x, y)` says whether a
    batch fits the captured shapes. See the module docstring for the recipe and what is baked in.
    """

    def __init__(self, model: NoPropDT | BackpropDT, opts, example_x: torch.Tensor, example_y: torch.Tensor,
                 warmup: int = 3, precision: str = "fp32"):
        reason = why_not_capturable(model, opts)
        if reason:
            raise ValueError(reason)
        self.precision = precision
        check_precision(precision, next(model.parameters()).device)
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer state must exist before capture), got {warmup}")
        for name, t in (("example_x", example_x), ("example_y", example_y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        self.model, self.opts = model, opts
        self.device = next(model.parameters()).device
        self.training = model.training
        self.hyper = self._hyper()
        # in the layout the step reads (channels_last for tf32/bf16 on CUDA): the copy into it does the
        # conversion, and the captured body converts nothing
        self.x = prepare_input(torch.empty(example_x.shape, dtype=example_x.dtype, device=self.device), precision)
        self.y = torch.empty(example_y.shape, dtype=example_y.dtype, device=self.device)
        self._load(example_x, example_y)
        with torch.cuda.device(self.device):  # capture on the model's GPU, whichever is current
            self._capture(warmup)

    def _capture(self, warmup: int) -> None:
        model, opts = self.model, self.opts
        saved = TrainingState(model, opts, self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with warnings.catch_warnings():  # capturable optimizers warn when stepped outside a capture
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                with torch.cuda.stream(side):
                    for _ in range(warmup):  # also where a bad example batch raises its clear error
                        opts.zero_grad()
                        captured_body(model, opts, self.x, self.y, self.precision)
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)
            saved.restore()  # the warm-up trained nothing: parameters, optimizer state and RNG as they were
        del saved

        opts.zero_grad()  # grads None: the captured backward allocates them in the graph's pool and writes them
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.seed = captured_body(model, opts, self.x, self.y, self.precision)

    def _hyper(self):
        return [[tuple(group.get(k) for k in _HYPER) for group in opt.param_groups] for opt in self.opts.all()]

    def accepts(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether (x, y) has the captured shapes and dtypes."""
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == self.x.shape
                and x.dtype == self.x.dtype and y.shape == self.y.shape and y.dtype == self.y.dtype)

    def _load(self, x, y):
        if not self.accepts(x, y):
            got = ", ".join(f"{n} {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else f"{n} {type(t).__name__}"
                            for n, t in (("x", x), ("y", y)))
            raise ValueError(f"a CUDA-graph step has static shapes: it was captured for x {list(self.x.shape)} "
                             f"{self.x.dtype} and y {list(self.y.shape)} {self.y.dtype}, got {got}; run the eager "
                             "train_step for other batches (fit does so for a last, partial batch)")
        check_labels(y, self.model.num_classes)  # the captured kernels cannot check label values
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on (x, y) without reading the loss back; returns the static loss tensor
        (overwritten by the next replay). Besides copying x and y into the static buffers (a copy from
        pageable host memory waits for the stream, like any such copy), only the label-range check reads
        a value, from the device only when y is on the GPU (fit passes CPU batches)."""
        if self.model.training != self.training:
            raise ValueError(f"the step was captured in {'train' if self.training else 'eval'} mode but the model is "
                             f"now in {'train' if self.model.training else 'eval'} mode: switch back or capture anew")
        if self._hyper() != self.hyper:
            raise ValueError("the optimizers' hyper-parameters (lr, betas, eps, weight decay) changed since capture; "
                             "they are baked into the CUDA graph: build a new CapturedStep")
        self._load(x, y)
        self.graph.replay()
        return self.loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on (x, y); the loss as a float (raises FloatingPointError if not finite:
        with fused optimizers, the default on CUDA, the captured step then skipped its update)."""
        value = self.replay(x, y).item()
        if not math.isfinite(value):
            what = "skipped this update" if skips_nonfinite(self.opts) else \
                "has already applied this update (its optimizers are not fused, so it cannot skip one)"
            raise FloatingPointError(f"the training loss became {value}: lower the learning rate or check inputs "
                                     f"(the CUDA-graph step {what})")
        return value
