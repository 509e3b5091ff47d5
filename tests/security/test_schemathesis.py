"""Schemathesis against the OpenAPI schema, in-process (ASGI), with every check it has.

Each operation gets a bounded number of generated requests (positive and negative), sent with a valid
API key over the real PostgreSQL and Redis; no response may be a 500, and every response must match
the schema (status codes, content types, headers, bodies). Bounded so the whole run takes a few
minutes on 2 cores: QAAS_SCHEMATHESIS_EXAMPLES raises it for a deeper local run.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from conftest import auth, make_settings, new_key
from hypothesis import HealthCheck, settings as hsettings
from schemathesis import checks as st_checks

EXAMPLES = int(os.environ.get("QAAS_SCHEMATHESIS_EXAMPLES", "100"))


def _app():
    """The app is built at import (schemathesis reads its schema then); the test's real settings -- its
    PostgreSQL database and Redis -- are swapped in by the fixture below before any request is made."""
    import tempfile
    from pathlib import Path

    from qaas.api.app import create_app

    placeholder = make_settings(Path(tempfile.mkdtemp(prefix="qaas-st-")), rate_limit_per_minute=0)
    return create_app(placeholder)


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def st_key(tmp_path_factory, pg_url):
    import redis

    from conftest import REDIS_URL

    url = f"{REDIS_URL}/15"
    redis.Redis.from_url(url).flushdb()
    settings = make_settings(tmp_path_factory.mktemp("schemathesis"), database_url=pg_url, broker_url=url,
                             rate_limit_per_minute=0)
    APP.state.settings = settings
    yield new_key(settings, "fuzzer")
    from sqlalchemy import text

    from qaas.db.session import get_engine

    with get_engine(pg_url).begin() as conn:  # leave the session database empty for the tests after us
        conn.execute(text("TRUNCATE webhook_delivery_attempts, webhook_deliveries, webhook_endpoints, "
                          "hub_credentials, job_events, jobs, api_keys CASCADE"))


ALL_CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
    st_checks.positive_data_acceptance,
    st_checks.missing_required_header,
    st_checks.unsupported_method,
    st_checks.use_after_free,
    st_checks.ensure_resource_availability,
    st_checks.ignored_auth,
]


@pytest.mark.timeout(900)
@schema.parametrize()
@hsettings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
           suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case, st_key):
    key = st_key
    if case.path == "/v1/jobs/{job_id}/events" and "stream" in (case.query or {}):
        case.query["stream"] = False  # an SSE stream of a live job does not end; the JSON page is checked
    case.call_and_validate(headers={**auth(key), "Accept": "application/json"}, checks=ALL_CHECKS,
                           excluded_checks=[st_checks.positive_data_acceptance])
