"""The ``outreach`` command line: run the service, its parts, and the HR chores (validate, preview, import)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from outreach.core.clock import check_instant
from outreach.core.config import Settings, set_settings
from outreach.core.errors import CampaignError, ConfigurationError, OutreachError, ValidationError
from outreach.core.logs import configure_logging
from outreach.providers import SANDBOX_TWILIO_AUTH_TOKEN
from outreach.service.runtime import Runtime, set_runtime, start_clock

if TYPE_CHECKING:
    from outreach.ops.sandbox import SandboxServer
    from outreach.web.webhooks import WebhookSettings


class Refused(click.ClickException):
    """The command cannot do its job as things are set up: one line naming what to set or fix, exit code 2 (as for
    a usage error). Raised before anything is written whenever the problem can be known that early."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__("; ".join(line.strip() for line in message.splitlines() if line.strip()))


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except OutreachError as exc:
        raise Refused(str(exc)) from None
    set_settings(settings)
    start_clock(settings)
    configure_logging(settings.log_level)
    return settings


def _parse_when(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not ISO-8601, e.g. 2026-11-25T10:00:00+08:00", param_hint=field
        ) from None
    try:
        return check_instant(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} {exc}", param_hint=field) from None


def _check_campaigns(runtime: Runtime) -> None:
    from outreach.service.validation import validate_all

    settings = runtime.settings
    _, problems = validate_all(settings.campaigns_dir, settings.templates_dir)
    if problems:
        for problem in problems:
            click.echo(str(problem), err=True)
        raise Refused(f"{len(problems)} problem(s) in the campaigns (above); fix them and start again")


def _inline_delivery(runtime: Runtime) -> None:
    """Without a broker, CLI passes deliver what they queue themselves, in this process."""
    from outreach.pipeline.delivery import deliver

    def run(ids: Sequence[str]) -> None:
        for outbox_id in ids:
            deliver(runtime, outbox_id)

    runtime.enqueue_override = run


def _external_broker(runtime: Runtime) -> None:
    from outreach.service.broker import build_broker, install_broker

    install_broker(build_broker(runtime.settings), runtime.settings.queue_name)


def _beside_sandbox(settings: Settings) -> tuple[Settings, str]:
    """``settings`` sending to the sandbox that ``outreach up`` or ``outreach sandbox`` runs for this data folder,
    when the credentials are not both set and OUTREACH_SANDBOX_URL names no sandbox; also why none was found ("" if
    one was, or none was looked for). Its service's public URL comes along unless OUTREACH_PUBLIC_URL is set, so
    links and status callbacks point where that service listens."""
    from outreach.ops.sandbox.discovery import find_sandbox

    if settings.has_all_credentials or settings.sandbox_url:
        return settings, ""
    try:
        found = find_sandbox(settings.database_url)
    except ConfigurationError as exc:
        return settings, str(exc)
    changes: dict[str, Any] = {"sandbox_url": found.url}
    if found.public_url and "OUTREACH_PUBLIC_URL" not in os.environ:
        changes["public_url"] = found.public_url
    settings = settings.with_overrides(**changes)
    set_settings(settings)
    return settings, ""


def _require_sending(runtime: Runtime, why_no_sandbox: str) -> None:
    """Refuse now, before anything is written, when this process could not send what it queues: no credentials
    and no sandbox, or a sandbox that does not answer."""
    from outreach.ops.sandbox.discovery import answers

    if runtime.sandbox_url and not answers(runtime.sandbox_url):
        named = "OUTREACH_SANDBOX_URL" if runtime.sandbox_url == os.environ.get("OUTREACH_SANDBOX_URL") else "found"
        raise Refused(f"cannot send: the sandbox at {runtime.sandbox_url} ({named}) does not answer; start it again")
    try:
        _ = runtime.providers  # built now, so a missing setting is named before anything is stored
    except ConfigurationError as exc:
        advice = "set the provider credentials"
        if why_no_sandbox:
            advice = (
                f"{why_no_sandbox}: start `outreach up` (or `outreach sandbox`) for this folder, set"
                f" OUTREACH_SANDBOX_URL, or {advice}"
            )
        raise Refused(f"cannot send: {exc}; {advice}") from None


def _runtime_for_commands(settings: Settings) -> Runtime:
    """The runtime of a command that queues messages, its campaigns checked: for the workers (OUTREACH_BROKER_URL),
    or sent in this process through the providers or the sandbox found for this folder (checked before anything
    is written)."""
    why_no_sandbox = ""
    if not settings.broker_url:
        settings, why_no_sandbox = _beside_sandbox(settings)
    runtime = Runtime(settings)
    set_runtime(runtime)
    _check_campaigns(runtime)
    if settings.broker_url:
        _external_broker(runtime)
    else:
        _require_sending(runtime, why_no_sandbox)
        _inline_delivery(runtime)
    return runtime


