"""A client's identity kept between runs of it: its claim secret and its credential.

The file (mode 0600) lets a restarted client, or one retrying a registration
whose answer was lost, take its client id back; nobody else can.
"""

from __future__ import annotations


def load_identity(path: str | None, client_id: str) -> dict[str, str]:
    """This client's kept identity: ``claim`` (a secret made before its first registration,
    so a retried registration is known as its own) and ``credential`` once it has one."""
    import json
    import secrets
    from pathlib import Path

    saved: object = None
    if path is not None:
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
    if isinstance(saved, dict) and saved.get("client_id") == client_id and isinstance(
            saved.get("claim"), str):
        return {k: v for k, v in saved.items() if isinstance(v, str)}
    identity = {"client_id": client_id, "claim": secrets.token_urlsafe(32)}
    save_identity(path, identity)
    return identity


def save_identity(path: str | None, identity: dict[str, str]) -> None:
    """Keep the identity (mode 0600) so a restarted client takes it back."""
    import json
    import os
    from pathlib import Path

    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(identity, fh)
    os.replace(tmp, target)


def default_credential_file(server: str, client_id: str) -> str:
    """``$FEDLEARN_HOME/credentials/<server>-<client>.json`` (default home ``~/.fedlearn``)."""
    import hashlib
    import os
    from pathlib import Path

    home = Path(os.environ.get("FEDLEARN_HOME") or Path.home() / ".fedlearn")
    key = hashlib.blake2b(f"{server}\x1f{client_id}".encode(), digest_size=8).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id)[:64]
    return str(home / "credentials" / f"{safe}-{key}.json")
