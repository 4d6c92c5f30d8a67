"""The dev stack's authentication: a key made for this start only, its JWKS, and a token for this user's CLI.

``agentrun dev`` runs its server with authentication on, as production does, so that rights and tenants are
exercised on a laptop too. The key lives only in memory; its public half goes to a JWKS file the server reads,
and one token, for the user who started the stack, goes beside it (readable by that user alone), where the CLI
looks for it when it talks to this address. Every start makes a new key, which ends the last start's token.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from agentrun.cli import default_approver, dev_directory

ISSUER = "agentrun-dev"
AUDIENCE = "agentrun"
TENANT = "dev"
RIGHTS = "runs:start runs:read runs:cancel approvals:decide"
# Long enough for any dev session; the next start's key ends it anyway.
TOKEN_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class DevCredentials:
    """What the dev server is told to trust, and the token the dev stack and the CLI call it with."""

    directory: Path
    jwks_file: Path
    token: str
    subject: str
    run_id_secret: str


def make(server: str) -> DevCredentials:
    """A new EC P-256 key, its JWKS file and a token with every right for this user, in the folder of ``server``."""
    directory = dev_directory(server)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    kid = secrets.token_hex(4)
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid=kid, use="sig", alg="ES256")
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [public]}))
    subject = default_approver()
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "tenant": TENANT,
        "scope": RIGHTS,
        "iat": now,
        "exp": now + TOKEN_SECONDS,
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    token_file = directory / "token"
    # Readable by this user alone, from its first byte on.
    descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    os.chmod(token_file, 0o600)  # a file left by an older start keeps its mode otherwise
    return DevCredentials(directory, jwks_file, token, subject, secrets.token_hex(32))


def forget(credentials: DevCredentials) -> None:
    """Removes the token when the stack stops: nothing accepts it any more."""
    (credentials.directory / "token").unlink(missing_ok=True)