def _database_problem(exc: Exception) -> str:
    """What to do about a database error, in words: the driver's own message is never shown (it may quote the
    personal data of a row)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError, OperationalError

    raw = os.environ.get("OUTREACH_DATABASE_URL", "").strip() or Settings().database_url
    try:
        where = make_url(raw).render_as_string(hide_password=True)
    except ArgumentError:
        where = ""
    if isinstance(exc, ArgumentError | NoSuchModuleError) or not where:
        return (
            "OUTREACH_DATABASE_URL is not a database URL outreach can use; give one like"
            " postgresql://user@host/outreach or sqlite:///outreach.core.db"
        )
    original = getattr(exc, "orig", None)
    state = getattr(original, "sqlstate", None) or ""
    text = str(original) if original is not None and type(original).__module__ == "sqlite3" else ""
    if state in {"42P01", "42703"} or text.startswith(("no such table", "no such column")):
        return f"the database {where} has no outreach tables, or old ones: run `outreach db upgrade`"
    if isinstance(exc, OperationalError | InterfaceError):
        return (
            f"cannot use the database {where} ({type(original or exc).__name__}): check OUTREACH_DATABASE_URL"
            " and that the server runs and can be reached (for SQLite: that the folder exists and is writable)"
        )
    if isinstance(exc, DBAPIError):
        return (
            f"the database {where} refused the command ({type(original or exc).__name__}); its message is not"
            " shown because it may quote personal data"
        )
    return f"database error ({type(exc).__name__}) with {where}"


def _unexpected(exc: BaseException, command: str) -> str:
    """An error nobody planned for, named by its type and where it was raised (its message may hold data)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/outreach/" in f.filename or "/workers/" in f.filename] or frames
    where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
    return (
        f"`outreach {command}` stopped on an unexpected {type(exc).__name__}{where}; its message is not shown"
        " (it may hold personal data): please report it with the command you ran"
    )


class _Guarded(click.Group):
    """The entry point: no command ends in a traceback. The project's own errors and database failures become one
    line (exit 2) saying what to set or fix; anything else one line naming the error's type and place."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OutreachError as exc:
            if isinstance(exc, CampaignError):
                raise Refused(
                    f"{len(exc.problems)} problem(s) in the campaigns: run `outreach campaigns validate`"
                ) from None
            raise Refused(str(exc)) from None
        except SQLAlchemyError as exc:
            raise Refused(_database_problem(exc)) from None
        except Exception as exc:
            raise Refused(_unexpected(exc, ctx.invoked_subcommand or "")) from None


@click.group(cls=_Guarded, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """outreach: timed, personal email and SMS for recruiting teams."""


# -- running the service -----------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=8, show_default=True, type=int, help="In-process worker threads.")
def up(host: str, port: int, threads: int) -> None:
    """API, scheduler, workers and (without credentials) the provider sandbox, in one process."""
    import uvicorn

    from outreach.core.db import upgrade

    settings = _settings()
    if "OUTREACH_PUBLIC_URL" not in os.environ:
        # Locally the public URL is where this process listens: the sandbox posts its callbacks there.
        settings = settings.with_overrides(public_url=f"http://{host}:{port}")
        set_settings(settings)
    runtime = Runtime(settings)
    set_runtime(runtime)
    # What can be known before anything is written: the campaigns, the ports.
    _check_campaigns(runtime)
    _port_free(host, port)
    hooks = None
    with contextlib.ExitStack() as stack:
        sandbox = None
        if not settings.has_all_credentials:
            from outreach.ops.sandbox import SandboxServer

            token = settings.twilio_auth_token.reveal() or SANDBOX_TWILIO_AUTH_TOKEN
            sandbox = _started(
                SandboxServer(
                    "127.0.0.1",
                    settings.sandbox_port,
                    twilio_auth_token=token,
                    sendgrid_event_url=f"{settings.public_url}/webhooks/sendgrid/events",
                ),
                "OUTREACH_SANDBOX_PORT",
            )
            stack.callback(sandbox.stop)
        upgrade(settings.database_url)
        _first_start_key(runtime)
        if sandbox is not None:
            from outreach.core.config import Secret
            from outreach.ops.sandbox.discovery import RunningSandbox, data_folder, database_fingerprint, published
            from outreach.web.webhooks import WebhookSettings

            runtime.sandbox_url = sandbox.url
            # The sandbox signs its events and callbacks with keys of its own; the webhooks check against those.
            hooks = WebhookSettings(
                sendgrid_public_key=sandbox.sendgrid_public_key,
                inbound_token=settings.inbound_token,
                twilio_auth_token=Secret(sandbox.twilio_auth_token),
            )
            # The other commands run for this data folder (event, tick, …) find the sandbox here and send to it.
            found = RunningSandbox(
                sandbox.url, os.getpid(), "up", settings.public_url, database_fingerprint(settings.database_url)
            )
            stack.enter_context(published(data_folder(settings.database_url), found, replace_running=True))
            click.echo(f"provider sandbox: {sandbox.url}/  (messages sent show up here)")
        stop = _start_background(runtime, threads)
        stack.callback(stop.set)
        click.echo(f"outreach API: http://{host}:{port}/docs")
        click.echo(f"dashboard: http://{host}:{port}/dashboard  (log in with an API key)")
        sys.stdout.flush()
        from outreach.web import create_app
        from outreach.web.ratelimit import proxy_options

        uvicorn.run(
            create_app(runtime, hooks),
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
            **proxy_options(settings.trusted_proxies),
        )


def _port_free(host: str, port: int, setting: str = "--port") -> None:
    """Refuse at once, before anything is written, when the API's port is taken."""
    import socket

    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise Refused(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): another `outreach up` or `outreach serve`"
            f" may be running; stop it or choose another port ({setting})"
        ) from None


