import json

import pytest
import torch

from noprop.cli import build_parser, main

TINY = ["--data", "synthetic:1,16,16,3,64", "-T", "2", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def test_every_command_and_option_has_help(capsys):
    parser = build_parser()
    for command in ("train", "eval", "info"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"noprop {name} {action.option_strings or action.dest} has no help text"


def _subparsers():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_help_prints_each_default_once(monkeypatch, capsys):
    """ArgumentDefaultsHelpFormatter appends "(default: X)": a help text must not say it again.
    Options whose default is computed say so inside that one parenthesis ("default: None = ...")."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option's help
    for name, p in _subparsers().items():
        text = p.format_help()
        for line in text.splitlines():
            assert line.count("(default:") <= 1, f"noprop {name} --help: {line.strip()}"
        assert "(default: True)" not in text, f"noprop {name} --help shows a store_false flag's default"
    bench_help = _subparsers()["bench"].format_help()
    no_isolate = next(line for line in bench_help.splitlines() if line.strip().startswith("--no-isolate"))
    assert "(default:" not in no_isolate
    assert "isolated on CPU except with --quick" in bench_help


@pytest.mark.parametrize("command,flag,dest", [("train", "--batch", "batch_size"), ("train", "--batch-size", "batch_size"),
                                               ("bench", "--batch", "batch"), ("bench", "--batch-size", "batch"),
                                               ("profile", "--batch", "batch"), ("profile", "--batch-size", "batch")])
def test_batch_and_batch_size_are_one_option_everywhere(command, flag, dest):
    args = build_parser().parse_args([command, flag, "24"])
    assert getattr(args, dest) == 24


def test_bench_isolation_flags():
    parse = build_parser().parse_args
    assert parse(["bench"]).isolate is None  # decided in bench.options: on CPU unless --quick
    assert parse(["bench", "--isolate"]).isolate is True
    assert parse(["bench", "--no-isolate"]).isolate is False


def test_train_writes_metrics_and_checkpoint_then_eval_and_resume(tmp_path, capsys):
    ck, metrics = tmp_path / "run.pt", tmp_path / "m.jsonl"
    assert main(["train", *TINY, "--checkpoint", str(ck), "--metrics", str(metrics)]) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 1
    for key in ("epoch", "train_loss", "test_acc", "samples_per_s", "peak_mem_mb", "elapsed_s"):
        assert key in rows[0]
    assert 0.0 <= rows[0]["test_acc"] <= 1.0
    assert main(["eval", str(ck)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(out)["test_acc"] == pytest.approx(rows[0]["test_acc"])
    assert main(["eval", str(ck), "--eval-runs", "0"]) == 2
    assert "--eval-runs must be a number >= 1, got 0" in capsys.readouterr().err
    resume = ["train", *TINY, "--checkpoint", str(ck), "--metrics", str(metrics), "--resume"]
    resume[resume.index("--epochs") + 1] = "2"
    assert main(resume) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_backprop_method_runs(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "backprop", "--checkpoint", str(tmp_path / "b.pt")]) == 0
    assert main(["eval", str(tmp_path / "b.pt"), "--eval-runs", "0"]) == 2  # not a ZeroDivisionError
    assert "--eval-runs" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *TINY, "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *TINY, "--resume", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    assert main(["train", *TINY, "--threads", "0"]) == 2
    assert "--threads must be a number >= 1, got 0" in capsys.readouterr().err
    assert main(["train", *TINY, "--execution", "threads", "--device", "cuda"]) == 2
    assert "runs blocks on CPU threads" in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [(["--threads", "2"], "blocks: threads on 2 CPU threads"),
                                       (["--threads", "1"], "blocks: loop"),
                                       (["--threads", "2", "--mode", "lean"], "blocks: loop")])
def test_train_says_how_its_blocks_run_on_the_threads_it_is_given(tmp_path, capsys, torch_threads, args, says):
    assert main(["train", *TINY, *args, "--checkpoint", str(tmp_path / "t.pt")]) == 0
    assert says in capsys.readouterr().out.splitlines()[0]


NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("device,says", [("gpu", "is not a device torch knows"),
                                         ("xpu", "offers no xpu device")]
                         + ([("cuda", "no CUDA device visible to torch")] if NO_CUDA else []))
def test_unusable_devices_are_one_line_before_any_work(tmp_path, capsys, device, says):
    ck = tmp_path / "never.pt"
    assert main(["train", *TINY, "--device", device, "--checkpoint", str(ck)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not ck.exists()
    good = tmp_path / "good.pt"
    assert main(["train", *TINY, "--checkpoint", str(good)]) == 0
    assert main(["eval", str(good), "--device", device]) == 2  # not "corrupt": the device is the problem
    assert says in capsys.readouterr().err


def test_output_paths_are_checked_before_training(tmp_path, capsys, monkeypatch):
    from noprop.training import loop as training

    monkeypatch.setattr(training, "train_step", lambda *a, **k: pytest.fail("trained before checking the paths"))
    assert main(["train", *TINY, "--checkpoint", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["train", *TINY, "--checkpoint", str(tmp_path / "afile" / "x.pt")]) == 2
    assert "cannot create its folder" in capsys.readouterr().err
    assert main(["train", *TINY, "--checkpoint", str(tmp_path / "c.pt"), "--metrics", str(tmp_path / "afile" / "m")]) == 2
    assert "metrics file" in capsys.readouterr().err


def test_resume_with_other_settings_says_which(tmp_path, capsys):
    ck = tmp_path / "run.pt"
    assert main(["train", *TINY, "--checkpoint", str(ck)]) == 0
    capsys.readouterr()
    more = [*TINY, "--checkpoint", str(ck), "--resume"]
    more[more.index("--epochs") + 1] = "2"
    other = list(more)
    other[other.index("-T") + 1] = "3"
    assert main(["train", *other, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "T 2 (now 3)" in err and "lr 0.001 (now 0.5)" in err and len(err.strip().splitlines()) == 1
    assert main(["train", *more, "--method", "backprop"]) == 2
    assert "method 'dt' (now 'backprop')" in capsys.readouterr().err
    assert main(["train", *more, "--eval-runs", "2"]) == 0  # evaluation settings may change


def test_a_forced_backend_that_cannot_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", "cuda")
    assert main(["train", *TINY, "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_interrupt_says_whether_this_run_left_a_checkpoint(tmp_path, capsys, monkeypatch):
    from noprop.training import loop as training

    ck = tmp_path / "run.pt"
    real_step, calls = training.train_step, []

    def step_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # epoch 1 has 2 batches of 32: the third step is in epoch 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(training, "train_step", step_then_interrupt)
    two = [*TINY, "--checkpoint", str(ck)]
    two[two.index("--epochs") + 1] = "2"
    assert main(["train", *two]) == 130
    assert f"checkpoint {ck} of the last completed epoch is intact" in capsys.readouterr().err
    calls.clear()
    calls.extend([1, 1])  # the next step interrupts: before the first epoch of a new run ends
    assert main(["train", *two, "--overwrite"]) == 130
    assert f"this run wrote no checkpoint; {ck} is from an earlier run" in capsys.readouterr().err


def test_version(capsys):
    import noprop

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"noprop {noprop.__version__} (torch ")
