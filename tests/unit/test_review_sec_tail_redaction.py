"""Security review: the log tail a report carries (stored in etcd, shown by `tether status`)
is the file's last TAIL_BYTES; a secret cut by the start of that window is not recognised by
``redact`` (it replaces whole values only), so most of the secret is stored and shown."""

from __future__ import annotations

from tether.agent import launch
from tether.api.v1 import agent_pb2


def test_secret_cut_by_the_tail_window_is_still_masked(tmp_path):
    secret = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
    keep = 30  # characters of the secret that fall inside the tail window
    log = tmp_path / "stdout.log"
    filler = "x" * (launch.TAIL_BYTES - keep - 1)
    log.write_text("API key: " + secret + "\n" + filler)
    status = agent_pb2.TaskStatus(stdout_tail=launch.tail(log))
    launch.redact(status, [secret])
    leaked = secret[-keep:]
    assert leaked not in status.stdout_tail, (
        f"{keep} of the secret's {len(secret)} characters are in the stored tail: "
        f"{status.stdout_tail[: keep + 5]!r}..."
    )