def _started(server: SandboxServer, port_setting: str) -> SandboxServer:
    """``server``, listening; one line naming the port and the setting when it cannot listen."""
    try:
        return server.start()
    except OSError as exc:
        raise Refused(
            f"the provider sandbox cannot listen on {server.host}:{server.port} ({exc.strerror or exc}): another"
            f" `outreach up` or `outreach sandbox` may be running; stop it or choose another port ({port_setting})"
        ) from None


def _start_background(runtime: Runtime, threads: int) -> threading.Event:
    """Install the broker, start worker threads and the scheduler loop; returns the event that stops them."""
    from dramatiq import Worker

    from outreach.pipeline.scheduler import run_forever
    from outreach.service.broker import build_broker, install_broker

    broker = install_broker(build_broker(runtime.settings))
    from workers.actors import declare_actors

    declare_actors(broker)
    worker = Worker(broker, worker_threads=threads, queues={runtime.settings.queue_name})
    worker.start()
    stop = threading.Event()
    thread = threading.Thread(
        target=run_forever, args=(runtime.scheduler, runtime.settings.tick_interval, stop), daemon=True
    )
    thread.start()

    def stop_worker() -> None:
        stop.wait()
        worker.stop()

    threading.Thread(target=stop_worker, daemon=True).start()
    return stop


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """The HTTP API only. With OUTREACH_BROKER_URL it enqueues for separate workers; without, it runs its own."""
    import uvicorn

    from outreach.web import create_app
    from outreach.web.ratelimit import proxy_options

    settings, why_no_sandbox = _beside_sandbox(_settings())
    runtime = Runtime(settings)
    set_runtime(runtime)
    _check_campaigns(runtime)
    _port_free(host, port)
    hooks = _sandbox_webhooks(settings, runtime.sandbox_url) if runtime.sandbox_url else None
    if settings.broker_url:
        _external_broker(runtime)
    else:
        _require_sending(runtime, why_no_sandbox)
        _start_background(runtime, 4)
    uvicorn.run(
        create_app(runtime, hooks),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        **proxy_options(settings.trusted_proxies),
    )


def _sandbox_webhooks(settings: Settings, sandbox_url: str) -> WebhookSettings:
    """The webhook checks of an API beside a sandbox, as under ``outreach up``: SendGrid events verified with the
    sandbox's key (unless OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY names one), Twilio callbacks with its token."""
    from outreach.core.config import Secret
    from outreach.ops.sandbox.discovery import sandbox_public_key
    from outreach.web.webhooks import WebhookSettings

    key = settings.sendgrid_webhook_public_key or sandbox_public_key(sandbox_url)
    token = settings.twilio_auth_token.reveal() or SANDBOX_TWILIO_AUTH_TOKEN
    return WebhookSettings(
        sendgrid_public_key=key, inbound_token=settings.inbound_token, twilio_auth_token=Secret(token)
    )


