"""Fuzzing (issue 6): schemathesis generates requests from our own /openapi.json, valid (positive) and invalid
(negative), against a running server with the API key. Zero 5xx; every error is an OpenAI error body; responses
conform to the document (status codes, content types, schemas); invalid data is refused.

Bounded and deterministic: a fixed number of examples per operation and mode, derandomized, no example database.
Positive cases mostly name the served model, so they get past the model check into limits, rendering and the
engine (the server has a 64-token context, so every generation is short).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ServerProcess
from tests.e2e.hardening_support import HEADERS, MODEL, assert_no_leak, assert_serves, hardened_server

MAX_EXAMPLES = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(start_server: type[ServerProcess], tiny_qwen2_vl: Path,
           tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return hardened_server(start_server, tiny_qwen2_vl, tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def schema(server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=HEADERS,
                                         config=SchemathesisConfig())


def check_error_body(response: Any) -> None:
    if response.status_code < 400:
        return
    content_type = response.headers["content-type"]  # schemathesis keeps every value of a header
    assert [value.split(";")[0] for value in content_type] == ["application/json"], response.headers
    data = response.json()
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
    assert_no_leak(response.text)


def fuzz(schema: Any, server: ServerProcess, mode: GenerationMode) -> Counter[tuple[str, int]]:
    statuses: Counter[tuple[str, int]] = Counter()
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), pin_model=st.sampled_from([True, True, False]))
        def run(case: Any, pin_model: bool) -> None:
            if mode is GenerationMode.POSITIVE and pin_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            response = case.call(base_url=server.base_url, headers=HEADERS, timeout=60)
            statuses[(case.operation.label, response.status_code)] += 1
            assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
            check_error_body(response)
            case.validate_response(response, checks=checks, headers=HEADERS)

        if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
            continue  # nothing to make invalid: GET /v1/models, /health, /version, /stats take no input
        run()
    return statuses


def _has_inputs(operation: Any) -> bool:
    return bool(operation.body or operation.path_parameters or operation.query or operation.headers)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_fuzz_the_openapi_document(schema: Any, server: ServerProcess, mode: GenerationMode) -> None:
    statuses = fuzz(schema, server, mode)
    print(f"\n{mode.value}: {dict(sorted(statuses.items()))}")
    chat = {status for (label, status) in statuses if label == "POST /v1/chat/completions"}
    if mode is GenerationMode.POSITIVE:
        assert 200 in chat  # the fuzzer got all the way through the engine
    else:
        assert chat and all(400 <= status < 500 for status in chat)
    assert_serves(server)
