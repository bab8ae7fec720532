"""cluster/security.py: a node on a network address never takes unauthenticated peers unless --insecure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from exo_stable.cluster.security import cluster_auth, is_loopback_only, join_command, state_dir


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_no_secret(host: str, tmp_path: Path) -> None:
    assert is_loopback_only(host)
    auth = cluster_auth(host, None, insecure=False, directory=tmp_path)
    assert (auth.secret, auth.source) == (None, "loopback")
    assert not list(tmp_path.iterdir()), "no secret file for a loopback node"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "box.lan"])
def test_network_binds_create_a_private_secret_once(host: str, tmp_path: Path) -> None:
    assert not is_loopback_only(host)
    first = cluster_auth(host, None, insecure=False, directory=tmp_path / "state")
    assert first.source == "created" and first.secret and len(first.secret) >= 40
    assert first.path == tmp_path / "state" / "cluster-secret"
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    again = cluster_auth(host, None, insecure=False, directory=tmp_path / "state")
    assert (again.secret, again.source) == (first.secret, "file")


def test_a_given_secret_wins_and_contradicts_insecure(tmp_path: Path) -> None:
    auth = cluster_auth("0.0.0.0", b"s3cret", insecure=False, directory=tmp_path)
    assert (auth.secret, auth.source) == (b"s3cret", "given")
    with pytest.raises(ValueError, match="contradict"):
        cluster_auth("0.0.0.0", b"s3cret", insecure=True, directory=tmp_path)


def test_insecure_is_the_only_open_door(tmp_path: Path) -> None:
    auth = cluster_auth("0.0.0.0", None, insecure=True, directory=tmp_path)
    assert (auth.secret, auth.source) == (None, "insecure")


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster-secret"
    path.write_text("abc\n")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        cluster_auth("0.0.0.0", None, insecure=False, directory=tmp_path)
    path.chmod(0o600)
    assert cluster_auth("0.0.0.0", None, insecure=False, directory=tmp_path).secret == b"abc"


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cluster-secret").write_bytes(b"")
    (tmp_path / "cluster-secret").chmod(0o600)
    with pytest.raises(ValueError, match="empty"):
        cluster_auth("0.0.0.0", None, insecure=False, directory=tmp_path)


def test_state_dir_order() -> None:
    assert state_dir({"EXO_STABLE_STATE_DIR": "/x"}) == Path("/x")
    assert state_dir({"XDG_STATE_HOME": "/y"}) == Path("/y/exo-stable")
    assert state_dir({}).parts[-3:] == (".local", "state", "exo-stable")


def test_join_command_keeps_the_secret_off_the_command_line() -> None:
    cmd = join_command(b"tok", "10.0.0.1:52415")
    assert cmd == "EXO_STABLE_CLUSTER_SECRET=tok exo-stable serve --host 0.0.0.0 --peers 10.0.0.1:52415"
