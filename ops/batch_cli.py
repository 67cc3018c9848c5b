"""``dio batch ...`` and ``dio batch-runner``: the Batch API from a shell.

    dio batch submit requests.jsonl --wait      # progress bar; the batch id is stdout's last line
    dio batch status batch_...                  # status, counts, files
    dio batch list
    dio batch cancel batch_...
    dio batch results batch_... -o out.jsonl --errors errors.jsonl
    dio batch run requests.jsonl -o out.jsonl   # run a file here, without a batch runner (resumable)
    dio batch-runner                            # the daemon that runs submitted batches (dio up starts one)

Operator mistakes (a file that is not a batch file, an unknown id) end with one ``error:`` line
and exit status 2; ``submit --wait`` exits 1 when the batch ended other than ``completed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

batch_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Batch jobs in OpenAI's Batch API format: submit, watch, cancel, fetch results.")

WAIT_POLL_S = 0.5  # submit --wait reads the batch this often


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    """A Client; a DIO error inside (Redis away past DIO_CLIENT_RETRY_S, a bad file) is one error line."""
    from dio.client import Client, DIOError

    try:
        with Client() as client:
            yield client
    except DIOError as exc:
        _fail(str(exc))


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--metadata takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out or None


@batch_app.command()
def submit(
    file: Path = typer.Argument(..., help="an OpenAI Batch API input file (JSONL)"),
    endpoint: str = typer.Option(None, help="/v1/completions | /v1/chat/completions (default: the first line's url)"),
    wait: bool = typer.Option(False, "--wait", help="show progress until the batch ends"),
    metadata: list[str] = typer.Option([], "--metadata", help="KEY=VALUE, repeatable"),
    timeout: float = typer.Option(None, help="with --wait: give up waiting after this many seconds"),
) -> None:
    """Upload a batch file and create a batch (a batch runner runs it); print its id last."""
    from dio.client import DIOError
    from dio.client.batches import create_batch, first_url, upload_file

    try:
        data = file.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}")
    with _client() as client:
        try:
            uploaded = upload_file(client, data, file.name)
            batch = create_batch(client, uploaded.id, endpoint or first_url(data), metadata=_metadata(metadata))
        except DIOError as exc:
            _fail(str(exc))
        typer.echo(f"{batch.id}: {batch.request_counts.total} requests to {batch.endpoint} ({batch.status.value})",
                   err=True)
        if wait:
            final = wait_with_progress(client, batch.id, timeout)
            typer.echo(summary(final), err=True)
            typer.echo(batch.id)
            if final.status.value != "completed":
                raise typer.Exit(1)
            return
    typer.echo(batch.id)


def wait_with_progress(client, batch_id: str, timeout: float | None):
    """Show a progress bar (done / total, rate, ETA) on stderr until the batch ends; return it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dio.client.batches import get_batch

    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (TextColumn("{task.fields[status]:<11}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        batch = get_batch(client, batch_id)
        task = bar.add_task("batch", total=batch.request_counts.total or None, status=batch.status.value,
                            rate="")
        start, first_done = time.monotonic(), None
        while not batch.status.terminal:
            if deadline is not None and time.monotonic() >= deadline:
                bar.stop()
                _fail(f"batch {batch_id} still {batch.status.value} after {timeout:g} s (it goes on; "
                      f"`dio batch status {batch_id}` shows it)")
            time.sleep(WAIT_POLL_S)
            batch = get_batch(client, batch_id) or batch
            done = batch.request_counts.completed + batch.request_counts.failed
            if done and first_done is None:
                first_done = (time.monotonic(), done)
            rate = _rate(first_done, done, start)
            bar.update(task, completed=done, total=batch.request_counts.total or None, status=batch.status.value,
                       rate=f"{rate:.1f} req/s" if rate else "")
    return batch


def _rate(first: tuple[float, int] | None, done: int, start: float) -> float | None:
    if first is None:
        return None
    elapsed = time.monotonic() - start
    return done / elapsed if elapsed > 0 else None


def summary(batch) -> str:
    counts = batch.request_counts
    return (f"{batch.id}: {batch.status.value}, {counts.completed} completed, {counts.failed} failed "
            f"of {counts.total}")


@batch_app.command()
def status(batch_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a batch: status, request counts, files, its runner."""
    from dio.client.batch_lease import describe_holder
    from dio.client.batches import get_batch

    with _client() as client:
        batch = get_batch(client, batch_id)
        if batch is None:
            _fail(f"no batch {batch_id!r}")
        holder = describe_holder(client.redis.get(client.base_keys.batch_lease(batch_id)))
    if as_json:
        typer.echo(json.dumps(batch.model_dump(mode="json")))
        return
    typer.echo(summary(batch))
    typer.echo(f"  endpoint {batch.endpoint}, input {batch.input_file_id}, created "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(batch.created_at))}")
    if batch.output_file_id or batch.error_file_id:
        typer.echo(f"  output {batch.output_file_id or '-'}, errors {batch.error_file_id or '-'}")
    if batch.errors and batch.errors.data:
        for error in batch.errors.data:
            typer.echo(f"  error {error.code}: {error.message}")
    if not batch.status.terminal:
        typer.echo(f"  runner: {holder or 'none yet (is a `dio batch-runner` running?)'}")


@batch_app.command("list")
def list_(limit: int = typer.Option(20, help="at most this many, newest first"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """List batches, newest first."""
    from dio.client.batches import list_batches

    with _client() as client:
        batches = list_batches(client, limit=limit)
    if as_json:
        typer.echo(json.dumps([b.model_dump(mode="json") for b in batches]))
        return
    for batch in batches:
        typer.echo(summary(batch))


@batch_app.command()
def cancel(batch_id: str = typer.Argument(...)) -> None:
    """Cancel a batch: its jobs in flight are cancelled; what was answered stays in its files."""
    from dio.client.batches import cancel_batch

    with _client() as client:
        batch = cancel_batch(client, batch_id)
    if batch is None:
        _fail(f"no batch {batch_id!r}")
    typer.echo(summary(batch))


@batch_app.command()
def results(
    batch_id: str = typer.Argument(...),
    output: Path = typer.Option(..., "-o", "--output", help="write the output file (responses) here"),
    errors: Path = typer.Option(None, "--errors", help="write the error file (requests that got no response) here"),
) -> None:
    """Write an ended batch's output file (and, with --errors, its error file)."""
    from dio.client.batches import file_content, get_batch

    with _client() as client:
        batch = get_batch(client, batch_id)
        if batch is None:
            _fail(f"no batch {batch_id!r}")
        if not batch.status.terminal:
            _fail(f"batch {batch_id} is {batch.status.value}: its results are ready when it ends "
                  f"(`dio batch submit --wait`, or `dio batch status {batch_id}`)")
        wrote = _write(client, file_content, batch.output_file_id, output)
        if errors is not None:
            wrote_errors = _write(client, file_content, batch.error_file_id, errors)
    typer.echo(f"{output}: {wrote} lines" + (f"; {errors}: {wrote_errors} lines" if errors is not None else ""),
               err=True)


def _write(client, file_content, file_id: str | None, path: Path) -> int:
    data = (file_content(client, file_id) if file_id else b"") or b""
    try:
        path.write_bytes(data)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    return data.count(b"\n")


@batch_app.command()
def run(
    file: Path = typer.Argument(..., help="an OpenAI Batch API input file (JSONL)"),
    output: Path = typer.Option(..., "-o", "--output", help="the output file (appended; a rerun resumes it)"),
    concurrency: int = typer.Option(256, help="requests in flight at once, at most"),
    min_in_flight: int = typer.Option(2, help="requests in flight while interactive work arrives"),
    greedy: bool = typer.Option(False, "--greedy", help="always keep --concurrency in flight"),
    rate_limit: float = typer.Option(None, help="requests submitted per second at most"),
    force: bool = typer.Option(False, "--force", help="take the batch over from the runner holding it"),
) -> None:
    """Run a batch file from here (no batch runner needed): responses and errors in one output file."""
    from dio.client import DIOError
    from dio.client.batch import run_batch

    if not file.is_file():
        _fail(f"no file {file}")
    with _client() as client:
        try:
            progress = run_batch(file, output, client, concurrency=concurrency, rate_limit=rate_limit, force=force,
                                 adaptive=not greedy, min_in_flight=min_in_flight)
        except DIOError as exc:
            _fail(str(exc))
    typer.echo(f"{progress.batch_id}: {progress.status}, {progress.done} answered, {progress.failed} errors "
               f"of {progress.total}", err=True)
    typer.echo(progress.batch_id)


def batch_runner(
    name: str = typer.Option(None, help="runner name, unique among live runners (default: batch-runner-<host>-<pid>); "
                                        "a runner restarted under its name takes its batches over at once"),
    max_batches: int = typer.Option(4, help="batches run at once"),
    concurrency: int = typer.Option(256, help="requests of one batch in flight at once, at most"),
    min_in_flight: int = typer.Option(2, help="requests of one batch in flight while interactive work arrives"),
    greedy: bool = typer.Option(False, "--greedy", help="always keep --concurrency in flight (batch work then "
                                                        "slows interactive work down)"),
    rate_limit: float = typer.Option(None, help="requests of one batch submitted per second at most"),
    force: bool = typer.Option(False, "--force", help="take over every batch held by another runner (only when "
                                                      "you know it is gone)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the batches submitted with `dio batch submit` or the gateway's /v1/batches."""
    from dio.client.settings import ClientSettings
    from dio.ops.batch_runner import BatchRunnerDaemon
    from dio.protocol.logs import setup_logging

    setup_logging("DEBUG" if verbose else None)
    daemon = BatchRunnerDaemon(ClientSettings(), name or f"batch-runner-{socket.gethostname()}-{os.getpid()}",
                               max_batches=max_batches, concurrency=concurrency, rate_limit=rate_limit, force=force,
                               adaptive=not greedy, min_in_flight=min_in_flight)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    daemon.run()
