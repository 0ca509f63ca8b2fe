"""The node id an agent keeps in its work dir: made once, kept, and private."""

from __future__ import annotations

import stat

from tether.agent.identity import NODE_ID_FILE, load_node_id


def test_the_node_id_is_made_once_kept_and_readable_by_its_owner_alone(tmp_path):
    first = load_node_id(tmp_path)
    assert len(first) == 32 and load_node_id(tmp_path) == first
    assert stat.S_IMODE((tmp_path / NODE_ID_FILE).stat().st_mode) == 0o600
