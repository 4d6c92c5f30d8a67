"""Credentials the tests make: a token issuer with its JWKS file, and a certificate authority for mutual TLS."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALL_RIGHTS = "runs:start runs:read runs:cancel approvals:decide"
ISSUER = "https://issuer.test"
AUDIENCE = "agentrun-test"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Issuer:
    """Signs tokens with an EC P-256 key whose public half is in ``jwks_file``."""

    jwks_file: Path
    key: ec.EllipticCurvePrivateKey = field(default_factory=_new_key)
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        public.update(kid=self.kid, use="sig", alg="ES256")
        self.jwks_file.write_text(json.dumps({"keys": [public]}))

    def token(
        self,
        subject: str = "ada",
        tenant: str | None = "acme",
        scope: str = ALL_RIGHTS,
        *,
        expires_in: float = 600,
        audience: str = AUDIENCE,
        issuer: str = ISSUER,
        key: ec.EllipticCurvePrivateKey | None = None,
        **claims: Any,
    ) -> str:
        """A token; ``key`` signs it with another key under this issuer's key id (a bad signature)."""
        now = int(time.time())
        payload: dict[str, Any] = {"sub": subject, "iss": issuer, "aud": audience, "iat": now, "exp": now + expires_in}
        if tenant is not None:
            payload["tenant"] = tenant
        if scope:
            payload["scope"] = scope
        payload.update(claims)
        return jwt.encode(payload, key or self.key, algorithm="ES256", headers={"kid": self.kid})


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, private = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private, serialization.NoEncryption())


@dataclass
class Issued:
    """A certificate and its key, as PEM files."""

    cert_file: Path
    key_file: Path


class CertificateAuthority:
    """A CA that signs the server's certificate (for localhost) and clients' certificates."""

    def __init__(self, directory: Path, name: str = "agentrun test CA") -> None:
        self.directory = directory
        self.key = _new_key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = self._sign(self.name, self.key.public_key(), ca=True)
        self.cert_file = directory / f"{uuid.uuid4().hex[:8]}-ca.pem"
        self.cert_file.write_bytes(_pem(self.certificate))

    def _sign(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *, ca: bool = False, dns: str | None = None
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if dns:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, common_name: str, organization: str | None = None, *, dns: str | None = None) -> Issued:
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        key = _new_key()
        certificate = self._sign(x509.Name(attributes), key.public_key(), dns=dns)
        stem = self.directory / f"{common_name}-{uuid.uuid4().hex[:8]}"
        issued = Issued(stem.with_suffix(".pem"), stem.with_suffix(".key"))
        issued.cert_file.write_bytes(_pem(certificate))
        issued.key_file.write_bytes(_key_pem(key))
        return issued
