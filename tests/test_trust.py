"""A run that fails says so: bad options, diverged runs, late failures and records that could lie.
Each test names the failure it guards; the commands are tiny (synthetic 16 x 16 data, T = 2)."""
import json

import pytest
import torch

from noprop import checkpoint as ckpt
from noprop.cli import main
from noprop.data import synthetic
from noprop.training import TrainConfig, fit
from noprop.training import loop as training_loop

TINY = ["--data", "synthetic:1,16,16,3,64", "-T", "2", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def run(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("flag,value,says", [
    ("--lr", "inf", "lr must be a finite number > 0, got inf"),
    ("--shared-lr-scale", "nan", "shared_lr_scale must be a finite number > 0, got nan"),
    ("--shared-lr-scale", "-1", "shared_lr_scale must be a finite number > 0, got -1.0"),
    ("--weight-decay", "-0.1", "weight_decay must be a finite number >= 0"),
    ("--max-alpha-bar", "1.0", "max_alpha_bar must lie in (0, 1)"),
])
def test_numeric_options_out_of_range_are_refused_before_training(tmp_path, capsys, flag, value, says):
    rc, _, err = run(capsys, "train", *TINY, "--checkpoint", str(tmp_path / "c.pt"), flag, value)
    assert rc == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("argv,says", [
    (["bench", "--quick", "--threads", "0"], "--threads must be a number >= 1, got 0"),
    (["bench", "--quick", "--steps", "0"], "--steps must be a number >= 1, got 0"),
    (["bench", "--quick", "--repeats", "0"], "--repeats must be a number >= 1, got 0"),
    (["profile", "--steps", "0"], "--steps must be a number >= 1, got 0"),
    (["profile", "--warmup", "-1"], "--warmup must be a number >= 0, got -1"),
])
def test_bench_and_profile_refuse_what_train_refuses(capsys, argv, says):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and says in err


@pytest.mark.parametrize("threads", ["0", "-3"])
def test_every_command_refuses_a_bad_thread_count_in_the_same_line(tmp_path, capsys, threads):
    # one rule, one sentence: noprop.devices.check_threads checks --threads for every command
    argvs = {"train": ["train", *TINY, "--checkpoint", str(tmp_path / "c.pt")],
             "eval": ["eval", str(tmp_path / "missing.pt")],
             "bench": ["bench", "--quick"], "profile": ["profile"]}
    lines = {}
    for command, argv in argvs.items():
        rc, out, err = run(capsys, *argv, "--threads", threads)
        assert rc == 2 and out == "" and err.count("\n") == 1, (command, err)
        prefix = f"noprop {command}: error: "
        assert err.startswith(prefix), err
        lines[command] = err[len(prefix):]
    assert set(lines.values()) == {f"--threads must be a number >= 1, got {threads}\n"}, lines
    assert not (tmp_path / "c.pt").exists()


def test_a_run_whose_parameters_diverge_fails_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """With one update per epoch a huge learning rate leaves NaN weights but a finite loss: the loss
    check alone let such a run report success."""
    path, metrics = tmp_path / "c.pt", tmp_path / "m.jsonl"
    split = synthetic((1, 16, 16), num_classes=3, train_size=32, test_size=16)
    cfg = TrainConfig(T=2, epochs=2, batch_size=32, data="synthetic")
    real_step = training_loop.train_step

    def poisoned_in_epoch_2(model, *a, **k):
        loss = real_step(model, *a, **k)
        if len(json_lines(metrics)) == 1:  # epoch 1 is recorded: now an update blows up
            with torch.no_grad():
                next(model.blocks[1].parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(training_loop, "train_step", poisoned_in_epoch_2)
    with pytest.raises(FloatingPointError, match="training diverged in epoch 2.*blocks.1.*lower the learning rate"):
        fit(cfg, split, checkpoint_path=path, metrics_path=metrics, progress=False, log=lambda s: None)
    assert ckpt.load(path)["epoch"] == 1 and [r["epoch"] for r in json_lines(metrics)] == [1]


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_eval_of_a_diverged_checkpoint_fails_clearly(tmp_path, capsys):
    path = tmp_path / "c.pt"
    assert main(["train", *TINY, "--checkpoint", str(path)]) == 0
    state = ckpt.load(path)
    next(iter(v for k, v in state["model"].items() if k.endswith("weight"))).fill_(float("nan"))
    ckpt.save({k: v for k, v in state.items() if k != "format"}, path)
    rc, out, err = run(capsys, "eval", str(path))
    assert rc == 2 and "holds NaN or infinite parameters" in err and "test_acc" not in out


def test_a_last_batch_of_one_image_joins_the_batch_before_it(tmp_path, capsys):
    """65 images in batches of 32: the last batch held one image and BatchNorm crashed after the epoch."""
    argv = ["train", *TINY, "--data", "synthetic:1,16,16,3,65", "--checkpoint", str(tmp_path / "c.pt")]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert (out + err).count("leave a last batch of one image") == 1


def test_train_refuses_to_overwrite_an_earlier_run_unless_told(tmp_path, capsys):
    path = tmp_path / "c.pt"
    assert main(["train", *TINY, "--checkpoint", str(path)]) == 0
    before = path.read_bytes()
    rc, _, err = run(capsys, "train", *TINY, "--checkpoint", str(path))
    assert rc == 2 and "already exists: pass --resume" in err and path.read_bytes() == before
    assert main(["train", *TINY, "--checkpoint", str(path), "--overwrite"]) == 0


def test_resume_refuses_other_data(tmp_path):
    """--data-dir may move between a run and its continuation; the images may not change."""
    path = tmp_path / "c.pt"
    cfg = TrainConfig(T=2, epochs=1, batch_size=32, data="synthetic")
    quiet = dict(progress=False, log=lambda s: None)
    fit(cfg, synthetic((1, 16, 16), num_classes=3, train_size=64, test_size=16), checkpoint_path=path, **quiet)
    cfg.epochs = 2
    other = synthetic((1, 16, 16), num_classes=3, train_size=64, test_size=16, seed=1)
    with pytest.raises(ckpt.CheckpointError, match="was trained on other data"):
        fit(cfg, other, checkpoint_path=path, resume=True, **quiet)


def test_a_resumed_run_never_duplicates_or_loses_a_metrics_line(tmp_path):
    """A kill between the two writes used to leave the metrics a line ahead of the checkpoint, and the
    resumed run wrote that epoch again."""
    path, metrics = tmp_path / "c.pt", tmp_path / "m.jsonl"
    args = [*TINY, "--checkpoint", str(path), "--metrics", str(metrics)]
    assert main(["train", *args]) == 0
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines + lines) + "\n")  # epoch 1 twice, as an interrupted old run left it
    longer = [*args, "--resume"]
    longer[longer.index("--epochs") + 1] = "2"
    assert main(["train", *longer]) == 0
    assert [r["epoch"] for r in json_lines(metrics)] == [1, 2]


def test_resume_without_rng_state_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.pt"
    assert main(["train", *TINY, "--checkpoint", str(path)]) == 0
    state = ckpt.load(path)
    del state["rng"]
    ckpt.save({k: v for k, v in state.items() if k != "format"}, path)
    longer = [*TINY, "--checkpoint", str(path), "--resume"]
    longer[longer.index("--epochs") + 1] = "2"
    rc, _, err = run(capsys, "train", *longer)
    assert rc == 2 and "lacks rng" in err and "Traceback" not in err


def test_a_checkpoint_that_would_run_code_is_refused_by_eval_and_resume(tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    path = tmp_path / "c.pt"
    assert main(["train", *TINY, "--checkpoint", str(path)]) == 0
    state = ckpt.load(path)
    state["extra_object"] = RunsCode()
    torch.save(state, path)
    rc, _, err = run(capsys, "eval", str(path))
    assert rc == 2 and "--trust-checkpoint" in err
    longer = [*TINY, "--checkpoint", str(path), "--resume"]
    longer[longer.index("--epochs") + 1] = "2"
    rc, _, err = run(capsys, "train", *longer)
    assert rc == 2 and "--trust-checkpoint" in err
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("argv,says", [
    (["--method", "cnn", "-T", "3"], "-T 3 does not apply to --method cnn"),
    (["--chunk-size", "3"], "--chunk-size 3 does not apply to --method dt --mode parallel"),
    (["--method", "backprop", "--mode", "lean"], "--mode lean does not apply to --method backprop"),
    (["--embed-dim", "8"], "--embed-dim 8 does not apply to --method dt --mode parallel --embedding onehot"),
    (["--method", "dt", "--inference-steps", "5"], "--inference-steps 5 does not apply"),
    (["--execution", "threads", "--threads", "1"], "execution 'threads' shares torch's threads"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, capsys, argv, says):
    rc, _, err = run(capsys, "train", *TINY, "--checkpoint", str(tmp_path / "c.pt"), *argv)
    assert rc == 2 and says in err


def test_eval_does_not_take_a_data_source(tmp_path, capsys):
    path = tmp_path / "c.pt"
    assert main(["train", *TINY, "--checkpoint", str(path)]) == 0
    with pytest.raises(SystemExit) as info:
        main(["eval", str(path), "--data", "mnist5k"])  # the checkpoint names its data; argparse refuses
    assert info.value.code == 2 and "unrecognized arguments: --data" in capsys.readouterr().err


def test_out_of_memory_names_the_option_to_lower(tmp_path, capsys, monkeypatch):
    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training_loop, "train_step", no_memory)
    rc, _, err = run(capsys, "train", *TINY, "--checkpoint", str(tmp_path / "c.pt"))
    assert rc == 2 and "out of memory" in err and "lower --batch-size (now 32)" in err and "--mode lean" in err
