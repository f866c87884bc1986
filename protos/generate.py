"""Generate the Python messages, gRPC stubs and typed stubs (.pyi) from protos/.

    python protos/generate.py           # (re)write client/pairdots/v1/ and protos/third_party/
    python protos/generate.py --check   # exit 1 when the committed code is stale

Output goes to client/pairdots/v1/ (the proto package is pairdots.v1, so the generated imports
resolve without rewriting). Google's protos come from the installed googleapis-common-protos
and grpcio-tools packages, so this works offline. Pinned generator versions live in
pyproject.toml's dev extra; a different grpcio-tools/mypy-protobuf changes the output.

protos/third_party/ is the committed include tree for everyone else (buf, protoc for other
languages, Node's @grpc/proto-loader): the transitive imports of the pairdots protos (plus
google/rpc/error_details.proto, whose messages the errors carry, google/api/resource.proto, and
grpc/health/v1/health.proto, the standard health service the server implements) copied from
the same installed packages, so `-I protos -I protos/third_party` resolves every import
offline. No installed package ships health.proto as a file: grpcio-health-checking has only its
compiled descriptor, so the file is written from that descriptor (render_proto) under its
canonical path (package grpc.health.v1; the Python package registers it as
grpc_health/v1/health.proto).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"
GENERATED_DIR = OUT_ROOT / "pairdots" / "v1"
HAND_WRITTEN = {"__init__.py"}
THIRD_PARTY_DIR = PROTO_ROOT / "third_party"
#: Imported by no pairdots proto but needed by clients: the error details every error carries,
#: and the resource annotations (AIP-123).
THIRD_PARTY_EXTRA = ("google/rpc/error_details.proto", "google/api/resource.proto",
                     "grpc/health/v1/health.proto")
#: Where health.proto goes in the include tree (its canonical path in grpc/grpc-proto).
HEALTH_PROTO = "grpc/health/v1/health.proto"

_SCALARS = {
    "TYPE_DOUBLE": "double", "TYPE_FLOAT": "float", "TYPE_INT64": "int64",
    "TYPE_UINT64": "uint64", "TYPE_INT32": "int32", "TYPE_FIXED64": "fixed64",
    "TYPE_FIXED32": "fixed32", "TYPE_BOOL": "bool", "TYPE_STRING": "string",
    "TYPE_BYTES": "bytes", "TYPE_UINT32": "uint32", "TYPE_SFIXED32": "sfixed32",
    "TYPE_SFIXED64": "sfixed64", "TYPE_SINT32": "sint32", "TYPE_SINT64": "sint64",
}


def render_proto(fd: Any) -> str:
    """The .proto source of a proto3 FileDescriptorProto with messages (nested messages,
    maps, nested enums), top-level enums, services (streaming included) and file options of
    string/bool type. Anything else (oneofs, extensions, field options, imports, proto2) is
    refused rather than dropped. Comments are not in a descriptor, so the file has none but
    a header saying where it came from."""
    from google.protobuf import descriptor_pb2 as d

    if fd.syntax != "proto3" or fd.dependency or fd.extension:
        raise SystemExit(f"render_proto: {fd.name} uses features it does not render")
    pkg = "." + fd.package + "."
    ftype = d.FieldDescriptorProto

    def short(type_name: str) -> str:
        return type_name.removeprefix(pkg)

    def field_type(f: Any) -> str:
        if f.type in (ftype.TYPE_MESSAGE, ftype.TYPE_ENUM):
            return short(f.type_name)
        return _SCALARS[ftype.Type.Name(f.type)]

    def enum_lines(e: Any, indent: str) -> list[str]:
        return [f"{indent}enum {e.name} {{",
                *(f"{indent}  {v.name} = {v.number};" for v in e.value), f"{indent}}}"]

    def message_lines(m: Any, scope: str, indent: str) -> list[str]:
        if m.oneof_decl or m.extension or m.extension_range:
            raise SystemExit(f"render_proto: {m.name} has oneofs or extensions")
        full = f"{scope}.{m.name}"
        maps = {f"{full}.{n.name}": n for n in m.nested_type if n.options.map_entry}
        out = [f"{indent}message {m.name} {{"]
        for e in m.enum_type:
            out += enum_lines(e, indent + "  ")
        for n in m.nested_type:
            if not n.options.map_entry:
                out += message_lines(n, full, indent + "  ")
        for f in m.field:
            if f.HasField("options") or f.proto3_optional:
                raise SystemExit(f"render_proto: {full}.{f.name} has options")
            if f.type_name in maps:
                k, v = maps[f.type_name].field
                decl = f"map<{field_type(k)}, {field_type(v)}>"
            else:
                label = "repeated " if f.label == ftype.LABEL_REPEATED else ""
                decl = label + field_type(f)
            out.append(f"{indent}  {decl} {f.name} = {f.number};")
        return [*out, f"{indent}}}"]

    lines = [f"// Written by protos/generate.py from the compiled descriptor of {fd.name} in",
             "// the installed grpcio-health-checking package (no .proto file ships with it).",
             "", f'syntax = "{fd.syntax}";', "", f"package {fd.package};", ""]
    for opt, value in sorted(fd.options.ListFields(), key=lambda x: x[0].name):
        text = f'"{value}"' if isinstance(value, str) else str(value).lower()
        lines.append(f"option {opt.name} = {text};")
    for e in fd.enum_type:
        lines += ["", *enum_lines(e, "")]
    for m in fd.message_type:
        lines += ["", *message_lines(m, "." + fd.package, "")]
    for svc in fd.service:
        lines += ["", f"service {svc.name} {{"]
        for meth in svc.method:
            cs = "stream " if meth.client_streaming else ""
            ss = "stream " if meth.server_streaming else ""
            lines.append(f"  rpc {meth.name}({cs}{short(meth.input_type)}) returns "
                         f"({ss}{short(meth.output_type)});")
        lines.append("}")
    return "\n".join(lines) + "\n"
_IMPORT_RE = re.compile(r'^import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.MULTILINE)


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
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    health = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(health)
    (include / HEALTH_PROTO).parent.mkdir(parents=True, exist_ok=True)
    (include / HEALTH_PROTO).write_text(render_proto(health), encoding="utf-8")
    return include


def third_party_sources(include: Path) -> dict[str, Path]:
    """{path under third_party/: source file} for the closure of the pairdots protos' imports
    (and THIRD_PARTY_EXTRA), resolved in `include` (see _google_include_dir) and grpc_tools'
    well-known types."""
    import grpc_tools

    well_known = Path(grpc_tools.__path__[0]) / "_proto"
    todo: list[str] = list(THIRD_PARTY_EXTRA)
    for proto in PROTO_ROOT.glob("pairdots/**/*.proto"):
        todo += _IMPORT_RE.findall(proto.read_text(encoding="utf-8"))
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in found or name.startswith("pairdots/"):
            continue
        src = next((d / name for d in (include, well_known) if (d / name).is_file()), None)
        if src is None:
            raise SystemExit(f"cannot find {name} in the installed packages")
        found[name] = src
        todo += _IMPORT_RE.findall(src.read_text(encoding="utf-8"))
    return dict(sorted(found.items()))


def third_party_problems() -> list[str]:
    """Files of protos/third_party/ that are missing, extra or differ from the packages."""
    with tempfile.TemporaryDirectory() as tmp_name:
        wanted = third_party_sources(_google_include_dir(Path(tmp_name)))
        have = {str(p.relative_to(THIRD_PARTY_DIR)) for p in THIRD_PARTY_DIR.rglob("*.proto")}
        problems = sorted(f"third_party/{n}" for n in set(wanted) ^ have)
        for name, src in wanted.items():
            dst = THIRD_PARTY_DIR / name
            if dst.exists() and not filecmp.cmp(src, dst, shallow=False):
                problems.append(f"third_party/{name}")
        return problems


def write_third_party() -> list[Path]:
    """(Re)write protos/third_party/ from the installed packages."""
    if THIRD_PARTY_DIR.exists():
        for old in THIRD_PARTY_DIR.rglob("*.proto"):
            old.unlink()
    with tempfile.TemporaryDirectory() as tmp_name:
        written = []
        for name, src in third_party_sources(_google_include_dir(Path(tmp_name))).items():
            dst = THIRD_PARTY_DIR / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            written.append(dst)
        return written


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
        stale = stale_files() + third_party_problems()
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
    written = generate(OUT_ROOT) + write_third_party()
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