@main.command()
@click.option("--processes", "-p", default=2, show_default=True, type=int)
@click.option("--threads", "-t", default=8, show_default=True, type=int)
def worker(processes: int, threads: int) -> None:
    """Dramatiq worker processes (needs OUTREACH_BROKER_URL); the same as `dramatiq workers.main`."""
    settings = _settings()
    if not settings.broker_url:
        raise Refused("OUTREACH_BROKER_URL must point at Redis or RabbitMQ for separate workers")
    _check_campaigns(Runtime(settings))
    settings, why_no_sandbox = _beside_sandbox(settings)
    _require_sending(Runtime(settings), why_no_sandbox)
    if settings.sandbox_url:
        # The workers read their settings from the environment: hand them the sandbox this command found.
        os.environ["OUTREACH_SANDBOX_URL"] = settings.sandbox_url
        os.environ["OUTREACH_PUBLIC_URL"] = settings.public_url
    args = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.main",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--queues",
        settings.queue_name,
    ]
    os.execv(sys.executable, args)


@main.command()
def scheduler() -> None:
    """Tick continuously: fire cron campaigns, claim due steps, sweep stale outbox rows."""
    from outreach.pipeline.scheduler import run_forever

    settings = _settings()
    runtime = _runtime_for_commands(settings)
    click.echo(f"scheduler ticking every {settings.tick_interval}s")
    run_forever(runtime.scheduler, settings.tick_interval)


@main.command()
@click.option("--now", "now_text", default=None, help="Run the pass, and every send it makes, as if at this instant.")
def tick(now_text: str | None) -> None:
    """One scheduler pass (as if at --now); prints what it did as JSON.

    With --now the pass is a time machine: it and every message it sends are judged at that instant (due steps,
    quiet hours, caps, the calendar, out-of-office pauses), so it sends in this process even when
    OUTREACH_BROKER_URL is set: workers would judge the sends at their own time. The summary's ``messages``
    and ``rules`` are read back from the outbox after the pass; ``left_for_workers`` counts what is still
    pending for the workers (nothing, with --now).
    """
    from outreach.pipeline.scheduler import outcome_of

    now = _parse_when(now_text, "--now")
    settings = _settings()
    if now is not None and settings.broker_url:
        settings = settings.with_overrides(broker_url="")
    runtime = _runtime_for_commands(settings)
    result = runtime.scheduler.tick(now)
    click.echo(json.dumps({**result.summary(), **outcome_of(runtime.engine, [*result.written, *result.requeued])}))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=None, type=int, help="Default: OUTREACH_SANDBOX_PORT (8025).")
@click.option(
    "--events-to",
    "events_to",
    default=None,
    help="The service's public URL, where SendGrid events are posted (default: OUTREACH_PUBLIC_URL).",
)
@click.option("--no-sendgrid-events", is_flag=True, help="Post no SendGrid events (benchmarks of sending alone).")
def sandbox(host: str, port: int | None, events_to: str | None, no_sendgrid_events: bool) -> None:
    """A local SendGrid + Twilio stand-in that keeps what it receives (browse it at /).

    Like the sandbox of `outreach up`, it posts signed SendGrid events to the service (and Twilio status callbacks
    where each message asks), and the commands run for the same data folder (event, tick, scheduler, worker,
    serve) find it and send to it. Its SendGrid signing key is kept in the data folder's .outreach/, so a restart
    signs as before.
    """
    import signal

    from outreach.ops.sandbox import SandboxServer
    from outreach.ops.sandbox.discovery import RunningSandbox, data_folder, published, signing_key

    settings = _settings()
    folder = data_folder(settings.database_url)
    public_url = (events_to or settings.public_url).rstrip("/")
    event_url = None if no_sendgrid_events else f"{public_url}/webhooks/sendgrid/events"
    server = _started(
        SandboxServer(
            host,
            settings.sandbox_port if port is None else port,
            twilio_auth_token=settings.twilio_auth_token.reveal() or SANDBOX_TWILIO_AUTH_TOKEN,
            sendgrid_event_url=event_url,
            signing_key=signing_key(folder),
        ),
        "--port or OUTREACH_SANDBOX_PORT",
    )

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # stopped like Ctrl-C: the state file goes with it
    try:
        with published(folder, RunningSandbox(server.url, os.getpid(), "sandbox", public_url)) as recorded:
            click.echo(f"provider sandbox on {server.url}/  (messages sent show up here)")
            if recorded is None:
                click.echo(
                    f"(another sandbox runs for {folder}: the commands run there keep sending to it;"
                    " OUTREACH_SANDBOX_URL points them here)"
                )
            click.echo(f"SendGrid events to {event_url}" if event_url else "SendGrid events: not posted")
            click.echo(f"SendGrid event webhook public key: {server.sendgrid_public_key}")
            sys.stdout.flush()
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


