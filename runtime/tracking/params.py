"""A run's config as tracker parameters: flattened to dotted keys, secrets redacted.

    flat_params({"storage": {"url": "s3://b/p", "options": {"secret": "x"}}})
    -> {"storage.url": "s3://b/p", "storage.options.secret": "<redacted>"}

Redacted: every value under a key that names a secret (key, secret, token, password,
credential, auth, or storage options), and the user:password@ part of any URL. The tracking
section itself is left out (it says where the parameters go, not what the run is; a back-fill
into another tracker must not change a parameter MLflow already holds).
"""

from __future__ import annotations

import json
import re

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(
    r"(^|[._-])(api_?key|access_?key|secret|token|password|passwd|credentials?|auth|"
    r"storage_options|private_?key|key)($|[._-])",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")
MAX_VALUE_CHARS = 500  # MLflow allows 6,000; a param is something to read, not a document


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    return _URL_USERINFO.sub(r"\1" + REDACTED + "@", text)


def flat_params(config: dict, *, skip: tuple[str, ...] = ("tracking",)) -> dict[str, str]:
    """`config` (run.json) as {dotted key: string value}, secrets redacted (see the module)."""
    out: dict[str, str] = {}

    def walk(value, path: str, secret: bool) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                key = f"{path}.{k}" if path else str(k)
                if key in skip:
                    continue
                walk(v, key, secret or is_secret_key(str(k)))
            return
        if secret and value not in (None, "", {}, []):
            out[path] = REDACTED
            return
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        text = redact_text(text)
        out[path] = text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."

    walk(config, "", False)
    return out
