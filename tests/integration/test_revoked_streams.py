"""A revoked token stops reading through a stream it opened before the revoke (README
"Users and tokens": a revoked or expired token is refused by every controller from now on):
the guard checks an open stream's token again as it goes."""

from __future__ import annotations

import threading
import time

from helpers import Mesh, py

from tether.sdk import Workflow
from tether.sdk.client import Client
from tether.sdk.errors import UnauthenticatedError


def test_revoked_token_stops_reading_an_open_log_stream(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", auth=True)
    try:
        mesh.start_controller()
        with Client(mesh.address, token="") as c:
            admin, _ = c.bootstrap_acl()
        admin_c = Client(mesh.address, timeout=30, token=admin)
        mesh._clients.append(admin_c)
        mesh.add_agent("n1", token=admin_c.create_token("agents", "operator")[0])
        viewer, _ = admin_c.create_token("vera", "viewer")
        wf = Workflow("ticker")
        wf.task(
            "tick",
            py("import time\nfor i in range(60):\n print('tick', i, flush=True); time.sleep(0.1)"),
            cpu=0.1,
        )
        run = admin_c.submit(wf)
        viewer_c = Client(mesh.address, timeout=30, token=viewer)
        mesh._clients.append(viewer_c)
        got: list[tuple[float, bytes]] = []
        error: list[BaseException] = []

        def follow():
            try:
                for chunk in viewer_c.logs(run.id, "tick", follow=True):
                    got.append((time.monotonic(), chunk.data))
            except BaseException as e:
                error.append(e)

        th = threading.Thread(target=follow, daemon=True)
        th.start()
        mesh.wait_for(lambda: len(got) >= 3, 20, "the viewer reads the log")
        admin_c.revoke_token("vera")
        revoked_at = time.monotonic()
        # New calls are refused at once...
        try:
            viewer_c.get_run(run.id)
            raise AssertionError("a revoked token was accepted for a new call")
        except UnauthenticatedError:
            pass
        th.join(20)
        after = b"".join(d for at, d in got if at > revoked_at + 1.0)
        # ...but the stream opened before goes on.
        assert not after, (
            f"{len(after)} bytes of logs reached the revoked token's open stream more than 1s "
            f"after the revoke (stream error: {error!r})"
        )
    finally:
        mesh.close()
