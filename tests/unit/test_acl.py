"""The default ACL the docker runtime puts on attempt directories: its binary form, and on a
real file system, that directories created below it by root the usual way are deletable by
the user it names, and not without it."""

from __future__ import annotations

import os
import struct

import pytest
from helpers import delete_as, nobody_uid

from tether.agent.runtimes.acl import default_acl, grant_default_acl


def test_the_xattr_holds_sorted_entries_naming_the_uid():
    value = default_acl(1234)
    assert struct.unpack_from("<I", value) == (2,)
    entries = [struct.unpack_from("<HHI", value, 4 + 8 * i) for i in range((len(value) - 4) // 8)]
    tags = [tag for tag, _, _ in entries]
    assert tags == sorted(tags) and len(set(tags)) == len(tags)
    assert entries == [
        (0x01, 7, 0xFFFFFFFF),  # the owner: rwx
        (0x02, 7, 1234),  # the named user: rwx
        (0x04, 5, 0xFFFFFFFF),  # the owning group: r-x
        (0x10, 7, 0xFFFFFFFF),  # the mask lets the named user's rwx through
        (0x20, 5, 0xFFFFFFFF),  # others: r-x
    ]


def _container_like_tree(attempt) -> None:
    """What a task running as root leaves: directories made with the usual mode under umask
    022, and a file in them."""
    old = os.umask(0o022)
    try:
        os.makedirs(attempt / "out" / "deep")
        (attempt / "out" / "deep" / "model.bin").write_bytes(b"x")
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a container and a user")
@pytest.mark.parametrize("granted", [True, False])
def test_root_made_directories_are_deletable_by_the_named_user_only_with_it(tmp_path, granted):
    attempt = tmp_path / "attempt"
    attempt.mkdir()
    os.chmod(attempt, 0o777)  # as the docker runtime leaves it
    if granted and not grant_default_acl(str(attempt), nobody_uid()):
        pytest.skip("this file system has no ACLs")
    _container_like_tree(attempt)
    assert delete_as(attempt, "out") is granted
    assert (attempt / "out").exists() is not granted


def test_a_missing_directory_is_an_error_not_a_silent_false(tmp_path):
    with pytest.raises(FileNotFoundError):
        grant_default_acl(str(tmp_path / "missing"), 1234)


def test_an_acl_that_cannot_be_set_does_not_fail_the_attempt(tmp_path):
    from tether.agent.config import AgentConfig
    from tether.agent.runtimes.docker import DockerRuntime

    runtime = DockerRuntime(AgentConfig(node="n1", runtime="docker", work_dir=tmp_path))
    runtime.owner_uid = 1234
    runtime._grant_acl(str(tmp_path / "missing"))  # logged, not raised
    assert runtime._acls  # and tried again for the next attempt
    runtime._grant_acl(str(tmp_path))
    if not runtime._acls:
        pytest.skip("this file system has no ACLs")
    assert os.getxattr(tmp_path, "system.posix_acl_default") == default_acl(1234)
