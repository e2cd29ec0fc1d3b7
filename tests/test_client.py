"""The agent host's helper and the attribute channels it uses: proxy user names, pg startup
options, and the client-credentials grant against a real (local) token endpoint."""

from __future__ import annotations

import base64
import json

import pytest

from addons.client import (
    ATTRIBUTES_USER,
    ClientCredentials,
    ClientError,
    Custody,
    StaticToken,
)
from addons.identity import user_attributes
from pg_bridge.server.bridge import split_options
from tests.support.servers import TokenEndpoint


def encoded(document) -> str:
    return ATTRIBUTES_USER + base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


@pytest.mark.parametrize("user, attributes", [
    (encoded({"agent": "Ops", "task": "restock", "colour": "red"}), {"agent": "Ops", "task": "restock"}),
    (encoded({"model": "m" * 300}), {"model": "m" * 256}),
    ("agent", {}),
    (ATTRIBUTES_USER + "!!!", {}),
    (encoded(["agent"]), {}),
])
def test_proxy_user_names_carry_only_known_attributes(user, attributes):
    assert user_attributes(user) == attributes


@pytest.mark.parametrize("options, kept, attributes", [
    (r"-c custody.agent=Inventory\ analyst -c custody.task=check\ stock", "",
     {"agent": "Inventory analyst", "task": "check stock"}),
    ("--custody.model=m -c search_path=app -cwork_mem=4MB", "-c search_path=app -cwork_mem=4MB", {"model": "m"}),
    ("-c custody.password=x -c custody.run=r1", "", {"run": "r1"}),
    ("", "", {}),
])
def test_pg_startup_options_split_into_attributes_and_the_rest(options, kept, attributes):
    assert split_options(options) == (kept, attributes)


def test_the_helper_says_who_is_acting_in_each_channel():
    custody = Custody("http://127.0.0.1:8080", "/ca.pem", StaticToken("tok.en"), agent="Default")
    with custody.acting(task="restock", model="gpt-4o", colour="red"):
        assert custody.headers() == {"x-custody-agent": "Default", "x-custody-task": "restock", "x-custody-model": "gpt-4o"}
        assert custody.ssh_env()["CUSTODY_TASK"] == "restock"
        url = custody.proxy_url()
        user = url.split("//")[1].split(":")[0]
        assert user_attributes(user) == {"agent": "Default", "task": "restock", "model": "gpt-4o"}
        assert url.endswith(":tok.en@127.0.0.1:8080")
    assert custody.attributes() == {"agent": "Default"}


@pytest.fixture
def endpoint():
    server = TokenEndpoint("crew:s3cret")
    yield server
    server.stop()


def test_client_credentials_are_cached_and_refreshed_before_expiry(endpoint):
    tokens = ClientCredentials("crew", "s3cret", token_url=endpoint.url, audience="custody", leeway=0)
    assert tokens.token() == "token-0" and tokens.token() == "token-0"
    assert endpoint.issued == [{"grant_type": ["client_credentials"], "audience": ["custody"]}]
    tokens.leeway = 61  # now within a minute of expiry: fetch a new one
    assert tokens.token() == "token-1"


def test_client_credentials_refused_say_why(endpoint):
    with pytest.raises(ClientError, match=r"401 .*invalid_client"):
        ClientCredentials("crew", "wrong", token_url=endpoint.url).token()


def test_the_helper_states_a_justification_in_every_channel():
    custody = Custody("http://127.0.0.1:8080", "/ca.pem", StaticToken("tok.en"))
    why = "customer 88 was charged twice " + "x" * 900
    with custody.justify(why):
        assert custody.headers()["x-custody-justification"] == why.strip()  # a justification keeps 1024 characters
        assert custody.ssh_env()["CUSTODY_JUSTIFICATION"] == why.strip()
        assert user_attributes(custody.proxy_url().split("//")[1].split(":")[0])["justification"] == why
    assert "justification" not in custody.attributes()


@pytest.mark.parametrize("description, expected, justification", [
    ("Restock item 7\n  before noon", "an order id", "Restock item 7 before noon (expected: an order id)"),
    ("Restock item 7", "", "Restock item 7"),
    ("", "", ""),
])
def test_a_crewai_task_is_the_default_justification(description, expected, justification):
    from types import SimpleNamespace

    from addons.client.crew import task_justification

    assert task_justification(SimpleNamespace(description=description, expected_output=expected)) == justification
    assert task_justification(None) == ""
