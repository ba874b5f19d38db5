"""Tenants files for tests: each tenant given by its plain key, written as the sha256 digest the file holds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenants_file(folder: Path, **tenants: dict) -> Path:
    """`tenants.json` in `folder`; each tenant's `key` becomes its one digest, its other fields are kept."""
    path = folder / "tenants.json"
    path.write_text(json.dumps({"tenants": {
        name: {"keys_sha256": [digest(fields["key"])], **{k: v for k, v in fields.items() if k != "key"}}
        for name, fields in tenants.items()}}))
    return path
