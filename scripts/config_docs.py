"""Regenerate the README's tables of controller and agent settings from the config classes.

Each setting is described once, in ``ControllerConfig`` / ``AgentConfig`` (its ``setting()``
declaration); this script writes those descriptions, flags, variables and defaults between
the ``<!-- settings:NAME -->`` markers of README.md. ``--check`` only reports a difference
(a unit test runs it, so a README that disagrees with the code fails).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def tables() -> dict[str, str]:
    """The generated table of each marked section, by marker name."""
    from tether.agent.config import AgentConfig
    from tether.controller.config import ControllerConfig
    from tether.sdk.settings import markdown_table

    return {"controller": markdown_table(ControllerConfig), "agent": markdown_table(AgentConfig)}


def render(text: str) -> str:
    """``text`` (a README) with each marked table replaced by the generated one."""
    for name, table in tables().items():
        pattern = re.compile(
            rf"(<!-- settings:{name} .*?-->\n)(.*?)(<!-- /settings:{name} -->)", re.DOTALL
        )
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- settings:{name} ... --> markers")
        text = pattern.sub(lambda m, t=table: m.group(1) + t + m.group(3), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if current == wanted:
        return 0
    if args.check:
        print("README.md settings tables are stale: run python scripts/config_docs.py")
        return 1
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
