"""Schemathesis against the server's own OpenAPI schema: generated requests never get a 5xx.

The cases come from schemathesis's hypothesis strategy for the whole schema (its pytest plugin does not
run under pytest 9), one bounded run per test."""

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from test_serve import LIMITS, serve_in_thread

from saesteer.models import load_model
from saesteer.serve import ServeConfig


@pytest.fixture(scope="module")
def base_url(tiny_model_dir):
    torch.set_num_threads(1)
    for url, _ in serve_in_thread(
        load_model(str(tiny_model_dir)), ServeConfig(**{**LIMITS, "max_tokens": 4})
    ):
        yield url.removesuffix("/v1")


def test_generated_requests_get_no_server_errors(base_url):
    torch.set_flush_denormal(
        False
    )  # an imported library may have set flush-to-zero; hypothesis needs subnormal floats
    schema = schemathesis.openapi.from_dict(httpx.get(f"{base_url}/openapi.json").json())
    sent = []

    @given(case=schema.as_strategy())
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        response = case.call(base_url=base_url, timeout=30)
        sent.append((case.operation.label, response.status_code))
        case.validate_response(response, checks=[not_a_server_error])

    check()
    chat = [status for label, status in sent if "chat/completions" in label]
    print(
        f"schemathesis: {len(sent)} requests ({len(chat)} chat completions), statuses {sorted({s for _, s in sent})}, "
        f"{sum(s >= 500 for _, s in sent)} server errors"
    )
    assert len(chat) >= 100 and {200, 400} <= set(chat)  # generated requests both pass and fail validation
