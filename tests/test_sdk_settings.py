"""Tests of settings: sources and their precedence, validation errors, masked secrets."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk import SettingsError, settings
from sdk.settings import SettingsModel, mask_url

DEFAULTS = {
    "broker_url": "amqp://guest:guest@localhost:5672/",
    "exchange": "mrq",
    "service_name": None,
    "service_key": None,
    "host_service": None,
    "instance": 0,
    "cluster_key": None,
    "prefetch": 32,
    "concurrency": 32,
    "queue_type": "classic",
    "retries": 3,
    "retry_delay_s": 1.0,
    "retry_delay_max_s": 300.0,
    "max_redeliveries": 5,
    "stop_timeout_s": 10.0,
    "publish_timeout_s": 30.0,
    "connect_timeout_s": 10.0,
    "rpc_timeout_s": 30.0,
    "handler_timeout_s": None,
    "max_message_bytes": 128 * 1024 * 1024,
    "heartbeat_interval_s": 1.0,
    "heartbeat_misses": 3,
    "command_max_age_s": 30.0,
    "log_level": "info",
    "log_format": "text",
}


@pytest.fixture
def settings_module(tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A settings module on sys.path, named by SETTINGS_MODULE; the test writes its content."""
    name = f"mrqsettings{unique}"
    path = tmp_path / f"{name}.py"
    path.write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SETTINGS_MODULE", name)
    yield path
    sys.modules.pop(name, None)


def test_defaults() -> None:
    resolved = settings.resolve()
    values = resolved.model_dump(exclude={"node"})

    assert values == DEFAULTS
    assert resolved.node


def test_settings_module_aliases(settings_module: Path) -> None:
    settings_module.write_text(
        "HOST_RABBITMQ = 'amqp://mod:modpw@127.0.0.1:5672/modvhost'\n"
        "EXCHANGE = 'modex'\n"
        "SERVICE_NAME = 'modsvc'\n"
        "SERVICE_KEY = 'mod-service-key'\n"
        "HOST_SERVICE = 'modhost'\n"
        "PREFETCH = 7\n"
        "DEBUG = True\n"
        "retries = 99\n"
    )

    resolved = settings.resolve()

    assert resolved.broker_url == "amqp://mod:modpw@127.0.0.1:5672/modvhost"
    assert resolved.exchange == "modex"
    assert resolved.service_name == "modsvc"
    assert resolved.service_key is not None
    assert resolved.service_key.get_secret_value() == "mod-service-key"
    assert resolved.host_service == "modhost"
    assert resolved.prefetch == 7
    assert resolved.retries == DEFAULTS["retries"]


def test_bare_host_gets_guest_url(settings_module: Path) -> None:
    settings_module.write_text("HOST_RABBITMQ = '127.0.0.1'\n")

    assert settings.resolve().broker_url == "amqp://guest:guest@127.0.0.1:5672/"


