"""The sidecar's Unix socket: private to its user (or a group), rebound over a stale file."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_server_grpc import make_spec

from sidecar.models.registry import REFERENCE_SPEC
from sidecar.server.service import Sidecar, unix_socket_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks._sidecar_process import SidecarProcess  # noqa: E402


def mode_and_gid(path) -> tuple[int, int]:
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    return stat.S_IMODE(info.st_mode), info.st_gid


def test_unix_socket_paths_are_read_from_listen_addresses():
    assert unix_socket_path("unix:///tmp/cw.sock") == "/tmp/cw.sock"
    assert unix_socket_path("unix:/tmp/cw.sock") == "/tmp/cw.sock"
    assert unix_socket_path("unix:cw.sock") == "cw.sock"
    assert unix_socket_path("127.0.0.1:0") is None


def test_the_socket_is_private_to_its_user_whatever_the_umask(tmp_path):
    path = tmp_path / "ingest.sock"
    old = os.umask(0)  # the most open a caller's umask can be
    try:
        with Sidecar(make_spec(), f"unix://{path}"):
            assert mode_and_gid(path)[0] == 0o600
    finally:
        os.umask(old)


def test_a_socket_group_may_connect(tmp_path):
    path = tmp_path / "ingest.sock"
    group = grp.getgrgid(os.getgid()).gr_name  # one we may chown to without privileges
    with Sidecar(make_spec(), f"unix://{path}", socket_group=group):
        assert mode_and_gid(path) == (0o660, os.getgid())


def test_an_unknown_socket_group_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no-such-group-cw"):
        Sidecar(make_spec(), f"unix://{tmp_path}/s.sock", socket_group="no-such-group-cw")


def test_serve_rebinds_over_a_stale_socket_file_and_keeps_it_private(tmp_path):
    path = tmp_path / "ingest.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on, as a killed sidecar leaves
    stale.close()
    os.chmod(path, 0o777)
    serve = SidecarProcess(path)
    try:
        serve.wait_accepting()
        assert mode_and_gid(path)[0] == 0o600
    finally:
        serve.stop()


def test_serve_refuses_an_unknown_socket_group(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "serve", "--spec", str(REFERENCE_SPEC)]
        + ["--listen", f"unix://{tmp_path}/s.sock", "--socket-group", "no-such-group-cw"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no-such-group-cw" in result.stderr
    assert not (tmp_path / "s.sock").exists()
