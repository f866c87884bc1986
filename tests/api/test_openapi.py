"""The committed OpenAPI document (protos/openapi/) is what protos/openapi.py makes from the
proto now, is a valid OpenAPI 3 document, and documents every route the gateway serves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from openapi_spec_validator import validate

from pairdots_server.rpc.http_rules import api_routes

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pairdots_openapi", ROOT / "protos" / "openapi.py")
assert _spec is not None and _spec.loader is not None
openapi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(openapi)


def test_committed_document_is_fresh() -> None:
    committed = openapi.OUT.read_text(encoding="utf-8")
    assert committed == openapi.render(), "run `python protos/openapi.py` and commit the result"


def test_document_is_valid_and_covers_every_route() -> None:
    doc = json.loads(openapi.OUT.read_text(encoding="utf-8"))
    validate(doc)
    documented = {(path, verb) for path, item in doc["paths"].items() for verb in item}
    for route in api_routes():
        path, _ = openapi.openapi_path(route.template)
        assert (path, route.http_method.lower()) in documented, route.template
    assert len(documented) == len(api_routes())
    explain = doc["paths"]["/v1/models/{model}:explain"]["post"]
    body = explain["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = doc["components"]["schemas"][body.rsplit("/", 1)[1]]
    assert {"text", "topWords", "examplesPerWord"} <= set(request["properties"])
    assert "10000 characters" in request["properties"]["text"]["description"]


def test_paths_keep_the_resource_prefix() -> None:
    assert openapi.openapi_path("/v1/{model=models/*}:explain") == (
        "/v1/models/{model}:explain",
        [("model", "model", "models/*")],
    )
    assert openapi.openapi_path("/v1/{name=operations}") == ("/v1/operations", [])


def test_field_behavior_becomes_read_only_and_required() -> None:
    """OUTPUT_ONLY (every field of a message the server returns) is OpenAPI's readOnly;
    REQUIRED request fields are listed in `required`."""
    schemas = json.loads(openapi.OUT.read_text(encoding="utf-8"))["components"]["schemas"]
    for name in ("pairdots.v1.Model", "pairdots.v1.ExplainResponse", "pairdots.v1.Diagnostics"):
        props = schemas[name]["properties"]
        assert props and all(p.get("readOnly") is True for p in props.values()), name
    assert "required" not in schemas["pairdots.v1.Model"]
    request = schemas["pairdots.v1.ExplainRequest"]
    assert request["required"] == ["model", "text"]
    assert not any(p.get("readOnly") for p in request["properties"].values())
    assert schemas["pairdots.v1.Model"]["properties"]["trainingExampleCount"]["format"] == "int64"
