"""Generate the Python messages, gRPC stubs and typed stubs (.pyi) from protos/.

    python protos/generate.py           # (re)write client/pairdots/v1/
    python protos/generate.py --check   # exit 1 when the committed code is stale

Output goes to client/pairdots/v1/ (the proto package is pairdots.v1, so the generated imports
resolve without rewriting). Google's protos come from the installed googleapis-common-protos
and grpcio-tools packages, so this works offline. Pinned generator versions live in
pyproject.toml's dev extra; a different grpcio-tools/mypy-protobuf changes the output.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"
GENERATED_DIR = OUT_ROOT / "pairdots" / "v1"
HAND_WRITTEN = {"__init__.py"}


def _google_include_dir(tmp: Path) -> Path:
    """Lay out google/api, google/rpc and google/longrunning protos under `tmp`.

    googleapis-common-protos ships google/longrunning/operations.proto as
    operations_proto.proto (its descriptor is still registered as operations.proto), so it is
    copied under its canonical name.
    """
    import google.api
    import google.rpc

    include = tmp / "include"
    for mod in (google.api, google.rpc):
        src = Path(mod.__path__[0])
        dst = include / "google" / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for proto in src.glob("*.proto"):
            shutil.copy(proto, dst / proto.name)
    import google.longrunning.operations_proto_pb2 as ops

    lr_dir = include / "google" / "longrunning"
    lr_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(ops.__file__).with_name("operations_proto.proto"), lr_dir / "operations.proto")
    return include


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) with the python, grpc, mypy and mypy-grpc plugins."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.glob("pairdots/**/*.proto"))
    with tempfile.TemporaryDirectory() as tmp_name:
        include = _google_include_dir(Path(tmp_name))
        well_known = Path(grpc_tools.__path__[0]) / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
    out_dir = out_root / "pairdots" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.is_file() and p.name not in HAND_WRITTEN)


def stale_files() -> list[str]:
    """Names of generated files that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        fresh = generate(Path(tmp_name))
        fresh_names = {p.name for p in fresh}
        committed = {p.name for p in GENERATED_DIR.iterdir() if p.is_file()} - HAND_WRITTEN
        problems = sorted(fresh_names ^ committed)
        for p in fresh:
            target = GENERATED_DIR / p.name
            if target.exists() and not filecmp.cmp(p, target, shallow=False):
                problems.append(p.name)
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check for staleness")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale), file=sys.stderr)
            print("run: python protos/generate.py", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    GENERATED_DIR.mkdir(parents=True, exist_ok=True)
    for p in GENERATED_DIR.iterdir():
        if p.is_file() and p.name not in HAND_WRITTEN:
            p.unlink()
    written = generate(OUT_ROOT)
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
