"""JobHandle: a submitted job, to wait for, inspect or cancel."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

from dio.client.jobs import outcome
from dio.client.stream import TokenStream
from dio.protocol.models import JobResult, JobStatus, Request

if TYPE_CHECKING:
    from dio.client.client import Client


class JobHandle:
    """One submitted job of a Client.

    Its future is resolved by the client's reply reader when the job's notice arrives, or by
    polling the job hash when a notice never comes.
    """

    def __init__(self, client: Client, request: Request, future: Future) -> None:
        self.request = request
        self.future = future
        self._client = client

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def client(self) -> Client:
        """The client that submitted the job (sharded by model: the client of its pool)."""
        return self._client

    def __repr__(self) -> str:
        state = "done" if self.future.done() else "pending"
        return f"<JobHandle {self.id} {state}>"

    def result(self, timeout: float | None = None, *, raise_on_error: bool = True) -> JobResult:
        """Wait for the job's terminal state and return it.

        Args:
            timeout: seconds to wait; None uses the client's ``result_timeout_s``.
            raise_on_error: raise JobRejected, JobFailed or JobCancelled for those outcomes;
                when False, return every terminal JobResult as it is.

        Raises ResultTimeout when the job is still running after ``timeout`` (it keeps running),
        and JobNotFound when its hash is gone.
        """
        return outcome(self._client._wait(self, timeout), raise_on_error)

    def stream(self, timeout: float | None = None) -> TokenStream:
        """Return the job's answer as it is generated: iterate it for ``StreamEvent``s.

        The last event carries the job's result (whatever its status). A job submitted without
        ``stream=True`` yields that one event only. ``timeout``: as for ``result``. See
        ``dio.client.stream`` for restarts (``event.restarted``) and time to first token.
        """
        return TokenStream(self, timeout)

    def status(self) -> JobStatus | None:
        """Return the job's current status (None when its hash is gone)."""
        if self.future.done() and self.future.exception() is None:
            return self.future.result().status
        return self._client.status(self.id)

    def done(self) -> bool:
        """Tell whether the job has reached a terminal state (does not wait)."""
        if self.future.done():
            return True
        status = self._client.status(self.id)
        return status is not None and status.terminal

    def cancel(self) -> bool:
        """Cancel the job unless it already ended; return True when this call cancelled it.

        A stream of the job ends at once, its last event holding the cancelled result.
        """
        return self._client.cancel(self.id)