# -- database ----------------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations (Alembic) up to REVISION."""
    from alembic.util.exc import CommandError

    from outreach.core.db import upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url, revision)
    except CommandError as exc:
        raise Refused(f"cannot upgrade to {revision!r}: {exc}") from None
    click.echo(f"database at {revision}")


# -- campaigns ---------------------------------------------------------------------------------------------


@main.group()
def campaigns() -> None:
    """Check and preview campaign files."""


@campaigns.command("validate")
def campaigns_validate() -> None:
    """Check every campaign file and the templates it uses; exit 1 on any problem."""
    from outreach.service.validation import validate_all

    settings = _settings()
    loaded, problems = validate_all(settings.campaigns_dir, settings.templates_dir)
    if problems or loaded is None:
        for problem in problems:
            click.echo(str(problem), err=True)
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(1)
    for campaign in loaded:
        trigger = campaign.trigger.event or f"cron {campaign.trigger.cron}"
        click.echo(f"ok  {campaign.name:<20} {campaign.category.value:<13} {trigger:<24} {len(campaign.steps)} step(s)")
    click.echo(f"{len(loaded)} campaign(s) valid")


@campaigns.command("preview")
@click.argument("name")
@click.option("--step", default=1, show_default=True, type=int, help="1-based step number.")
@click.option("--locale", default=None, help="Locale to render, e.g. zh-CN (default: the default locale).")
def campaigns_preview(name: str, step: int, locale: str | None) -> None:
    """Render one step of a campaign with sample data."""
    from outreach.pipeline.samples import sample_context

    settings = _settings()
    runtime = Runtime(settings)
    campaign = runtime.campaigns.get(name)
    if campaign is None:
        raise click.ClickException(f"no campaign named {name!r}")
    if not 1 <= step <= len(campaign.steps):
        raise click.ClickException(f"{name} has steps 1..{len(campaign.steps)}")
    spec = campaign.steps[step - 1]
    context = sample_context(
        locale or settings.default_locale,
        event_type=campaign.trigger.event.value if campaign.trigger.event else "offer_accepted",
        contract=runtime.campaigns.events,
    )
    if campaign.is_cron:
        context = {**context, "event": None, "job": None}
    if spec.channel.value == "email":
        email = runtime.renderer.render_email(spec.template, locale or settings.default_locale, context)
        click.echo(f"Subject: {email.subject}\nLocale: {email.locale}\n\n{email.text}")
    else:
        sms = runtime.renderer.render_sms(spec.template, locale or settings.default_locale, context)
        click.echo(f"SMS ({sms.encoding}, {sms.segments} segment(s), locale {sms.locale}):\n{sms.text}")


