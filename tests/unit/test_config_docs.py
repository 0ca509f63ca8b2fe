"""The README's settings tables are generated from the config classes and must match them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "config_docs.py"


def _script():
    spec = importlib.util.spec_from_file_location("config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_tables_match_the_config_classes():
    docs = _script()
    current = docs.README.read_text(encoding="utf-8")
    assert docs.render(current) == current, "run: .venv/bin/python scripts/config_docs.py"


def test_every_setting_has_a_row():
    from tether.agent.config import AgentConfig
    from tether.controller.config import ControllerConfig
    from tether.sdk.settings import settings_of

    tables = _script().tables()
    for name, cls in (("controller", ControllerConfig), ("agent", AgentConfig)):
        for s in settings_of(cls):
            assert f"| `{s.name}` |" in tables[name], s.name
