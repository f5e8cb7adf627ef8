"""The OpenAPI document at /schema/openapi.json, with the request bodies the handlers really take.

The handlers read the raw body and decode it with msgspec themselves (so every bad field is a 400 in OpenAI's
envelope, naming the field), which leaves Litestar nothing to document. This render plugin adds, to the schema
Litestar generates, each POST route's body as msgspec's JSON Schema of the very struct that decodes it, and the
error envelope for the 4xx answers: clients and the schemathesis fuzz test (tests/test_fuzz.py) then see the
real contract.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin

from api import protocol_legacy as legacy
from api.admin import LoadRequest, UnloadRequest
from api.protocol import ROLES, ChatCompletionRequest
from api.serving_embed import EmbeddingRequest, RerankRequest
from common.model_ids import MAX_MODEL_ID_CHARS, MODEL_ID_PATTERN

REQUEST_BODIES: dict[str, type] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": legacy.CompletionRequest,
    "/tokenize": legacy.TokenizeRequest,
    "/detokenize": legacy.DetokenizeRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/rerank": RerankRequest,
    "/rerank": RerankRequest,
    "/admin/models/load": LoadRequest,
    "/admin/models/unload": UnloadRequest,
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

ERRORS = {"400": "Invalid request: `param` names the field", "401": "Missing or unknown API key",
          "404": "Unknown model (or one this key may not use)", "413": "Request body too large",
          "429": "Rate limit or replica capacity reached (see Retry-After)"}


def add_request_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of Litestar's OpenAPI document with request bodies and the error envelope filled in."""
    doc = copy.deepcopy(schema)
    bodies, components = msgspec.json.schema_components(list(REQUEST_BODIES.values()),
                                                        ref_template="#/components/schemas/{name}")
    _add_checked_rules(components)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, component in components.items():
        schemas.setdefault(name, component)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, body in zip(REQUEST_BODIES, bodies, strict=True):
        operation = doc.get("paths", {}).get(path, {}).get("post")
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                for status, text in ERRORS.items():
                    operation["responses"].setdefault(status, {
                        "description": text, "content": {"application/json": {"schema": error_ref}}})
    return doc


def _add_checked_rules(components: dict[str, Any]) -> None:
    """Rules the structs leave to code (`validate_messages`, the model-id shape), written into the schema."""
    message = components["RequestMessage"]["properties"]
    message["role"] = {"enum": list(ROLES)}
    part = components["ContentPart"]
    part["properties"]["type"] = {"enum": ["text"]}
    part["required"] = sorted({*part.get("required", []), "type", "text"})
    components["ChatCompletionRequest"]["properties"]["messages"]["minItems"] = 1
    for kind in REQUEST_BODIES.values():
        model = components[kind.__name__]["properties"]["model"]
        model.update(pattern=MODEL_ID_PATTERN, maxLength=MAX_MODEL_ID_CHARS)


class BodiesJsonPlugin(JsonRenderPlugin):
    """Litestar's JSON renderer, after `add_request_bodies` (computed once)."""

    def __init__(self) -> None:
        super().__init__()
        self._rendered: bytes | None = None

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = self.render_json(request, add_request_bodies(openapi_schema))
        return self._rendered


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(title="Axion", version="0.1.0", render_plugins=[BodiesJsonPlugin(), SwaggerRenderPlugin()])