@campaigns.command("simulate")
@click.argument("names", nargs=-1)
@click.option("--candidates", "candidate_count", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=7, show_default=True, type=int, help="Same seed, same cohort, same report.")
@click.option("--start", "start_text", default=None, help="First day, ISO-8601 (default: today, company time).")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def campaigns_simulate(
    names: tuple[str, ...], candidate_count: int, days: int, seed: int, start_text: str | None, output_format: str
) -> None:
    """Run the campaigns and policies over a synthetic cohort on a virtual clock; no message leaves.

    Reports messages per candidate, deferrals and drops by rule, messages sent outside their window, cap
    violations and the timing promises, per campaign (NAMES, or all) and overall. Exit 1 if any message went
    out outside its window, any cap was exceeded or any message was sent twice.
    """
    import time

    from outreach.ops.simulate.run import simulate

    settings = _settings()
    start = None
    if start_text is not None:
        try:
            start = datetime.fromisoformat(start_text.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(f"{start_text!r} is not ISO-8601, e.g. 2026-03-02", param_hint="--start") from None
    began = time.perf_counter()
    try:
        report = simulate(
            settings.campaigns_dir,
            settings.templates_dir,
            names=names,
            candidates=candidate_count,
            days=days,
            seed=seed,
            start=start,
            settings=settings,
        )
    except CampaignError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        raise click.ClickException(f"{len(exc.problems)} problem(s) in the campaigns; nothing simulated") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if output_format == "json":
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(report.render_table())
        click.echo(f"(simulated in {time.perf_counter() - began:.1f} s)", err=True)
    if not report.ok:
        sys.exit(1)


# -- candidates and events ---------------------------------------------------------------------------------


@main.group()
def candidates() -> None:
    """Candidate data."""


CSV_COLUMNS = (
    "external_id",
    "name",
    "email",
    "phone",
    "locale",
    "timezone",
    "source",
    "tags",
    "nurture_consent",
)


def _csv_row(raw: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: (v or "").strip() for k, v in raw.items() if k in CSV_COLUMNS}
    row["tags"] = [t for t in row.get("tags", "").replace("|", ";").split(";") if t.strip()]
    consent = row.pop("nurture_consent", "")
    if consent:
        row["nurture_consent"] = consent.lower() in {"1", "true", "yes", "y"}
    return {k: v for k, v in row.items() if v not in ("", None) or k == "tags"}


@candidates.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def candidates_import(path: Path) -> None:
    """Upsert candidates from a CSV file (all rows or none: every bad row is reported first).

    Columns: external_id (required), name, email, phone, locale, timezone, source, tags (separated by ; or |),
    nurture_consent (yes/no).
    """
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from outreach.core.db import get_engine
    from outreach.core.models import Candidate
    from outreach.domain.candidates import CandidateIn, parse_candidate, upsert_candidate

    settings = _settings()
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            unknown = set(reader.fieldnames or ()) - set(CSV_COLUMNS)
            if "external_id" not in (reader.fieldnames or ()):
                raise click.ClickException(f"{path}: the header needs an external_id column")
            if unknown:
                raise click.ClickException(f"{path}: unknown column(s): {', '.join(sorted(unknown))}")
            rows = list(reader)
        except UnicodeDecodeError as exc:
            raise click.ClickException(
                f"{path}: not UTF-8 text (byte {exc.start}); save the file as CSV UTF-8; nothing was imported"
            ) from None
        except csv.Error as exc:
            raise click.ClickException(f"{path}:{reader.line_num}: {exc}; nothing was imported") from None
    parsed: list[CandidateIn] = []
    errors: list[str] = []
    for number, raw in enumerate(rows, start=2):
        try:
            parsed.append(parse_candidate(_csv_row(raw), settings))
        except ValidationError as exc:
            errors.append(f"{path}:{number}: {exc.field}: {exc.message}")
    if errors:
        for line in errors:
            click.echo(line, err=True)
        raise click.ClickException(f"{len(errors)} invalid row(s); nothing was imported")
    engine = get_engine(settings.database_url)
    with Session(engine) as session, session.begin():
        session.execute(select(Candidate.id).limit(1))  # the database and its tables answer before progress shows
        with click.progressbar(parsed, label="importing", file=sys.stderr) as bar:
            for candidate in bar:
                upsert_candidate(session, candidate, settings)
    click.echo(f"imported {len(parsed)} candidate(s)")


@main.command()
@click.argument("external_id")
@click.argument("event_type")
@click.option("--job", "job_id", default=None, help="The job's external id.")
@click.option("--reason", default=None)
@click.option("--at", "at_text", default=None, help="When it happened (ISO-8601); default now.")
@click.option("--data", "data_text", default=None, help="Extra event data as a JSON object.")
def event(
    external_id: str,
    event_type: str,
    job_id: str | None,
    reason: str | None,
    at_text: str | None,
    data_text: str | None,
) -> None:
    """Record a candidate event (applied, offer_extended, …) and start the campaigns it triggers."""
    from sqlalchemy.orm import Session

    from outreach.core.inputs import validate
    from outreach.domain.intent import load_intent
    from outreach.pipeline.enrollment import EventIn, record_event

    settings = _settings()
    try:
        data = json.loads(data_text) if data_text else {}
    except (json.JSONDecodeError, RecursionError):
        raise click.BadParameter("not a JSON object", param_hint="--data") from None
    try:
        when = _parse_when(at_text, "--at")
        fields = {"type": event_type, "job_id": job_id, "reason": reason, "occurred_at": when, "data": data}
        event_in = validate(EventIn, fields)
    except ValidationError as exc:
        # Fields and what is wrong with them; never the values (personal data).
        raise click.ClickException(f"invalid event: {exc}") from None
    # Only then the providers or the sandbox: a command that could not send stops before the event is stored.
    runtime = _runtime_for_commands(settings)
    try:
        with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
            recorded, enrollments = record_event(
                session,
                runtime.campaigns,
                external_id,
                event_in,
                company_tz=settings.company_timezone,
                calendar=runtime.policy.calendar,
                policy=runtime.policy,
                intent=load_intent(settings.campaigns_dir),
            )
    except OutreachError as exc:
        raise click.ClickException(str(exc)) from None
    result = runtime.scheduler.run_enrollments([e.id for e in enrollments])
    click.echo(
        json.dumps(
            {
                "event_id": recorded.id,
                "enrolled": [e.campaign for e in enrollments],
                "queued": len(result.queued),
            }
        )
    )


# -- API keys ----------------------------------------------------------------------------------------------


@main.group()
def apikey() -> None:
    """Keys for the API and dashboard (roles: hr reads and writes; ops reads metrics, never personal data)."""


@apikey.command("create")
@click.option("--role", required=True, type=click.Choice(["hr", "ops"]), help="What the key may do.")
@click.option("--name", default=None, help="Who or what uses the key (shown in listings).")
def apikey_create(role: str, name: str | None) -> None:
    """Create a key and print it once, alone on the last line (only its hash is stored)."""
    from sqlalchemy.orm import Session

    from outreach.core.db import get_engine
    from outreach.domain.auth import create_key

    settings = _settings()
    try:
        with Session(get_engine(settings.database_url)) as session, session.begin():
            row, key = create_key(session, role, name)
            click.echo(f"created {row.role} key {row.id} ({row.name}); it is shown once, store it now:")
    except OutreachError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)


