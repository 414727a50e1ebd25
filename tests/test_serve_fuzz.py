"""Schemathesis against the server's own OpenAPI schema: generated requests never get a 5xx."""

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from test_serve import LIMITS, serve_in_thread

from saesteer.models import load_model
from saesteer.serve import ServeConfig

SENT: list[int] = []  # status of every generated request


@pytest.fixture(scope="module")
def base_url(tiny_model_dir):
    torch.set_num_threads(1)
    for url, _ in serve_in_thread(load_model(str(tiny_model_dir)), ServeConfig(**{**LIMITS, "max_tokens": 4})):
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_dict(httpx.get(f"{base_url}/openapi.json").json())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url):
    response = case.call(base_url=base_url, timeout=30)
    SENT.append(response.status_code)
    case.validate_response(response, checks=[not_a_server_error])


def test_fuzzing_really_sent_requests(base_url):
    assert len(SENT) >= 150 and all(status < 500 for status in SENT), SENT
    print(f"schemathesis: {len(SENT)} requests, statuses {sorted(set(SENT))}, {sum(s >= 500 for s in SENT)} server errors")
