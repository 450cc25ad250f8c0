import json

import pytest

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
    resume = ["train", *TINY, "--checkpoint", str(ck), "--metrics", str(metrics), "--resume"]
    resume[resume.index("--epochs") + 1] = "2"
    assert main(resume) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_backprop_method_runs(tmp_path):
    assert main(["train", *TINY, "--method", "backprop", "--checkpoint", str(tmp_path / "b.pt")]) == 0


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
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["train", *TINY, "--execution", "threads", "--device", "cuda"]) == 2
    assert "runs blocks on CPU threads" in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [(["--threads", "2"], "blocks: threads on 2 CPU threads"),
                                       (["--threads", "1"], "blocks: loop"),
                                       (["--threads", "2", "--mode", "lean"], "blocks: loop")])
def test_train_says_how_its_blocks_run_on_the_threads_it_is_given(tmp_path, capsys, torch_threads, args, says):
    assert main(["train", *TINY, *args, "--checkpoint", str(tmp_path / "t.pt")]) == 0
    assert says in capsys.readouterr().out.splitlines()[0]