def test_precedence_code_env_module_default(settings_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_module.write_text("EXCHANGE = 'from-module'\nPREFETCH = 7\nRETRIES = 9\n")
    monkeypatch.setenv("MRQ_EXCHANGE", "from-env")
    monkeypatch.setenv("MRQ_PREFETCH", "8")
    settings.exchange = "from-code"

    resolved = settings.resolve()

    assert resolved.exchange == "from-code"
    assert resolved.prefetch == 8
    assert resolved.retries == 9
    assert resolved.concurrency == DEFAULTS["concurrency"]


def test_resolve_overrides_beat_assignments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_RETRIES", "4")
    settings.retries = 5

    assert settings.resolve(retries=6).retries == 6
    assert settings.resolve().retries == 5


def test_env_values_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_RETRY_DELAY_S", "0.25")
    monkeypatch.setenv("MRQ_QUEUE_TYPE", "quorum")
    monkeypatch.setenv("MRQ_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MRQ_SERVICE_NAME", "billing")

    resolved = settings.resolve()

    assert resolved.retry_delay_s == 0.25
    assert resolved.queue_type == "quorum"
    assert resolved.log_level == "debug"
    assert resolved.service_name == "billing"


def test_broker_url_assignment() -> None:
    settings.broker_url = "amqp://app:apppw@127.0.0.1:5673/app"

    assert settings.broker_url == "amqp://app:apppw@127.0.0.1:5673/app"
    assert settings.resolve().broker_url == "amqp://app:apppw@127.0.0.1:5673/app"


def test_configure_sets_several_values() -> None:
    settings.configure(exchange="shop", prefetch=4)

    assert (settings.exchange, settings.prefetch) == ("shop", 4)


def test_reads_cached_until_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.exchange == "mrq"
    monkeypatch.setenv("MRQ_EXCHANGE", "later")

    before_reload = settings.exchange
    settings.reload()

    assert before_reload == "mrq"
    assert settings.exchange == "later"


def test_bad_env_value_names_setting_and_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_PREFETCH", "many")

    with pytest.raises(
        SettingsError,
        match=r"invalid setting prefetch from MRQ_PREFETCH='many': Input should be a valid integer",
    ):
        settings.resolve()


def test_bad_module_value_names_module_attribute(settings_module: Path) -> None:
    settings_module.write_text("PREFETCH = 0\n")
    module = settings_module.stem

    with pytest.raises(
        SettingsError,
        match=rf"invalid setting prefetch from {module}\.PREFETCH=0: Input should be greater than or equal",
    ):
        settings.resolve()


def test_bad_assignment_rejected_and_not_kept() -> None:
    with pytest.raises(
        SettingsError,
        match=r"invalid setting exchange from code='no spaces please': .*expected letters, digits and -",
    ):
        settings.exchange = "no spaces please"

    assert settings.exchange == "mrq"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5672/",
        "amqp://user:pw@127.0.0.1:99999/",
        "127.0.0.1:notaport",
        "amqp:///vhost",
    ],
)
def test_bad_broker_url_shows_expected_form(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_BROKER_URL", url)

    with pytest.raises(
        SettingsError,
        match=r"invalid setting broker_url from MRQ_BROKER_URL=.*expected an AMQP URL such as amqp://",
    ):
        settings.resolve()


def test_unknown_setting_in_code_rejected() -> None:
    with pytest.raises(SettingsError, match=r"unknown setting 'prefech'; known settings: .*prefetch"):
        settings.resolve(prefech=3)


def test_unknown_assignment_rejected() -> None:
    with pytest.raises(SettingsError, match=r"unknown setting 'brokr_url'"):
        settings.brokr_url = "amqp://127.0.0.1/"


def test_unimportable_settings_module(monkeypatch: pytest.MonkeyPatch, unique: str) -> None:
    monkeypatch.setenv("SETTINGS_MODULE", f"missing{unique}")

    with pytest.raises(SettingsError, match=rf"SETTINGS_MODULE='missing{unique}' could not be imported"):
        settings.resolve()


def test_secrets_absent_from_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_BROKER_URL", "amqp://app:url-secret@127.0.0.1:5672/v")
    monkeypatch.setenv("MRQ_CLUSTER_KEY", "cluster-secret")
    monkeypatch.setenv("MRQ_SERVICE_KEY", "service-secret")
    resolved = settings.resolve()

    reprs = [repr(settings), str(settings), repr(resolved), str(resolved), resolved.masked_broker_url()]

    for text in reprs:
        assert "url-secret" not in text
        assert "cluster-secret" not in text
        assert "service-secret" not in text
    assert "amqp://app:***@127.0.0.1:5672/v" in repr(settings)
    assert "amqp://app:***@127.0.0.1:5672/v" in repr(resolved)
    assert resolved.cluster_key_bytes() == b"cluster-secret"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://app:url-secret@127.0.0.1/",
        "amqp://app:url-secret@127.0.0.1:99999/",
        "app:url-secret@127.0.0.1",
    ],
)
def test_secrets_absent_from_errors(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_BROKER_URL", url)
    monkeypatch.setenv("MRQ_SERVICE_KEY", "service-secret")
    monkeypatch.setenv("MRQ_PREFETCH", "0")

    with pytest.raises(SettingsError, match=r"invalid setting broker_url") as caught:
        settings.resolve()

    assert "url-secret" not in str(caught.value)
    assert "url-secret" not in repr(settings)


def test_mask_url_keeps_host_and_port() -> None:
    assert mask_url("amqp://app:pw@127.0.0.1:5673/v") == "amqp://app:***@127.0.0.1:5673/v"
    assert mask_url("amqp://app:pw@[::1]:5672/") == "amqp://app:***@[::1]:5672/"
    assert mask_url("amqp://app@127.0.0.1/") == "amqp://app@127.0.0.1/"


def test_settings_model_is_frozen() -> None:
    resolved = settings.resolve()

    with pytest.raises(ValueError, match=r"frozen"):
        resolved.prefetch = 3  # type: ignore[misc]
    assert isinstance(resolved, SettingsModel)
