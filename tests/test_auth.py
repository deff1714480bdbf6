"""API keys: authentication from the Authorization header, per-key model access, the auth config
(keys, keys_file and their checks) and `python -m apps.edge.auth new NAME`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from apps.config import ApiKey, AuthSettings, ConfigError, load_config
from apps.edge.auth import ANONYMOUS, Caller, KeyTable, key_hash, new_key_entry
from apps.errors import Forbidden, GatewayError, ModelNotFound, Unauthorized, error_json

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
SERVED = ["public-chat", "secret-model-x", "internal-embed"]
ALICE_KEY = "sk-alice-0123456789"
BOB_KEY = "sk-bob-9876543210"


def entry(name: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "sha256": key_hash(key), **fields}


def app_args(auth: dict[str, Any], models: list[str] = SERVED) -> dict[str, Any]:
    return {"models": [{"id": m, "path": "x"} for m in models], "auth": auth}


def load(auth: dict[str, Any], models: list[str] = SERVED):
    return load_config(app_args(auth, models), check_model_files=False)


@pytest.fixture
def table() -> KeyTable:
    config = load(
        {
            "enabled": True,
            "keys": [
                entry("alice", ALICE_KEY, models=["public-chat"], priority="high", requests_per_minute=10),
                entry("bob", BOB_KEY),
            ],
        }
    )
    return KeyTable(config.auth)


def error_text(error: GatewayError) -> str:
    return str(error) + error_json(error).decode() + repr(error.headers)


# Authentication


@pytest.mark.parametrize("header", [None, "", "Bearer " + ALICE_KEY, "garbage", "Basic dXNlcjpwYXNz"])
def test_auth_disabled_makes_every_request_anonymous(header):
    caller = KeyTable(AuthSettings()).authenticate(header)
    assert caller is ANONYMOUS
    assert caller.name == "anonymous" and caller.priority == "normal"
    assert caller.may_use("anything") and not caller.rate_limited


def test_auth_disabled_ignores_configured_keys():
    settings = load({"enabled": False, "keys": [entry("alice", ALICE_KEY, models=["public-chat"])]}).auth
    assert KeyTable(settings).authenticate("Bearer " + ALICE_KEY) is ANONYMOUS


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic dXNlcjpwYXNz", ALICE_KEY, "Token " + ALICE_KEY])
def test_missing_or_non_bearer_header_is_401_missing_api_key(table, header):
    with pytest.raises(Unauthorized) as raised:
        table.authenticate(header)
    assert raised.value.status == 401 and raised.value.code == "missing_api_key"
    assert raised.value.type == "invalid_request_error"
    assert ALICE_KEY not in error_text(raised.value)


@pytest.mark.parametrize("key", ["sk-wrong", ALICE_KEY + "x", ALICE_KEY[:-1], ALICE_KEY.upper(), "Bearer " + ALICE_KEY])
def test_unknown_key_is_401_invalid_api_key_without_echoing_it(table, key):
    with pytest.raises(Unauthorized) as raised:
        table.authenticate("Bearer " + key)
    assert raised.value.status == 401 and raised.value.code == "invalid_api_key"
    assert key not in error_text(raised.value) and ALICE_KEY not in error_text(raised.value)


@pytest.mark.parametrize(
    "header",
    ["Bearer " + ALICE_KEY, "bearer " + ALICE_KEY, "BEARER " + ALICE_KEY, "bEaReR " + ALICE_KEY, "Bearer   " + ALICE_KEY + "  "],
)
def test_bearer_key_finds_its_caller_whatever_the_scheme_case(table, header):
    caller = table.authenticate(header)
    assert caller == Caller(name="alice", priority="high", models=frozenset({"public-chat"}), rate_limited=True)


def test_each_key_finds_its_own_caller(table):
    bob = table.authenticate("Bearer " + BOB_KEY)
    assert bob.name == "bob" and bob.priority == "normal"
    assert bob.models is None and not bob.rate_limited
    assert all(bob.may_use(model) for model in SERVED)


@pytest.mark.parametrize(
    ("limits", "rate_limited"),
    [
        ({}, False),
        ({"requests_per_minute": 5}, True),
        ({"tokens_per_minute": 500}, True),
        ({"max_concurrent_requests": 2}, True),
    ],
)
def test_caller_is_rate_limited_only_with_a_limit(limits, rate_limited):
    table = KeyTable(load({"enabled": True, "keys": [entry("k", ALICE_KEY, **limits)]}).auth)
    assert table.authenticate("Bearer " + ALICE_KEY).rate_limited is rate_limited


# Authorization


def test_unserved_model_is_404_listing_only_the_models_this_key_may_use(table):
    alice = table.authenticate("Bearer " + ALICE_KEY)
    with pytest.raises(ModelNotFound) as raised:
        KeyTable.authorize(alice, "gpt-4", SERVED)
    error = raised.value
    assert error.status == 404 and error.code == "model_not_found" and error.param == "model"
    assert "gpt-4" in error.message and "['public-chat']" in error.message
    assert "secret-model-x" not in error_text(error) and "internal-embed" not in error_text(error)
    assert ALICE_KEY not in error_text(error)


def test_unserved_model_404_lists_every_model_for_an_unrestricted_key(table):
    bob = table.authenticate("Bearer " + BOB_KEY)
    with pytest.raises(ModelNotFound) as raised:
        KeyTable.authorize(bob, "gpt-4", iter(SERVED))
    assert str(sorted(SERVED)) in raised.value.message


def test_served_model_the_key_may_not_use_is_403(table):
    alice = table.authenticate("Bearer " + ALICE_KEY)
    with pytest.raises(Forbidden) as raised:
        KeyTable.authorize(alice, "secret-model-x", SERVED)
    error = raised.value
    assert error.status == 403 and error.code == "model_not_allowed" and error.param == "model"
    assert "secret-model-x" in error.message
    assert ALICE_KEY not in error_text(error) and key_hash(ALICE_KEY) not in error_text(error)


def test_allowed_model_passes(table):
    alice = table.authenticate("Bearer " + ALICE_KEY)
    assert KeyTable.authorize(alice, "public-chat", SERVED) is None
    for model in SERVED:
        KeyTable.authorize(ANONYMOUS, model, SERVED)


# Config


def test_enabled_auth_without_keys_is_a_config_error():
    with pytest.raises(ConfigError, match="auth is enabled but no keys are configured"):
        load({"enabled": True})
    assert load({"enabled": False}).auth.keys == []


def test_duplicate_key_names_are_a_config_error():
    with pytest.raises(ConfigError, match=r"Duplicate key names \['alice'\]"):
        load({"enabled": True, "keys": [entry("alice", ALICE_KEY), entry("alice", BOB_KEY)]})


def test_duplicate_key_hashes_are_a_config_error_that_shows_only_a_prefix():
    digest = key_hash(ALICE_KEY)
    with pytest.raises(ConfigError) as raised:
        load({"enabled": True, "keys": [entry("alice", ALICE_KEY), entry("bob", ALICE_KEY)]})
    message = str(raised.value)
    assert "Duplicate key sha256s" in message and digest[:8] + "..." in message
    assert digest not in message


def test_key_naming_an_unserved_model_is_a_warning_and_the_key_keeps_the_models_served(caplog):
    # Serve deletes a model's application left out of the file even when the settings are
    # refused: a key still naming it must not hold the rest of the edit back.
    config = load({"enabled": True, "keys": [entry("alice", ALICE_KEY, models=["public-chat", "nope"])]})
    assert "Key 'alice' names models that are not served: ['nope']" in caplog.text
    caller = KeyTable(config.auth).authenticate("Bearer " + ALICE_KEY)
    assert caller.may_use("public-chat")


@pytest.mark.parametrize(
    "sha256",
    ["abc", "a" * 63, "a" * 65, "A" * 64, "g" * 64, key_hash(ALICE_KEY) + " ", ALICE_KEY],
)
def test_bad_sha256_is_rejected(sha256):
    with pytest.raises(ConfigError) as raised:
        load({"enabled": True, "keys": [{"name": "alice", "sha256": sha256}]})
    assert "auth.keys.0.sha256" in str(raised.value)


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "x" * 65])
def test_bad_key_name_is_rejected(name):
    with pytest.raises(ConfigError, match=r"auth\.keys\.0\.name"):
        load({"enabled": True, "keys": [{"name": name, "sha256": key_hash(ALICE_KEY)}]})


def test_unknown_key_field_is_rejected():
    with pytest.raises(ConfigError, match=r"auth\.keys\.0\.requests_per_second"):
        load({"enabled": True, "keys": [entry("alice", ALICE_KEY, requests_per_second=3)]})


def test_keys_file_adds_keys(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([entry("bob", BOB_KEY, priority="low", models=["internal-embed"])]))
    settings = load({"enabled": True, "keys": [entry("alice", ALICE_KEY)], "keys_file": str(keys_file)}).auth
    assert [key.name for key in settings.keys] == ["alice", "bob"]
    table = KeyTable(settings)
    bob = table.authenticate("Bearer " + BOB_KEY)
    assert bob.name == "bob" and bob.priority == "low" and bob.models == frozenset({"internal-embed"})
    assert table.authenticate("Bearer " + ALICE_KEY).name == "alice"


def test_keys_file_alone_satisfies_enabled_auth(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([entry("bob", BOB_KEY)]))
    settings = load({"enabled": True, "keys_file": str(keys_file)}).auth
    assert KeyTable(settings).authenticate("Bearer " + BOB_KEY).name == "bob"


def test_keys_file_entries_are_checked_like_inline_keys(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([entry("alice", BOB_KEY), entry("carol", "k", models=["nope"])]))
    with pytest.raises(ConfigError, match=r"Duplicate key names \['alice'\]"):
        load({"enabled": True, "keys": [entry("alice", ALICE_KEY)], "keys_file": str(keys_file)})
    keys_file.write_text(yaml.safe_dump([{"name": "carol", "sha256": "not-a-hash"}]))
    with pytest.raises(ConfigError, match="keys.0.sha256"):
        load({"enabled": True, "keys_file": str(keys_file)})


def test_keys_file_that_is_not_a_list_or_missing_is_a_config_error(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"name": "bob", "sha256": key_hash(BOB_KEY)}))
    with pytest.raises(ConfigError, match="must hold a YAML list of keys"):
        load({"enabled": True, "keys_file": str(keys_file)})
    with pytest.raises(ConfigError, match="cannot read keys_file"):
        load({"enabled": True, "keys_file": str(tmp_path / "missing.yaml")})


# Making keys


def test_new_key_entry_makes_distinct_keys_whose_entries_validate():
    key, entry_fields = new_key_entry("carol")
    other, _ = new_key_entry("carol")
    assert key.startswith("sk-") and len(key) > 40 and key != other
    assert entry_fields == {"name": "carol", "sha256": key_hash(key)}
    api_key = ApiKey(**entry_fields)
    table = KeyTable(AuthSettings(enabled=True, keys=[api_key]))
    assert table.authenticate("Bearer " + key).name == "carol"


def test_key_hash_is_lowercase_hex_sha256():
    assert key_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cli_new_prints_a_key_matching_its_config_entry():
    result = subprocess.run(
        [PYTHON, "-m", "apps.edge.auth", "new", "dave"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    key = re.search(r"^key \(give it to dave.*\): (\S+)$", result.stdout, re.MULTILINE).group(1)
    printed = yaml.safe_load(result.stdout.split("config entry (under auth.keys):", 1)[1])
    assert printed == [{"name": "dave", "sha256": key_hash(key)}]
    table = KeyTable(load({"enabled": True, "keys": printed}).auth)
    assert table.authenticate("Bearer " + key).name == "dave"


def test_cli_without_new_name_prints_usage_and_fails():
    result = subprocess.run(
        [PYTHON, "-m", "apps.edge.auth", "old"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "python -m apps.edge.auth new NAME" in result.stderr


def test_an_x_api_key_header_authenticates_as_anthropics_clients_send_it(table):
    bearer = table.authenticate(f"Bearer {ALICE_KEY}")
    assert table.authenticate(None, ALICE_KEY) == bearer
    assert table.authenticate(f"Bearer {ALICE_KEY}", "sk-something-else") == bearer, "Authorization wins"
    with pytest.raises(Unauthorized):
        table.authenticate(None, "sk-wrong")
