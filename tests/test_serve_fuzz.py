"""A fuzz of serve.py's API driven by its own OpenAPI document (/openapi.json), with
schemathesis: requests that fit the schema and requests that break it (wrong types, missing
fields, values out of range), to every endpoint of a live server with three tiny models. No
answer may be a 5xx and none may hang. Bounded to well under a minute."""
import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from test_serve import LiveServer, runs  # noqa: E402, F401  (runs is a fixture)

EXAMPLES = 200  # about 15 s here: a generated case costs more than the tiny models' answer
TIMEOUT = 20  # seconds for one answer: past it the server hangs


@pytest.fixture(scope="module")
def api(runs):  # noqa: F811
    """(the server, a requests session to it, a strategy of cases for every endpoint)."""
    server = LiveServer([runs["chat"], runs["text"], runs["classifier"]], max_tokens=16)
    schema = schemathesis.openapi.from_dict(server.http.get("/openapi.json").json())
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    session = requests.Session()
    session.trust_env = False  # a proxy set in the environment must not see requests to localhost
    yield server, session, cases
    session.close()
    server.close()


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_request_gets_a_5xx_or_hangs(api, data):
    server, session, cases = api
    case = data.draw(cases)
    response = case.call(base_url=server.url, session=session, timeout=TIMEOUT)
    said = f"{case.as_curl_command()}\n-> {response.status_code} {response.text}"
    assert response.status_code < 500, said
    if response.headers.get("content-type") == "application/json" and "error" in response.json():
        assert "\n" not in response.json()["error"]["message"], said  # danlu's errors: one line each
