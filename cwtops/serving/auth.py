"""The key that guards Triton's model-repository API (load, unload, index), shared by the server
that checks it and every client that sends it."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from cwtops.core.errors import CwtopsError
from cwtops.services.processes import state_dir

API_KEY_ENV = "CWTOPS_TRITON_API_KEY"
API_KEY_HEADER = "cwtops-api-key"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")  # no ':', ',' or '=': Triton's flag syntax splits on them


def key_file() -> Path:
    return state_dir() / "triton" / "api-key"


def api_key(create: bool = False) -> str | None:
    """The model-repository API key: the environment's, else this state directory's key file
    (written with a random key, mode 0600, when `create` and absent); checked, never echoed."""
    key = os.environ.get(API_KEY_ENV)
    if not key:
        path = key_file()
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(32) + "\n")
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            return None
        if not _KEY_PATTERN.match(key):
            raise CwtopsError(f"{path}: not a valid API key; delete it and restart Triton (`cwtops triton stop`, `cwtops triton start`)")
        return key
    if not _KEY_PATTERN.match(key):
        raise CwtopsError(f"{API_KEY_ENV} must be 16-256 characters from A-Z a-z 0-9 . _ ~ + / - (Triton's flag syntax splits on ':', ',' and '=')")
    return key


def admin_headers() -> dict[str, str] | None:
    """The header Triton's restricted model-repository API asks for, when a key is configured."""
    key = api_key()
    return {API_KEY_HEADER: key} if key else None
