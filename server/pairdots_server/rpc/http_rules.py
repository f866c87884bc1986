"""The HTTP/JSON routes of the API, read from the `google.api.http` annotations (AIP-127).

Every RPC of pairdots.v1.PairdotsService carries an HttpRule in protos/pairdots/v1/
pairdots.proto; google.longrunning.Operations carries Google's own. This module turns them
into `Route`s — pure data, no I/O — that the HTTP gateway (rpc/http_gateway.py) matches and
scripts/openapi.py documents, so the endpoint and the OpenAPI document follow the annotations
by construction.

Path templates, the subset the annotations use (google/api/http.proto):

    template := "/" segment { "/" segment } [ ":" verb ]
    segment  := literal | "{" field [ "=" pattern ] "}"
    pattern  := part { "/" part }, part := literal | "*" (one segment) | "**" (the rest)

A variable binds the matched text (the literal parts included, e.g. "models/tiny") to the
request field it names. `body: "*"` maps the JSON body onto the whole request (path variables
override it); without a body, query parameters fill the request's fields (AIP-127).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.longrunning import operations_pb2
from google.protobuf import descriptor, message, message_factory

from pairdots.v1 import pairdots_pb2

_VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch")

#: WaitOperation has no annotation in google/longrunning/operations.proto; this gateway serves
#: it at the path Google's own HTTP APIs use for it.
WAIT_OPERATION_RULE = http_pb2.HttpRule(post="/v1/{name=operations/**}:wait", body="*")


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str  # GET, POST, DELETE, ...
    template: str  # e.g. "/v1/{model=models/*}:explain"
    body: str  # "*" (whole request from the JSON body) or "" (query parameters)
    service: str  # full service name, e.g. "pairdots.v1.PairdotsService"
    method: str  # RPC name, e.g. "Explain"
    input_type: type[message.Message]
    output_type: type[message.Message]
    regex: re.Pattern[str]
    variables: tuple[str, ...]  # request field paths bound by the path, in order

    @property
    def grpc_path(self) -> str:
        """The gRPC method path, "/<service>/<method>"."""
        return f"/{self.service}/{self.method}"

    def match(self, path: str) -> dict[str, str] | None:
        """{field path: value} when `path` matches the template, else None."""
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        return {var: m.group(f"v{i}") for i, var in enumerate(self.variables)}


def _pattern_regex(pattern: str) -> str:
    parts = []
    for part in pattern.split("/"):
        if part == "**":
            parts.append(r"[^:]+")
        elif part == "*":
            parts.append(r"[^/:]+")
        else:
            parts.append(re.escape(part))
    return "/".join(parts)


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """The regex of a path template (see the module docstring) and its variables' fields."""
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with '/'")
    out, names, pos = [], [], 0
    for i, m in enumerate(_VAR_RE.finditer(template)):
        out.append(re.escape(template[pos : m.start()]))
        names.append(m.group(1))
        out.append(f"(?P<v{i}>{_pattern_regex(m.group(2) or '*')})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out)), tuple(names)


def _rule_binding(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind not in _HTTP_METHODS:
        raise ValueError(f"unsupported HttpRule pattern {kind!r}")
    return kind.upper(), str(getattr(rule, kind))


def _message_class(desc: descriptor.Descriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(desc)


def service_routes(
    service: descriptor.ServiceDescriptor, extra: dict[str, http_pb2.HttpRule] | None = None
) -> list[Route]:
    """The routes of every annotated method of `service` (plus `extra`: method → rule for
    methods without an annotation). Additional bindings are included."""
    routes: list[Route] = []
    for method in service.methods:
        opts = method.GetOptions()
        rules: list[http_pb2.HttpRule] = []
        if opts.HasExtension(annotations_pb2.http):
            top = opts.Extensions[annotations_pb2.http]
            rules = [top, *top.additional_bindings]
        elif extra and method.name in extra:
            rules = [extra[method.name]]
        for rule in rules:
            verb, template = _rule_binding(rule)
            regex, variables = compile_template(template)
            routes.append(
                Route(
                    http_method=verb,
                    template=template,
                    body=rule.body,
                    service=service.full_name,
                    method=method.name,
                    input_type=_message_class(method.input_type),
                    output_type=_message_class(method.output_type),
                    regex=regex,
                    variables=variables,
                )
            )
    return routes


def api_routes() -> list[Route]:
    """Every HTTP route the server serves: PairdotsService, then google.longrunning.Operations."""
    return [
        *service_routes(pairdots_pb2.DESCRIPTOR.services_by_name["PairdotsService"]),
        *service_routes(
            operations_pb2.DESCRIPTOR.services_by_name["Operations"],
            {"WaitOperation": WAIT_OPERATION_RULE},
        ),
    ]


def unannotated_methods() -> list[str]:
    """Full names of PairdotsService methods without a google.api.http annotation (AIP-127
    wants none; tests/api checks this stays empty)."""
    service = pairdots_pb2.DESCRIPTOR.services_by_name["PairdotsService"]
    return [
        m.full_name
        for m in service.methods
        if not m.GetOptions().HasExtension(annotations_pb2.http)
    ]
