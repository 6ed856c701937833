"""schemathesis against the OpenAPI document the server serves (with a bearer token set): no 5xx, and
every response (status, content type, headers, body) as the document says. Bounded: a few examples
per operation, no deadline per example, the whole file well under a minute."""
import pytest

pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from edgexfer.runtime.oip import BatchConfig, create_app  # noqa: E402
from edgexfer.runtime.server import resolve_models  # noqa: E402
from tests._live import live  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1, token=TOKEN, access_log=False,
                     batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=1, timeout_s=10))
    with live(app) as url:
        yield f"http://{url}"


def test_document_is_served_and_complete(served):
    import json
    import urllib.request

    for path in ("/v2/openapi.json", "/openapi.json"):
        with urllib.request.urlopen(urllib.request.Request(served + path, headers=AUTH), timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["openapi"].startswith("3.")
    assert {"/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{model}", "/v2/models/{model}/ready",
            "/v2/models/{model}/infer", "/v2/models/{model}/classify", "/metrics", "/v2/openapi.json"} <= set(doc["paths"])
    infer = doc["paths"]["/v2/models/{model}/infer"]["post"]
    assert {"200", "400", "401", "404", "413", "503", "504"} <= set(infer["responses"])
    assert doc["paths"]["/v2/models/{model}"]["get"]["parameters"][0]["schema"]["enum"] == ["tiny"]
    assert doc["paths"]["/v2/health/live"]["get"]["security"] == []  # probes need no token


CHECKS = ("status_code_conformance", "content_type_conformance", "response_headers_conformance",
          "response_schema_conformance")


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_server_matches_its_document(served, mode):
    """Every operation, schema-valid (positive) and schema-breaking (negative) requests: no 5xx, and every
    response as documented. (schemathesis's pytest loader `from_fixture` does not run on pytest 9, so the
    operations' hypothesis strategies are driven here.)"""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import load_all_checks, not_a_server_error
    from schemathesis.specs.openapi import checks as oa

    load_all_checks()
    checks = [not_a_server_error] + [getattr(oa, n) for n in CHECKS]
    schema = schemathesis.openapi.from_url(f"{served}/v2/openapi.json", headers=AUTH)
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v2/models/{model}/infer", "POST /v2/models/{model}/classify", "GET /v2/models/{model}"} <= labels, labels
    seen, tested = [], set()
    for op in operations:
        @given(case=op.as_strategy(GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE))
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            r = case.call_and_validate(base_url=served, headers=dict(AUTH), checks=checks, timeout=20)
            seen.append(r.status_code)
            tested.add(op.label)

        try:
            check()
        except Unsatisfiable:  # negative mode: an operation without parameters or body has nothing to break
            assert mode == "negative" and "{model}" not in op.label, op.label
    assert {"POST /v2/models/{model}/infer", "POST /v2/models/{model}/classify"} <= tested
    assert len(seen) >= 20 and max(seen) < 500
