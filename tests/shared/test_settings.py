"""Settings read from the environment: the secured connections and what is never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from shared.settings import Settings, _temporal_tls


def test_secrets_stay_out_of_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("OPENAI_API_KEY", "sk-1"), ("AGENTRUN_RUN_ID_SECRET", "s-2"), ("TEMPORAL_API_KEY", "t-3")]:
        monkeypatch.setenv(name, value)

    settings = Settings.from_env()

    assert (settings.openai_api_key, settings.run_id_secret, settings.temporal_api_key) == ("sk-1", "s-2", "t-3")
    assert not {"sk-1", "s-2", "t-3"} & set(repr(settings).replace("'", " ").replace(",", " ").split())


def test_temporal_tls_follows_temporals_own_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TEMPORAL_API_KEY", "TEMPORAL_TLS", "TEMPORAL_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TEMPORAL_TLS_SERVER_CA_CERT_PATH", "TEMPORAL_TLS_CLIENT_CERT_PATH", "TEMPORAL_TLS_CLIENT_KEY_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert _temporal_tls(Settings.from_env()) is False
    monkeypatch.setenv("TEMPORAL_API_KEY", "key")
    assert _temporal_tls(Settings.from_env()) is True  # an API key (Temporal Cloud) goes over TLS

    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    monkeypatch.setenv("TEMPORAL_TLS_SERVER_CA_CERT_PATH", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("TEMPORAL_TLS_CLIENT_KEY_PATH", str(tmp_path / "key.pem"))
    monkeypatch.setenv("TEMPORAL_TLS_SERVER_NAME", "ns.tmprl.cloud")

    assert _temporal_tls(Settings.from_env()) == TLSConfig(
        server_root_ca_cert=b"CA", client_cert=b"CERT", client_private_key=b"KEY", domain="ns.tmprl.cloud"
    )
