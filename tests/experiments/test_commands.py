"""command.txt: the command that made a results folder, quoted so that it reruns as written."""

import shlex

from experiments.commands import command_line, record_command


def test_command_line_quotes_and_record_command_replaces_or_keeps(tmp_path, monkeypatch):
    line = command_line("experiments.power", ["--out", "a b", "--lrs", "x=1e-3,3e-3"])
    assert shlex.split(line)[3:] == ["--out", "a b", "--lrs", "x=1e-3,3e-3"]
    monkeypatch.setattr("sys.argv", ["power.py", "--seeds", "1"])
    assert command_line("experiments.power") == "python -m experiments.power --seeds 1"
    record_command(tmp_path, "first")
    record_command(tmp_path, "second")
    assert (tmp_path / "command.txt").read_text() == "second\n"
    for command in ("third", "second", "third"):
        record_command(tmp_path, command, keep_previous=True)
    assert (tmp_path / "command.txt").read_text() == "second\nthird\n"
