"""A default POSIX ACL that keeps a container's files deletable by a non-root agent.

A container usually runs as root, and its attempt directory is bind-mounted into it. The
directories it creates there belong to root, mode 0755 under the usual umask, so an agent
running as its own user (the shipped systemd unit's ``tether-agent``) could not delete their
contents when its work retention came for them. A default ACL on the attempt directory
naming the agent's uid is inherited by everything created below it, whoever creates it, and
when a directory has a default ACL the creator's umask is not applied: a directory made the
usual way (``mkdir -p``, ``os.makedirs``: mode 0777) gives the agent rwx in it. One made with
an explicit narrower mode (``mkdir -m 755``, a tar archive's modes) still limits it, through
the ACL's mask.

Written as the ``system.posix_acl_default`` extended attribute in the kernel's binary form
(``posix_acl_xattr.h``): a version word, then (tag, perm, id) entries sorted by tag.
"""

from __future__ import annotations

import errno
import os
import struct

__all__ = ["default_acl", "grant_default_acl"]

_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_RWX, _RX = 7, 5
_XATTR = "system.posix_acl_default"
# The file system has no ACLs (or they are turned off on this mount).
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def default_acl(uid: int) -> bytes:
    """The xattr value: owner rwx, ``uid`` rwx, group and others r-x (as umask 022 leaves
    them), and a mask that lets ``uid``'s rwx through."""
    entries = (
        (_USER_OBJ, _RWX, _NO_ID),
        (_USER, _RWX, uid),
        (_GROUP_OBJ, _RX, _NO_ID),
        (_MASK, _RWX, _NO_ID),
        (_OTHER, _RX, _NO_ID),
    )
    return struct.pack("<I", _VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def grant_default_acl(path: str, uid: int) -> bool:
    """Give ``uid`` rwx in every directory later created under ``path``; False when the file
    system does not support ACLs (nothing done).

    Raises:
        OSError: Any other failure (``path`` missing, not permitted).
    """
    try:
        os.setxattr(path, _XATTR, default_acl(uid))
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    return True
