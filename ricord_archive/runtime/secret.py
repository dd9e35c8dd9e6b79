"""The secret key behind every keyed hash: from the configuration, or generated once on disk.

It is never stored in PostgreSQL: with the index alone, no pseudonym can be linked back.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ricord_archive.config import Config, ConfigError

KEY_FILE = "secret.key"


def load_secret(config: Config) -> bytes:
    if config.secret_key:
        secret = config.secret_key.encode("utf-8")
        if len(secret) < 16:
            raise ConfigError("the secret key must be at least 16 characters")
        return secret
    path = Path(config.data_dir) / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise ConfigError(f"{path} is not a hexadecimal key") from exc
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return bytes.fromhex(key)
