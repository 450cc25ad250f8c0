"""The model a `TrainConfig` describes, the check that a model brought to `fit` matches it, and how a
model is readied for a run (execution, device, layout, compilation)."""
from __future__ import annotations

import math

import torch

from noprop import engine
from noprop.data import Dataset
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import BackpropDT, CNNClassifier, NoPropCT, NoPropDT, NoPropFM, ct_block, dt_block_factory
from noprop.schedule import DTSchedule
from noprop.training.compiling import apply_compile
from noprop.training.config import CONTINUOUS, TrainConfig
from noprop.training.precision import prepare_model

MODEL_KINDS = {"dt": NoPropDT, "backprop": BackpropDT, "cnn": CNNClassifier, "ct": NoPropCT, "fm": NoPropFM}


def build_model(cfg: TrainConfig, image_shape, num_classes: int, train: Dataset | None = None):
    """The model `cfg` describes. A prototype embedding is initialised from `train` when given
    (else zeros, to be overwritten by a checkpoint)."""
    if cfg.embedding == "prototype" and train is None:
        d = math.prod(image_shape)
        embedding = ClassEmbedding("prototype", num_classes, init=torch.zeros(num_classes, d),
                                   image_shape=tuple(image_shape))
    else:
        embedding = make_embedding(cfg.embedding, num_classes, cfg.embed_dim,
                                   None if train is None else train.images, None if train is None else train.labels)
    if cfg.method in CONTINUOUS:
        net = ct_block(image_shape, num_classes, embedding)
        if cfg.method == "ct":
            return NoPropCT(net, embedding, eta=cfg.eta, input_shape=image_shape,
                            inference_steps=cfg.inference_steps)
        return NoPropFM(net, embedding, input_shape=image_shape, inference_steps=cfg.inference_steps)
    factory = dt_block_factory(image_shape, num_classes, embedding)
    if cfg.method == "dt":
        model = NoPropDT(factory, embedding, DTSchedule.cosine(cfg.T, cfg.max_alpha_bar), eta=cfg.eta,
                         input_shape=image_shape, execution=cfg.execution)
        model.set_execution(cfg.execution, cfg.device)  # 'auto' on CUDA holds the blocks in a bank
        return model
    if cfg.method == "backprop":
        model = BackpropDT(factory, embedding, num_blocks=cfg.T, input_shape=image_shape)
        model.set_execution(cfg.execution, cfg.device)  # 'auto' on CUDA: the image branches in a bank
        return model
    return CNNClassifier(image_shape, num_classes)


def check_model_matches(model, cfg: TrainConfig) -> None:
    """A model brought to `fit` must be of the kind cfg.method names, with cfg.T blocks: the training
    step, the optimizer and the checkpoint's config all follow cfg."""
    kind = MODEL_KINDS[cfg.method]
    if not isinstance(model, kind):
        raise ValueError(f"fit: cfg.method {cfg.method!r} trains a {kind.__name__}, got a {type(model).__name__} "
                         f"(set method to the model's kind: {dict((v.__name__, k) for k, v in MODEL_KINDS.items())})")
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) != cfg.T:
        raise ValueError(f"fit: the model has {len(blocks)} blocks but cfg.T is {cfg.T}: set T={len(blocks)}")


def apply_execution(model, cfg: TrainConfig, separate: bool = False) -> None:
    """Give a NoProp-DT (or backprop baseline) model the execution `cfg` asks for on cfg.device: the
    config owns the choice for a run, whether fit built the model or the user brought it (a bank, or
    separate blocks, as it resolves: before the optimizers are built; separate=True: separate
    modules whatever it resolves to, see NoPropDT.set_execution). An explicit choice the blocks
    cannot take (vmap or bank on blocks of different structure) raises here, before any training."""
    if isinstance(model, BackpropDT):
        model.set_execution(cfg.effective_execution, cfg.device)
        return
    if not isinstance(model, NoPropDT):
        return
    if cfg.execution in ("vmap", "bank") and not model.is_bank:
        reason = engine.why_not_stackable(list(model.blocks))
        if reason and len(model.blocks) > 1:
            raise ValueError(f"execution {cfg.execution!r}: cannot stack these blocks: {reason} "
                             "(use execution 'loop' or 'auto')")
    model.set_execution(cfg.effective_execution, cfg.device, separate)


def ready_for_training(model, cfg: TrainConfig, device):
    """`model` as a run of `cfg` trains it on `device`: its execution, on the device, in the layout of
    cfg.precision, its step's blocks compiled when cfg.compile. Returns the model (moved)."""
    apply_execution(model, cfg)
    model = prepare_model(model.to(device), cfg.precision, device)
    apply_compile(model, cfg, device)
    return model
