"""Registered clients and their credentials, shared by the sync and async coordinators.

Only SHA-256 hashes of credentials are kept (in memory and in the store), so a
resumed server still knows every client that registered before the restart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from fedlearn.errors import AuthError, ConflictError, PayloadError
from fedlearn.server.store import Store, hash_secret
from fedlearn.weights import Spec, spec_difference


def check_identity(
    spec: Spec, task_name: str, identity: Spec | None, client_task: str | None
) -> None:
    """Refuse a client whose task is not the server's, naming the first difference."""
    if client_task is not None and task_name and client_task != task_name:
        raise ConflictError(f"this server runs task {task_name!r} but the client has task "
                            f"{client_task!r}; start the client with the server's task.")
    if identity is None:
        return
    diff = spec_difference(spec, identity)
    if diff is not None:
        raise ConflictError(f"the client's task differs from the server's: {diff}; start the "
                            "client with the server's task.")


@dataclass
class ClientRecord:
    """A registered client as a coordinator tracks it."""

    client_id: str
    credential_hash: str
    num_examples: int | None = None
    online: bool = False  # seen since this server process started
    last_seen: float = 0.0
    dropped: bool = False  # sync: missed a round deadline and not seen since
    num_test_examples: int | None = None  # local test examples (federated evaluation)
    registered_at: float = 0.0  # this process's clock at the last (re-)registration


class ClientRegistry:
    """Client id -> record, and credential hash -> client id (not thread-safe: callers lock)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._clients: dict[str, ClientRecord] = {}
        self._by_credential: dict[str, str] = {}
        self._claims: dict[str, str] = dict(store.get_meta("claims", {}) or {})
        for row in store.clients():
            self._add(ClientRecord(row.client_id, row.credential_hash, row.num_examples))

    def _add(self, client: ClientRecord) -> None:
        old = self._clients.get(client.client_id)
        if old is not None:
            self._by_credential.pop(old.credential_hash, None)
        self._clients[client.client_id] = client
        self._by_credential[client.credential_hash] = client.client_id

    @staticmethod
    def new_credential(client_id: str) -> tuple[str, str]:
        """Check ``client_id`` and make a fresh credential: (credential, its hash)."""
        if not client_id or len(client_id) > 128 or not all(" " <= c <= "~" for c in client_id):
            raise PayloadError("client_id must be 1 to 128 printable ASCII characters.")
        credential = secrets.token_urlsafe(32)
        return credential, hash_secret(credential)

    def save(self, client_id: str, digest: str, num_examples: int | None) -> None:
        """Persist a (re-)registration; call before :meth:`add` and outside the lock."""
        self.store.upsert_client(client_id, digest, num_examples)

    def add(self, client_id: str, digest: str, num_examples: int | None, now: float, *,
            num_test_examples: int | None = None) -> None:
        """Record a (re-)registered client as online; an older credential stops working."""
        self._add(ClientRecord(client_id, digest, num_examples, online=True, last_seen=now,
                               num_test_examples=num_test_examples, registered_at=now))

    def check_claim(
        self, client_id: str, credential: str | None, max_clients: int,
        claim: str | None = None,
    ) -> None:
        """Refuse taking over a registered id, or a client too many.

        A registered id is taken back with its current ``credential``, or with the
        ``claim`` secret it registered with first (a client whose registration answer
        was lost retries with the same claim, kept in its credential file).
        """
        old = self._clients.get(client_id)
        if old is None:
            if len(self._clients) >= max_clients:
                raise ConflictError(f"this run already has its {max_clients} clients "
                                    "(--max-clients); no more can join.")
            return
        if credential is not None and hash_secret(credential) == old.credential_hash:
            return
        known = self._claims.get(client_id)
        if claim is not None and known is not None and hash_secret(claim) == known:
            return
        raise ConflictError(
            f"client id {client_id!r} is already registered; restart that client with "
            "its credential file, or use another --client-id.")

    def remember_claim(self, client_id: str, claim: str | None) -> None:
        """Keep (the hash of) the claim secret a client first registered with."""
        if claim is not None and client_id not in self._claims:
            self._claims[client_id] = hash_secret(claim)
            self.store.set_meta("claims", self._claims)

    def authenticate(self, credential: str) -> str:
        """The client id a credential belongs to; AuthError if none."""
        cid = self._by_credential.get(hash_secret(credential))
        if cid is None:
            raise AuthError(
                "unknown client credential; register again with the run's join token."
            )
        return cid

    def __getitem__(self, client_id: str) -> ClientRecord:
        return self._clients[client_id]

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[ClientRecord]:
        return iter(list(self._clients.values()))

    def ids(self) -> set[str]:
        """Ids of every registered client."""
        return set(self._clients)

    def online(self) -> set[str]:
        """Ids of the clients seen since this server process started."""
        return {c.client_id for c in self._clients.values() if c.online}
