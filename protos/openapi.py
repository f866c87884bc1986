"""Generate the OpenAPI 3 document of the HTTP/JSON API from the proto.

    python protos/openapi.py           # (re)write protos/openapi/pairdots.v1.openapi.json
    python protos/openapi.py --check   # exit 1 when the committed document is stale

Paths and methods come from the `google.api.http` annotations, read by the same code the
server's gateway routes with (pairdots_server.rpc.http_rules); schemas from the messages in
proto3 JSON form (lowerCamelCase names, int64 as strings, enums by name, Timestamp/Duration as
strings); descriptions from the .proto comments (protoc --include_source_info, offline, with
Google's protos from the installed packages as in generate.py). Errors are google.rpc.Status.
Run it with PYTHONPATH=server:client (or the package installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "protos" / "openapi" / "pairdots.v1.openapi.json"

_spec = importlib.util.spec_from_file_location("pairdots_generate", ROOT / "protos" / "generate.py")
assert _spec is not None and _spec.loader is not None
_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generate)

FD = descriptor.FieldDescriptor
_SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_INT64: {"type": "string", "format": "int64"},
    FD.TYPE_SINT64: {"type": "string", "format": "int64"},
    FD.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FD.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FD.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "30s"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
}


def _comments() -> dict[str, str]:
    """{full name of a message / field / enum / method: its leading .proto comment}."""
    import grpc_tools
    from grpc_tools import protoc

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        include = _generate._google_include_dir(tmp)
        well_known = Path(grpc_tools.__path__[0]) / "_proto"
        protos = sorted(
            str(p.relative_to(ROOT / "protos"))
            for p in (ROOT / "protos").glob("pairdots/**/*.proto")
        )
        desc_out = tmp / "set.pb"
        args = [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            f"-I{well_known}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={desc_out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        fds = descriptor_pb2.FileDescriptorSet.FromString(desc_out.read_bytes())
    for f in fds.file:
        by_path = {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location}

        def walk(
            msgs: Any, prefix: str, path: tuple[int, ...], by_path: dict[Any, str] = by_path
        ) -> None:
            for i, m in enumerate(msgs):
                name = f"{prefix}.{m.name}"
                mpath = (*path, i)
                out[name] = by_path.get(mpath, "")
                for j, fld in enumerate(m.field):
                    out[f"{name}.{fld.name}"] = by_path.get((*mpath, 2, j), "")
                for j, e in enumerate(m.enum_type):
                    out[f"{name}.{e.name}"] = by_path.get((*mpath, 4, j), "")
                walk(m.nested_type, name, (*mpath, 3))

        walk(f.message_type, f.package, (4,))
        for i, e in enumerate(f.enum_type):
            out[f"{f.package}.{e.name}"] = by_path.get((5, i), "")
        for i, s in enumerate(f.service):
            for j, m in enumerate(s.method):
                out[f"{f.package}.{s.name}.{m.name}"] = by_path.get((6, i, 2, j), "")
    return {k: " ".join(v.split()) for k, v in out.items() if v.strip()}


class _Schemas:
    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, desc: Any) -> dict[str, Any]:
        name = desc.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder against recursion
            self.schemas[name] = self._message(desc)
        return {"$ref": f"#/components/schemas/{name}"}

    def enum(self, desc: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "enum": [v.name for v in desc.values]}
        if self.comments.get(desc.full_name):
            out["description"] = self.comments[desc.full_name]
        return out

    def field(self, fld: Any) -> dict[str, Any]:
        if fld.message_type is not None and fld.message_type.GetOptions().map_entry:
            value = fld.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        one = self._single(fld)
        return {"type": "array", "items": one} if fld.is_repeated else one

    def _single(self, fld: Any) -> dict[str, Any]:
        if fld.type == FD.TYPE_MESSAGE:
            return self.ref(fld.message_type)
        if fld.type == FD.TYPE_ENUM:
            return self.enum(fld.enum_type)
        return dict(_SCALARS[fld.type])

    def _message(self, desc: Any) -> dict[str, Any]:
        """A message's schema; google.api.field_behavior becomes OpenAPI's: OUTPUT_ONLY
        fields are `readOnly`, REQUIRED ones are listed in `required`."""
        from google.api import field_behavior_pb2 as fb

        props: dict[str, Any] = {}
        required: list[str] = []
        for fld in desc.fields:
            schema = self.field(fld)
            extra: dict[str, Any] = {}
            text = self.comments.get(f"{desc.full_name}.{fld.name}")
            if text:
                extra["description"] = text
            behavior = set(fld.GetOptions().Extensions[fb.field_behavior])
            if fb.OUTPUT_ONLY in behavior:
                extra["readOnly"] = True
            if fb.REQUIRED in behavior:
                required.append(fld.json_name)
            if extra:
                schema = {"allOf": [schema], **extra} if "$ref" in schema else {**schema, **extra}
            props[fld.json_name] = schema
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        if self.comments.get(desc.full_name):
            out["description"] = self.comments[desc.full_name]
        return out


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")


def openapi_path(template: str) -> tuple[str, list[tuple[str, str, str]]]:
    """An OpenAPI path for an HttpRule template and its parameters [(name, field)]: the
    pattern's literal parts stay in the path, its wildcard becomes a parameter named after the
    field ("/v1/{model=models/*}:explain" → "/v1/models/{model}:explain": the field `model`
    is "models/" + the parameter). Returns [(parameter, field, pattern)]."""
    params: list[tuple[str, str, str]] = []

    def sub(m: re.Match[str]) -> str:
        field, pattern = m.group(1), m.group(2) or "*"
        parts = pattern.split("/")
        if all(p not in ("*", "**") for p in parts):
            return pattern
        name = field.split(".")[-1]
        params.append((name, field, pattern))
        return "/".join(p if p not in ("*", "**") else "{" + name + "}" for p in parts)

    return _VAR.sub(sub, template), params


def document() -> dict[str, Any]:
    from google.rpc import status_pb2

    from pairdots.v1 import pairdots_pb2
    from pairdots_server.errors import HTTP_STATUS
    from pairdots_server.rpc.http_rules import api_routes

    comments = _comments()
    schemas = _Schemas(comments)
    status_ref = schemas.ref(status_pb2.Status.DESCRIPTOR)
    codes = ", ".join(f"{c} → {h}" for c, h in sorted(HTTP_STATUS.items()))
    paths: dict[str, dict[str, Any]] = {}
    for route in api_routes():
        path, bound = openapi_path(route.template)
        in_desc = route.input_type.DESCRIPTOR
        params: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": f"The request field `{field}` is the path text matching "
                f"`{pattern}` (e.g. {pattern.replace('**', name).replace('*', name)}).",
            }
            for name, field, pattern in bound
        ]
        if route.body != "*":
            bound_fields = {f for _, f, _ in bound}
            for fld in in_desc.fields:
                if (
                    fld.name in bound_fields
                    or fld.type == FD.TYPE_MESSAGE
                    and (fld.message_type.full_name != "google.protobuf.Duration")
                ):
                    continue
                p: dict[str, Any] = {
                    "name": fld.json_name,
                    "in": "query",
                    "schema": schemas.field(fld),
                }
                if comments.get(f"{in_desc.full_name}.{fld.name}"):
                    p["description"] = comments[f"{in_desc.full_name}.{fld.name}"]
                params.append(p)
        op: dict[str, Any] = {
            "operationId": f"{route.service.split('.')[-1]}_{route.method}",
            "tags": [route.service],
            "summary": comments.get(f"{route.service}.{route.method}", route.method),
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        "application/json": {"schema": schemas.ref(route.output_type.DESCRIPTOR)}
                    },
                },
                "default": {
                    "description": "An error: the HTTP status of the google.rpc.Code "
                    f"({codes}); the body is the google.rpc.Status.",
                    "content": {"application/json": {"schema": status_ref}},
                },
            },
        }
        if params:
            op["parameters"] = params
        if route.body == "*":
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas.ref(in_desc)}},
            }
        paths.setdefault(path, {})[route.http_method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "pairdots HTTP/JSON API",
            "version": "v1",
            "description": f"{pairdots_pb2.DESCRIPTOR.package} over HTTP/JSON, generated by "
            "protos/openapi.py from the google.api.http annotations; bodies are proto3 JSON. Bearer auth "
            "(`Authorization: Bearer <token>`) when the server has tokens; `X-Server-Timeout: "
            "<seconds>` sets the call's deadline.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def render() -> str:
    return json.dumps(document(), indent=1, ensure_ascii=False, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check for staleness")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"stale {OUT.relative_to(ROOT)}; run: python protos/openapi.py", file=sys.stderr)
            return 1
        print("OpenAPI document is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
