"""Checks on the protos: the committed generated code is exactly what protos/generate.py
produces, and every declaration in them is documented."""

import filecmp
import importlib.util
import re

from helpers import ROOT


def test_generated_code_matches_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = ROOT / "protos" / "python"
    cmp = filecmp.dircmp(tmp_path / "v1", committed / "v1", ignore=["__pycache__"])
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    changed = [
        f
        for f in cmp.common_files
        if (tmp_path / "v1" / f).read_bytes() != (committed / "v1" / f).read_bytes()
    ]
    assert not changed, f"regenerate with `python protos/generate.py`: {changed} differ"


# One regex per kind of declaration that must carry a `//` comment.
_DECLARATIONS = {
    "rpc": re.compile(r"^rpc\s+\w+\s*\("),
    "message/enum/service/oneof": re.compile(r"^(message|enum|service|oneof)\s+\w+\s*\{"),
    "enum value": re.compile(r"^[A-Z][A-Z0-9_]*\s*=\s*-?\d+\s*(\[.*\])?\s*;"),
    # Fields, including `repeated`/`optional`, `map<K, V>` and oneof members.
    "field": re.compile(
        r"^((repeated|optional)\s+)?(map\s*<[^>]+>|[A-Za-z_][\w.]*)\s+\w+\s*=\s*\d+\s*(\[.*\])?\s*;"
    ),
}


def undocumented_declarations(text: str) -> tuple[list[str], set[str]]:
    """Return the declarations in proto ``text`` lacking a comment, and the kinds seen.

    A declaration is documented by a `//` line directly above it (the last line of a
    comment block) or a `//` comment trailing on its own line.
    """
    missing, kinds = [], set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        kind = next((k for k, rx in _DECLARATIONS.items() if rx.match(s)), None)
        if kind is None:
            continue
        kinds.add(kind)
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("//") and "//" not in s:
            missing.append(f"{i + 1}: {kind}: {s}")
    return missing, kinds


def test_every_rpc_and_field_is_documented():
    """Each rpc, message, enum, enum value and field in the protos has a comment."""
    undocumented, seen = [], set()
    for proto in sorted((ROOT / "protos" / "tether" / "v1").glob("*.proto")):
        missing, kinds = undocumented_declarations(proto.read_text())
        undocumented += [f"{proto.name}:{m}" for m in missing]
        seen |= kinds
    assert seen == set(_DECLARATIONS), f"a regex matched nothing: {set(_DECLARATIONS) - seen}"
    assert not undocumented, "add a // comment above or beside:\n" + "\n".join(undocumented)
