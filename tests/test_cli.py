"""The tools' key=value command lines (ee_nas.cli): a structured config checks keys and types; --help lists them."""
import subprocess
import sys

import pytest

from ee_nas.cli import parse
from ee_nas.select import SelectArgs


def test_arguments_become_the_dataclass():
    a = parse(SelectArgs, ["run_dir=x", "n=2", "n_exits=null", "prefer=macs"], "t")
    assert (a.run_dir, a.n, a.n_exits, a.prefer, a.device) == ("x", 2, None, "macs", None)


@pytest.mark.parametrize("argv, message", [
    (["n=2"], "t: error: missing run_dir=..."),
    (["run_dir=x", "bogus=1"], "t: error: bogus=1: expected key=value with key one of run_dir, prefer, n"),
    (["run_dir=x", "n=two"], "t: error: n=two: Value 'two' of type 'str' could not be converted to Integer"),
    (["run_dir"], "t: error: 'run_dir': expected key=value"),
])
def test_mistakes_end_as_one_line_and_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(SelectArgs, argv, "t")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("module", ["ee_nas.select", "ee_nas.finetune", "ee_nas.infer", "ee_nas.hardware.latency"])
def test_help_lists_the_keys(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python -m {module} key=value") and "  run_dir=<str>" in done.stdout
