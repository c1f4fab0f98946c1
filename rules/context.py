"""What morphing needs besides the dataset, and how morphing fails.

The secret is read once, when a worker starts (settings are built once and
passed in), never looked up again per instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rules.models import DeidSettings

MIN_SECRET_BYTES = 16


class MorphError(Exception):
    """A morph that cannot be done for this instance or this configuration (permanent, not retried)."""


class SecretMissing(MorphError):
    """An operation needs the de-identification secret and none is configured."""


@dataclass(frozen=True)
class MorphContext:
    """What morphing needs besides the dataset: the secret that keys pseudonyms."""

    secret: bytes | None = None

    @classmethod
    def from_settings(cls, deid: DeidSettings | None, environ: dict[str, str] | None = None) -> MorphContext:
        """Read the secret from ``deid.secret_file`` or else the environment variable.

        Raises:
            SecretMissing: the file is set but unreadable, or the secret is too short.
        """
        deid = deid or DeidSettings()
        environ = os.environ if environ is None else environ
        secret: bytes | None = None
        if deid.secret_file is not None:
            try:
                secret = Path(deid.secret_file).read_bytes().strip()
            except OSError as exc:
                raise SecretMissing(f"deid.secret_file {deid.secret_file}: {exc.strerror or exc}") from None
        elif environ.get(deid.secret_env):
            secret = environ[deid.secret_env].strip().encode()
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise SecretMissing(f"the de-identification secret has {len(secret)} bytes; use at least {MIN_SECRET_BYTES}")
        return cls(secret)

    @classmethod
    def from_config(cls, config: object) -> MorphContext:
        """From a ``router.kernel.settings.Config`` (its ``deid`` section, when it has one)."""
        return cls.from_settings(getattr(config, "deid", None))

    def require_secret(self, operation: str) -> bytes:
        if not self.secret:
            raise SecretMissing(
                f"{operation} needs a secret: set ${DeidSettings().secret_env} or deid.secret_file in the config"
            )
        return self.secret