@apikey.command("list")
def apikey_list() -> None:
    """Keys with their role, shown prefix, creation and last use (never the key)."""
    from sqlalchemy.orm import Session

    from outreach.core.db import get_engine
    from outreach.domain.auth import list_keys

    settings = _settings()
    with Session(get_engine(settings.database_url)) as session:
        rows = list_keys(session)
    if not rows:
        click.echo("no keys; create one with: outreach apikey create --role hr")
        return
    click.echo(f"{'id':>4}  {'role':<4}  {'prefix':<14}  {'created':<20}  {'last used':<20}  {'revoked':<20}  name")
    for row in rows:
        created = row.created_at.strftime("%Y-%m-%d %H:%M:%S")
        used = row.last_used_at.strftime("%Y-%m-%d %H:%M:%S") if row.last_used_at else "-"
        revoked = row.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if row.revoked_at else "-"
        shown = row.prefix + "…"
        click.echo(f"{row.id:>4}  {row.role:<4}  {shown:<14}  {created:<20}  {used:<20}  {revoked:<20}  {row.name}")


@apikey.command("revoke")
@click.argument("key")
def apikey_revoke(key: str) -> None:
    """Revoke KEY, given by its numeric id or its shown prefix; it stops working at once."""
    from sqlalchemy.orm import Session

    from outreach.core.db import get_engine
    from outreach.domain.auth import revoke_key

    settings = _settings()
    try:
        with Session(get_engine(settings.database_url), expire_on_commit=False) as session, session.begin():
            row = revoke_key(session, key)
    except OutreachError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {row.role} key {row.id} ({row.name})")


def _first_start_key(runtime: Runtime) -> None:
    """On a database without keys, create an hr key and print it, so a newcomer can call the API at once."""
    from sqlalchemy.orm import Session

    from outreach.domain.auth import Role, create_key, has_keys

    with Session(runtime.engine) as session, session.begin():
        if has_keys(session):
            return
        _, key = create_key(session, Role.HR, "first-start")
    click.echo("first start: an hr API key was created (shown once; more with `outreach apikey create`):")
    click.echo(key)
    sys.stdout.flush()  # before the server's own output, also when stdout is a pipe


