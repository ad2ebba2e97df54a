"""``dev`` and ``demo`` keep apart, and the ops commands find the stack ``dev`` started."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.devtools import dev_state
from service.entrypoints import cli


def test_dev_and_demo_have_their_own_data_directories() -> None:
    assert dev_state.data_dir("dev") != dev_state.data_dir("demo")


def test_a_second_command_on_the_same_data_directory_refuses_and_names_the_holder(
        tmp_path: Path) -> None:
    with dev_state.exclusive(tmp_path, "dev"):
        with pytest.raises(dev_state.StackBusy) as refused, dev_state.exclusive(tmp_path, "demo"):
            pass
        assert f"creditnotes dev (pid {os.getpid()})" in str(refused.value)
        assert "--data-dir" in str(refused.value)
    with dev_state.exclusive(tmp_path, "demo"):  # free again once the first has stopped
        pass


def test_the_servers_file_is_found_while_dev_runs_and_gone_after(tmp_path: Path) -> None:
    with dev_state.advertised(tmp_path, "postgresql://postgres@127.0.0.1:5999/creditnotes",
                              "127.0.0.1:9999", 8080):
        found = dev_state.running_dev(tmp_path)
        assert found is not None
        assert (found.database_url, found.kafka_bootstrap_servers) == (
            "postgresql://postgres@127.0.0.1:5999/creditnotes", "127.0.0.1:9999")
    assert dev_state.running_dev(tmp_path) is None


def test_a_servers_file_left_by_a_killed_dev_is_ignored(tmp_path: Path) -> None:
    (tmp_path / dev_state.SERVERS_FILE).write_text(json.dumps({
        "database_url": "postgresql://x", "kafka_bootstrap_servers": "x:1", "http_port": 1,
        "pid": 2**22 + 12345}))  # above Linux's pid_max default: no such process
    assert dev_state.running_dev(tmp_path) is None


def test_a_damaged_servers_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / dev_state.SERVERS_FILE).write_text("{not json")
    assert dev_state.running_dev(tmp_path) is None


@pytest.mark.parametrize("command", ["dev", "demo"])
def test_the_help_names_the_default_data_directory_each_command_uses(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert f"(default: {dev_state.data_dir(command)};" in " ".join(capsys.readouterr().out.split())
