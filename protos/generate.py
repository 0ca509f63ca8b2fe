"""Regenerate the Python code for the Tether API from ``protos/tether/v1``.

Run ``python protos/generate.py`` after changing a ``.proto`` file. The output
lands in ``protos/python`` (installed as ``tether.api``) and is committed; a
test regenerates into a temporary directory and fails if the two differ.

protoc names modules after proto paths (``tether.v1``), while the installed
package is ``tether.api.v1``; the import lines are rewritten here, in the one
place that produces the code, so nobody edits generated files by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = sorted((HERE / "tether" / "v1").glob("*.proto"))
DEFAULT_OUT = HERE / "python"
_IMPORT = re.compile(r"^from tether\.v1 import", re.MULTILINE)
# grpc_python_out stamps the grpcio-tools version that ran into each *_pb2_grpc.py, as the
# oldest grpcio the code accepts at run time. The code itself is the same across patch
# releases: the stamp is held at the release it was first generated with, so that a new
# patch release neither makes the committed code "drift" nor raises users' grpcio floor.
_GRPC_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)
GRPC_FLOOR = "1.85.1"


def generate(out: Path) -> None:
    """Write the generated package (``__init__.py`` and ``v1/``) under ``out``."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(HERE)) for p in SOURCES),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        v1 = out / "v1"
        if v1.exists():
            shutil.rmtree(v1)
        v1.mkdir(parents=True)
        for f in sorted((Path(tmp) / "tether" / "v1").iterdir()):
            text = _IMPORT.sub("from tether.api.v1 import", f.read_text())
            text = _GRPC_STAMP.sub(f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text)
            (v1 / f.name).write_text(text)
    (out / "__init__.py").write_text('"""Generated Tether API (see protos/generate.py)."""\n')
    # PEP 561: type checkers read the generated stubs (*.pyi) of an installed tether.api.
    (out / "py.typed").write_text("")
    (v1 / "__init__.py").write_text(
        '"""Generated code for the tether.v1 protos. Do not edit: run protos/generate.py."""\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)
    print(f"generated {len(SOURCES)} protos into {parser.parse_args().out}", file=sys.stderr)


if __name__ == "__main__":
    main()
