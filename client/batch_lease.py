"""The lease a batch runner holds on the batch it runs: one runner per batch, taken over at once when it died.

The lease is a string key (``Keys.batch_lease``) holding the holder as JSON (its name, host, pid
and a token), with a TTL that the holder renews every second or so. Another runner may take it:

* when it is free (never taken, released, or its TTL ran out);
* at once, when the holder was a runner of the same name (a restarted runner: names are unique
  among live runners, as ``dio up`` gives them), or a process on this host that no longer exists
  (a runner killed and started again under another name);
* with ``force``, whoever holds it (an operator who knows the holder is gone).

Otherwise ``BatchBusy`` names the holder and when its lease runs out. Every write a runner makes
to a batch's output goes through a script that checks the lease first (``batch_write.lua``), so a
runner that lost its lease (stalled past its TTL, forced out) cannot add a line after the new
holder read what was answered.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from dio.client.exceptions import DIOError
from dio.protocol.scripts import script_source

LEASE_TTL_MS = 10_000  # a runner that stops renewing (killed on another host) loses its batch after this long
RENEW_INTERVAL_S = 1.0  # a runner renews its leases this often (they outlive 9 missed renewals)


class BatchBusy(DIOError):
    """Another live runner holds this batch's lease."""


class LeaseLost(DIOError):
    """This runner's lease on a batch expired or was taken over: it must stop writing to the batch."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a lease."""

    runner: str
    host: str
    pid: int
    token: str

    @classmethod
    def me(cls, runner: str) -> Holder:
        return cls(runner, socket.gethostname(), os.getpid(), uuid.uuid4().hex)

    def to_json(self) -> str:
        return json.dumps({"runner": self.runner, "host": self.host, "pid": self.pid, "token": self.token})

    @classmethod
    def parse(cls, raw: str | None) -> Holder | None:
        try:
            data = json.loads(raw or "")
            return cls(str(data["runner"]), str(data["host"]), int(data["pid"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            return None  # not a holder's JSON (written by hand): anyone may take it over

    def describe(self) -> str:
        return f"runner {self.runner!r} (pid {self.pid} on {self.host})"


def process_exists(pid: int) -> bool:
    """Tell whether a process of this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def dead_or_restarted(holder: Holder, me: Holder) -> bool:
    """Tell whether ``holder`` is known to be gone: ``me`` restarted under its name, or its process is gone."""
    if holder.runner == me.runner and holder.token != me.token:
        return True
    return holder.host == me.host and holder.pid != me.pid and not process_exists(holder.pid)


class BatchLease:
    """One runner's leases (acquire, renew, release), all under one holder identity."""

    def __init__(self, conn: redis.Redis, holder: Holder, ttl_ms: int = LEASE_TTL_MS) -> None:
        self.redis = conn
        self.holder = holder
        self.value = holder.to_json()
        self.ttl_ms = ttl_ms
        self._take = conn.register_script(script_source("batch_lease"))

    def acquire(self, key: str, *, force: bool = False) -> Holder | None:
        """Take the lease at ``key``; return the holder taken over from (None: it was free).

        Raises BatchBusy when a live runner holds it (unless ``force``).
        """
        if self.redis.set(key, self.value, nx=True, px=self.ttl_ms):
            return None
        raw = self.redis.get(key)
        holder = Holder.parse(raw)
        if raw == self.value:
            return None
        if not force and holder is not None and not dead_or_restarted(holder, self.holder):
            ttl = self.redis.pttl(key)
            left = f"{ttl / 1000:.0f} s" if ttl and ttl > 0 else "moments"
            raise BatchBusy(f"held by {holder.describe()}, whose lease runs out in {left} unless it renews it; "
                            "if that runner is gone, take the batch over with --force")
        if raw is None:
            return self.acquire(key, force=force)  # it expired meanwhile
        if not self._take(keys=[key], args=["take", raw, self.value, self.ttl_ms]):
            raise BatchBusy("another runner took it over at the same moment")
        return holder

    def renew(self, key: str) -> bool:
        """Extend the lease; False when it is no longer ours (lost)."""
        return bool(self._take(keys=[key], args=["renew", self.value, self.value, self.ttl_ms]))

    def release(self, key: str) -> None:
        """Give the lease up, if still ours."""
        self._take(keys=[key], args=["release", self.value, "", 0])

    def held_by(self, key: str) -> Holder | None:
        return Holder.parse(self.redis.get(key))


def describe_holder(raw: Any) -> str | None:
    """A lease value in words (None when free or unreadable)."""
    holder = Holder.parse(raw) if isinstance(raw, str) else None
    return holder.describe() if holder is not None else None
