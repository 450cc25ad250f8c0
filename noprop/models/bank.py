"""A block bank: T structurally identical blocks whose parameters and buffers live stacked, [T, ...].

Why: stacking per-block parameters for a batched call on every step (noprop.engine.run_stacked)
and copying BatchNorm statistics back costs ~180 device copies a step on an H100 (8 % of a
replayed step, docs/design.md §12), and one optimizer over T x 32 tensors costs hundreds of
launches. In a bank the stacked tensors are the source of truth: nothing is stacked or copied
back, and AdamW sees 32 tensors of shape [T, ...] (elementwise the same update as T per-block
AdamWs when every block trains on every step).

How a bank runs (`BlockBank.forward(x, z, rows)`, rows a contiguous slice of blocks: a chunk):
- folded (the DT block): the block's own module tree, with each Conv2d, Linear, BatchNorm1d and
  Dropout replaced by a layer of noprop.models.bank_layers that holds the [T, ...] tensors and
  runs all T (or the chunk's) at once on a sample-major [B*T, ...] batch. The block's forward code
  runs unchanged (it only concatenates along dim 1, adds, and reshapes keeping dim 0: true of
  the types in `FOLDABLE`, which is why only those are folded). A chunk's layers read row slices
  of the tensors; BatchNorm updates the running statistics of its rows in place.
- vmapped (any other blocks that stack): `functional_call` of the block under `vmap`
  (noprop.engine.run_vmapped) on row slices of the stacked tensors, BatchNorm statistics again
  updated in place through the slices.

Per-block views: `bank[i]` is block i (0-based) as an ordinary module of the block's own type whose
parameters and buffers alias row i of the bank (reads see the bank's current values, in-place
writes, such as an optimizer step on its parameters, change the bank; gradients of a forward
through the view go to the view, not to the bank). `bank.block(i, copy=True)` gives an independent
copy. Checkpoints: the bank's state_dict has the per-block keys `{t}.<name>` (a hook splits the
rows) and load_state_dict stacks them back, so per-block and bank models read each other's
checkpoints. A chunk's gradient reaches the bank through the slice's backward (zeros in the other
rows), which also keeps `torch.autograd.grad` of a chunk's loss w.r.t. the bank working.

One call at a time per bank: the folded layers read the call's shape and rows from a context the
bank sets for the call (they are not thread-safe; banks never run on the engine's block threads).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from noprop import engine
from noprop.models import bank_layers as L
from noprop.models.blocks import ConvBranch, DTBlock, LabelBranch
from noprop.models.dropout import Dropout, block_key

FOLDABLE = (DTBlock,)  # block types whose forward treats dim 0 as independent samples (see the module doc)
_CONTAINERS = (DTBlock, ConvBranch, LabelBranch, nn.Sequential)
_STATELESS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)


class _Fold:
    """The call in progress, as the folded layers see it: T blocks (rows of the bank), B samples, the
    convolution implementation and, for keyed dropout, one generator per block."""

    def __init__(self):
        self.T = self.B = None
        self.rows, self.full, self.impl, self.generators = slice(None), True, "loop", None
        self.unbound = None  # within BlockBank.one_at_a_time(): {id: (tensor, its rows)}

    def take(self, tensor):
        """The rows of this call of a stacked parameter or buffer (a view: no copy)."""
        if tensor is None or self.full:
            return tensor
        if self.unbound is not None and tensor.requires_grad and self.T == 1:
            entry = self.unbound.get(id(tensor))  # (tensor, rows): the tensor kept so its id stays its own
            if entry is None:
                entry = self.unbound[id(tensor)] = (tensor, tensor.unbind(0))
            return entry[1][self.rows.start].unsqueeze(0)
        return tensor[self.rows]

    def shared(self, x) -> bool:
        """Whether x is the input every block shares ([B, ...]) rather than one per block ([B*T, ...])."""
        if self.T is None:
            raise RuntimeError("a bank layer ran outside its bank's call (call the BlockBank, not its layers)")
        if x.shape[0] == self.B * self.T:
            return False
        if x.shape[0] == self.B:
            return True
        raise ValueError(f"a bank layer got a batch of {x.shape[0]} rows; expected {self.B} (shared) or "
                         f"{self.B} x {self.T} blocks")


class _BankLayer(nn.Module):
    def __init__(self, fold: _Fold):
        super().__init__()
        self.__dict__["fold"] = fold  # shared by all layers of a bank; not a submodule

    def _stack(self, name: str, layers, parameter: bool):
        values = [getattr(m, name) for m in layers]
        if values[0] is None:
            return self.register_parameter(name, None) if parameter else self.register_buffer(name, None)
        stacked = torch.stack([v.detach() for v in values])
        if parameter:
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=values[0].requires_grad))
        else:
            self.register_buffer(name, stacked)


class BankConv2d(_BankLayer):
    def __init__(self, convs: list[nn.Conv2d], fold: _Fold):
        super().__init__(fold)
        c = convs[0]
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self._stack("weight", convs, True)
        self._stack("bias", convs, True)

    def forward(self, x):
        f = self.fold
        return L.conv2d(x, f.take(self.weight), f.take(self.bias), f.T, f.shared(x), f.impl, self.stride,
                        self.padding, self.dilation)


class BankLinear(_BankLayer):
    def __init__(self, linears: list[nn.Linear], fold: _Fold):
        super().__init__(fold)
        self._stack("weight", linears, True)
        self._stack("bias", linears, True)

    def forward(self, x):
        f = self.fold
        return L.linear(x, f.take(self.weight), f.take(self.bias), f.T, f.shared(x))


class BankBatchNorm1d(_BankLayer):
    _version = 2  # nn.BatchNorm's state version: its metadata travels with the per-block keys

    def __init__(self, norms: list[nn.BatchNorm1d], fold: _Fold):
        super().__init__(fold)
        n = norms[0]
        self.momentum, self.eps = n.momentum, n.eps
        for name in ("weight", "bias"):
            self._stack(name, norms, True)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self._stack(name, norms, False)

    def forward(self, x):
        f = self.fold
        if self.training:
            with torch.no_grad():
                f.take(self.num_batches_tracked).add_(1)
        return L.batch_norm(x, f.take(self.running_mean), f.take(self.running_var), f.take(self.weight),
                            f.take(self.bias), f.T, self.training, self.momentum, self.eps)


class BankDropout(_BankLayer):
    def __init__(self, p: float, keyed: bool, fold: _Fold):
        super().__init__(fold)
        self.p, self.keyed = p, keyed  # keyed: a noprop Dropout (per-block keyed masks); else torch's

    def forward(self, x):
        f = self.fold
        return L.dropout(x, self.p, self.training, f.T, f.generators if self.keyed else None)


def _folded(mods: list[nn.Module], fold: _Fold) -> nn.Module | None:
    """The bank layer for the corresponding modules of T blocks, or None if they cannot be folded."""
    m, kind = mods[0], type(mods[0])
    if kind is nn.Conv2d:
        ok = m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        return BankConv2d(mods, fold) if ok else None
    if kind is nn.Linear:
        return BankLinear(mods, fold)
    if kind is nn.BatchNorm1d:
        ok = m.affine and m.track_running_stats and m.momentum is not None
        return BankBatchNorm1d(mods, fold) if ok else None
    if kind in (Dropout, nn.Dropout):
        return BankDropout(m.p, kind is Dropout, fold)
    if kind is nn.Flatten:
        return copy.deepcopy(m) if (m.start_dim, m.end_dim) == (1, -1) else None
    if kind in _STATELESS:
        return copy.deepcopy(m)
    if kind in _CONTAINERS and not m._parameters and not m._buffers:
        new = copy.copy(m)  # the container's own attributes (shapes, flags); children replaced below
        new._modules, new._parameters, new._buffers = {}, {}, {}
        for name in m._modules:
            child = _folded([mod._modules[name] for mod in mods], fold)
            if child is None:
                return None
            new._modules[name] = child
        return new
    return None


def _stacked_copy(blocks: list[nn.Module]) -> nn.Module:
    """A copy of blocks[0] whose every parameter and buffer is the stack of the blocks' ([T, ...])."""
    stacked = copy.deepcopy(blocks[0])
    for path, module in stacked.named_modules():
        sources = [b.get_submodule(path) for b in blocks]
        for name, p in list(module._parameters.items()):
            if p is not None:
                rows = torch.stack([s._parameters[name].detach() for s in sources])
                module._parameters[name] = nn.Parameter(rows, requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.stack([s._buffers[name] for s in sources])
    return stacked


class BlockBank(nn.Module):
    """T structurally identical blocks held as stacked [T, ...] parameters and buffers (module doc).

    forward(x [B, ...], z [k, B, d], rows) -> logits [k, B, m] of the k blocks rows (a slice of
    0..T-1), each on its own z. Its parameters have the block's names (`image.convs.0.weight`,
    shape [T, 32, 1, 3, 3]); `len(bank)` is T; `bank[i]` a per-block view.
    """

    def __init__(self, blocks):
        super().__init__()
        blocks = list(blocks)
        reason = engine.why_not_stackable(blocks)
        if reason:
            raise ValueError(f"cannot hold these blocks in a bank: {reason}")
        self.num_blocks = len(blocks)
        fold = _Fold()
        stacked = _folded(blocks, fold) if type(blocks[0]) in FOLDABLE else None
        self.folded = stacked is not None
        if stacked is None:
            stacked = _stacked_copy(blocks)
        for name, child in stacked._modules.items():  # the bank's state is the stacked block's, under its names
            self.add_module(name, child)
        for name, p in stacked._parameters.items():
            self.register_parameter(name, p)
        for name, b in stacked._buffers.items():
            self.register_buffer(name, b, persistent=name not in stacked._non_persistent_buffers_set)
        self.__dict__["_fold"] = fold
        self.__dict__["_stacked"] = stacked  # not a submodule: its children are the bank's
        self.__dict__["_template"] = copy.deepcopy(blocks[0]).to("meta")  # the per-block views' structure
        self.train(blocks[0].training)
        if [n for n, _ in self._template.named_parameters()] != [n for n, _ in self.named_parameters()]:
            raise ValueError("cannot hold these blocks in a bank: their parameter names do not survive stacking")
        self._register_state_dict_hook(_split_rows)
        self._register_load_state_dict_pre_hook(_stack_rows, with_module=True)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> nn.Module:
        return self.block(i)

    def __iter__(self):
        return (self.block(i) for i in range(self.num_blocks))

    def _sync(self) -> None:
        """Point the stacked block at the bank's own direct tensors (`.to()` replaces buffers)."""
        for name in self._stacked._parameters:
            self._stacked._parameters[name] = self._parameters[name]
        for name in self._stacked._buffers:
            self._stacked._buffers[name] = self._buffers[name]

    def block(self, i: int, copy: bool = False) -> nn.Module:
        """Block i (0-based) as a module of the block's type: parameters and buffers alias row i of the
        bank (copy=True: independent clones, e.g. to turn the bank back into separate blocks)."""
        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(f"block index {i} out of range for a bank of {self.num_blocks} blocks")
        view = _clone_structure(self._template)
        for (name, _), p in zip(self._template.named_parameters(), self.parameters()):
            row = p.detach()[i].clone() if copy else p.detach()[i]
            _set(view, name, nn.Parameter(row, requires_grad=p.requires_grad))
        for name, b in self.named_buffers():
            _set(view, name, b[i].clone() if copy else b[i], buffer=True)
        return view.train(self.training)

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        """Block i's parameters as leaves aliasing row i, in the block's order (for per-block optimizers)."""
        return [nn.Parameter(p.detach()[i], requires_grad=p.requires_grad) for p in self.parameters()]

    @contextlib.contextmanager
    def one_at_a_time(self):
        """For a forward that calls the blocks one by one, each on the previous one's output (the
        backprop baseline's chain): within it, one-block calls read their parameters from one
        `unbind` of each stacked parameter, made once for the context. Its backward then writes the
        [T, ...] gradient once, where T row slices would each add a zero-filled [T, ...] gradient."""
        f = self._fold
        if f.unbound is not None:
            yield
            return
        f.unbound = {}
        try:
            yield
        finally:
            f.unbound = None

    @contextlib.contextmanager
    def _call(self, rows: slice, B: int, device, dropout_seed: int | None):
        f = self._fold
        if f.T is not None:
            raise RuntimeError("a BlockBank runs one call at a time (it is not re-entrant or thread-safe)")
        start, stop, _ = rows.indices(self.num_blocks)
        f.T, f.B, f.rows, f.full = stop - start, B, slice(start, stop), (start, stop) == (0, self.num_blocks)
        f.impl = L.conv_impl(device)
        f.generators = None if dropout_seed is None else \
            [torch.Generator().manual_seed(block_key(dropout_seed, t + 1)) for t in range(start, stop)]
        self._sync()
        try:
            yield f.T
        finally:
            f.T = f.B = f.generators = None

    def forward(self, x: torch.Tensor, z: torch.Tensor, rows: slice = slice(None),
                dropout_seed: int | None = None) -> torch.Tensor:
        """Blocks `rows` on (x, z[k]): x [B, ...] shared, z [k, B, ...] -> logits [k, B, m]. dropout_seed
        (CPU, folded banks): block t's dropout masks are keyed by (dropout_seed, t) as in the per-block step."""
        if not self.folded:
            self._sync()
            start, stop, _ = rows.indices(self.num_blocks)
            full = (start, stop) == (0, self.num_blocks)
            params = {n: p if full else p[start:stop] for n, p in self.named_parameters()}
            buffers = {n: b if full else b[start:stop] for n, b in self.named_buffers()}
            return engine.run_vmapped(self._stacked, params, buffers, x, z)
        B = z.shape[1]
        with self._call(rows, B, x.device, dropout_seed) as k:
            out = self._stacked(x, z.transpose(0, 1).reshape(B * k, *z.shape[2:]))
        return out.reshape(B, k, -1).transpose(0, 1).contiguous()

    def features(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Each block's image features [B, width] (blocks with a `features` method; else None), for
        label-free inference: folded banks run the T image branches at once."""
        if not hasattr(self._template, "features"):
            return [None] * self.num_blocks
        if not self.folded:
            return [view.features(x) for view in self]
        with self._call(slice(None), x.shape[0], x.device, None) as k:
            out = self._stacked.features(x)
        return list(out.reshape(x.shape[0], k, -1).unbind(1))

    def logits_from_features(self, i: int, feats: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block i's (0-based) logits [B, m] from its features [B, width] and z [B, d]."""
        if not self.folded:
            return self.block(i).from_features(feats, z)
        with self._call(slice(i, i + 1), z.shape[0], z.device, None):
            return self._stacked.from_features(feats, z)


def held_for(blocks, execution: str, device, separate: bool = False) -> nn.Module:
    """`blocks` (separate modules or a BlockBank) held as `execution` on `device` wants them: one
    BlockBank where it resolves to a bank ('bank', or 'auto' on CUDA for blocks that stack,
    noprop.engine.resolve; never with separate=True), else separate modules in an nn.ModuleList
    (independent copies of a bank's rows). Returned as they are when already held that way."""
    bank = not separate and execution in ("bank", "auto") and engine.resolve(execution, list(blocks), device) == "bank"
    if bank and not isinstance(blocks, BlockBank):
        return BlockBank(blocks)
    if not bank and isinstance(blocks, BlockBank):
        return nn.ModuleList(blocks.block(i, copy=True) for i in range(len(blocks)))
    return blocks


def _split_rows(module: BlockBank, state_dict, prefix, local_metadata):
    """state_dict hook: the bank's `{prefix}<name>` [T, ...] entries become per-block `{prefix}{t}.<name>`
    (views of the rows), the checkpoint layout of separate blocks."""
    stacked = [(k[len(prefix):], state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    for t in range(module.num_blocks):  # block by block, the order separate blocks save in
        for name, value in stacked:
            state_dict[f"{prefix}{t}.{name}"] = value[t]
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        own = prefix[:-1] if prefix else ""
        for key in [k for k in meta if k.startswith(prefix) or k == own]:
            rest = key[len(own):].lstrip(".")
            for t in range(module.num_blocks):
                meta[f"{own}.{t}".lstrip(".") + (f".{rest}" if rest else "")] = dict(meta[key])
            if key != own:
                del meta[key]


def _stack_rows(self: BlockBank, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: per-block keys `{prefix}{t}.<name>` become the bank's `{prefix}<name>`."""
    names = [n for n, _ in self.named_parameters()] + \
        [n for n, _ in self.named_buffers() if _persistent(self, n)]
    for name in names:
        keys = [f"{prefix}{t}.{name}" for t in range(self.num_blocks)]
        if prefix + name in state_dict or not all(k in state_dict for k in keys):
            continue  # already stacked, or incomplete: load_state_dict names what is missing or unexpected
        try:
            state_dict[prefix + name] = torch.stack([state_dict[k] for k in keys])
        except (RuntimeError, TypeError) as exc:
            error_msgs.append(f"blocks {prefix}0..{self.num_blocks - 1}.{name} cannot be stacked: {exc}")
            continue
        for k in keys:
            del state_dict[k]


def _persistent(module: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    return leaf not in module.get_submodule(path)._non_persistent_buffers_set


def _clone_structure(template: nn.Module) -> nn.Module:
    return copy.deepcopy(template)  # meta tensors: no data is copied


def _set(module: nn.Module, name: str, value, buffer: bool = False) -> None:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path)
    (owner._buffers if buffer else owner._parameters)[leaf] = value