_RATE_COLUMNS = (
    ("messages", None),
    ("delivered", "delivery_rate"),
    ("opened", "open_rate"),
    ("clicked", "click_rate"),
    ("replied", "reply_rate"),
    ("opted_out", "opt_out_rate"),
    ("bounced", "bounce_rate"),
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _report_tables(rates: list[Any], funnel: Any, slas: list[Any], by: str | None) -> list[str]:
    lines = []
    heading = by or "all"
    header = f"{heading:<24}" + "".join(
        f"{count:>10}" + (f"{rate.split('_rate')[0] + '%':>10}" if rate else "") for count, rate in _RATE_COLUMNS
    )
    lines += ["Rates (rate = count / messages for delivery and bounce, / delivered for the others; opens: emails)"]
    lines.append(header)
    for row in rates:
        label = " ".join(str(part) for part in (row.period, row.key) if part is not None) or "all"
        cells = "".join(
            f"{getattr(row, count):>10}" + (f"{_pct(getattr(row, rate)):>10}" if rate else "")
            for count, rate in _RATE_COLUMNS
        )
        lines.append(f"{label:<24}{cells}")
    lines += ["", "Funnel (candidates who applied in the window: reached / dropped before the next stage)"]
    stages = [stage.stage for stage in funnel.total.stages]
    lines.append(f"{'source':<16}" + "".join(f"{stage:>18}" for stage in stages))
    for row in (funnel.total, *funnel.by_source):
        cells = "".join(f"{f'{s.reached} / -{s.dropped}':>18}" for s in row.stages)
        lines.append(f"{row.source or 'all':<16}{cells}")
    lines += ["", "SLAs (events in the window)"]
    lines.append(f"{'promise':<24}{'total':>7}{'met':>7}{'breached':>10}{'pending':>9}{'met %':>8}  worst late")
    for report in slas:
        met = "-" if report.met_pct is None else f"{report.met_pct:.1f}"
        worst = "-" if report.worst_late_seconds is None else f"{report.worst_late_seconds / 3600:.1f} h"
        lines.append(
            f"{report.name:<24}{report.total:>7}{report.met:>7}{report.breached:>10}{report.pending:>9}"
            f"{met:>8}  {worst}"
        )
    return lines


def _report_csv(rates: list[Any], funnel: Any, slas: list[Any]) -> str:
    """One long table: section, group, period, metric, value (rates, funnel stages and SLA counts)."""
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "group", "period", "metric", "value"])
    for row in rates:
        data = row.as_dict()
        for name, value in data.items():
            if name not in ("key", "period"):
                writer.writerow(["rates", row.key or "all", data["period"] or "", name, "" if value is None else value])
    for frow in (funnel.total, *funnel.by_source):
        for stage in frow.stages:
            for name in ("reached", "dropped", "conversion"):
                value = getattr(stage, name)
                writer.writerow(
                    ["funnel", frow.source or "all", "", f"{stage.stage}.{name}", "" if value is None else value]
                )
    for report in slas:
        for name in ("total", "met", "breached", "pending", "met_pct", "worst_late_seconds"):
            value = getattr(report, name)
            writer.writerow(["sla", report.name, "", name, "" if value is None else value])
    return out.getvalue()


@main.command()
@click.option("--since", "since_text", default="30d", show_default=True, help="30d, 12h, 2w (ago) or an ISO date.")
@click.option("--until", "until_text", default=None, help="30d, 12h, 2w (ago) or an ISO date; default now.")
@click.option(
    "--by",
    type=click.Choice(["campaign", "step", "channel", "template", "locale", "source", "period"]),
    default=None,
    help="Group the rates (default: one total).",
)
@click.option(
    "--bucket",
    type=click.Choice(["day", "week", "month"]),
    default=None,
    help="Also split the rates by period: UTC days, Monday weeks, or months in the company timezone.",
)
@click.option(
    "--format", "output_format", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True
)
def report(since_text: str, until_text: str | None, by: str | None, bucket: str | None, output_format: str) -> None:
    """Delivery, engagement and reply rates, the hiring funnel and the SLAs (no personal data)."""
    from outreach.core.clock import utcnow
    from outreach.core.db import get_engine
    from outreach.ops import analytics

    settings = _settings()
    now = utcnow()
    try:
        since = analytics.parse_moment(since_text, "--since", now)
        until = analytics.parse_moment(until_text, "--until", now)
        analytics.check_window(since, until)
    except ValidationError as exc:
        raise click.BadParameter(
            exc.message, param_hint=exc.field if exc.field.startswith("--") else f"--{exc.field}"
        ) from None
    dimension = analytics.parse_dimension(by)
    period = analytics.parse_bucket(bucket)
    engine = get_engine(settings.database_url)
    rates = analytics.rates(
        engine, by=dimension, since=since, until=until, bucket=period, timezone=settings.company_timezone
    )
    funnel = analytics.funnel(engine, since=since, until=until)
    slas = analytics.sla(engine, since=since, until=until, now=now)
    if output_format == "json":
        document = {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "by": by,
            "rates": [row.as_dict() for row in rates],
            "funnel": funnel.as_dict(),
            "sla": [item.as_dict() for item in slas],
        }
        click.echo(json.dumps(document, indent=2))
    elif output_format == "csv":
        click.echo(_report_csv(rates, funnel, slas), nl=False)
    else:
        window = f"{since:%Y-%m-%d %H:%M} UTC" if since else "the start"
        click.echo(f"outreach report: {window} to {f'{until:%Y-%m-%d %H:%M} UTC' if until else 'now'}")
        click.echo("")
        click.echo("\n".join(_report_tables(rates, funnel, slas, by)))


if __name__ == "__main__":
    main()
