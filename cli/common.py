"""Settings, database access, error handling and option helpers shared by all commands.

Configuration is ``supervisor.config.load()`` with command-line flags applied
on top through ``Config.replace``. Options that mirror a setting also read its
``ANALYSIS_*`` environment variable, but only values typed on the command line
are passed to ``replace``: values from the environment are left to
``config.load``, so ``analysisctl config show`` names the right source.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import alembic.util
import psycopg
import sqlalchemy as sa
import typer
from sqlalchemy.engine import Engine, make_url
from typer._click.core import ParameterSource
from typer.core import TyperGroup

from supervisor import access, db
from supervisor import config as config_module
from supervisor.errors import DatabaseUnavailable, SchemaOutOfDate, ServiceError

# Exit code of a command whose job ended in another status than the one it
# waited for, or whose check found a problem (doctor).
EXIT_NOT_SUCCEEDED = 1
# Exit code after Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130

# Query parameters of a libpq URL that carry a secret.
SECRET_QUERY_KEYS = ("password", "sslpassword")


@dataclasses.dataclass
class GlobalOptions:
    """Options given before the command name, stored on the root context."""

    config_file: Path | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def command_line_values(ctx: typer.Context, **values: Any) -> dict[str, Any]:
    """Return the subset of ``values`` whose option was typed on the command line."""
    return {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }


def load_settings(ctx: typer.Context, **flags: Any) -> config_module.Config:
    """Load the settings and apply the global flags and ``flags`` typed on the command line."""
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    settings = config_module.load(config_file=options.config_file)
    overrides = {**options.overrides, **command_line_values(ctx, **flags)}
    return settings.replace(**overrides)


def open_engine(ctx: typer.Context, settings: config_module.Config, *, check: bool = True) -> Engine:
    """Return an engine for the configured database, disposed when the command ends.

    With ``check`` the schema must be at head (``SchemaOutOfDate`` otherwise).
    With no database URL configured this starts the embedded server.
    """
    engine = db.connect(settings, check=False)
    ctx.call_on_close(engine.dispose)
    if check:
        db.check_schema(engine)
    return engine


def redact_url(raw: str | None) -> str | None:
    """Return ``raw`` with the password hidden, including one passed as a query parameter."""
    if raw is None:
        return None
    try:
        url = make_url(raw)
    except sa.exc.ArgumentError:
        return "<unparsable URL>"
    query = {key: ("***" if key.lower() in SECRET_QUERY_KEYS else value) for key, value in url.query.items()}
    # The URL renderer percent-encodes the stars.
    return db.redact(url.set(query=query)).replace("%2A%2A%2A", "***")


def secrets_of(raw: str | None) -> list[str]:
    """Return the passwords contained in a database URL, for scrubbing messages."""
    if not raw:
        return []
    try:
        url = make_url(raw)
    except sa.exc.ArgumentError:
        # An unparsable URL may still carry a password; hide the whole value.
        return [raw]
    found = [url.password] if url.password else []
    for key, value in url.query.items():
        if key.lower() in SECRET_QUERY_KEYS:
            found += [value] if isinstance(value, str) else list(value)
    # A query string parsed by libpq could also carry it percent-encoded.
    found += [value for key, value in parse_qsl(raw.partition("?")[2]) if key.lower() in SECRET_QUERY_KEYS]
    return [secret for secret in found if secret]


def scrub(message: str, urls: tuple[str | None, ...] = ()) -> str:
    """Replace every password of ``urls`` and of the configured database URL in ``message`` with ``***``.

    The configured URL is the one in ``ANALYSIS_DATABASE_URL`` or in the file
    ``ANALYSIS_DATABASE_URL_FILE`` names.

    Messages are built with redacted URLs already; this is the safety net
    for text that quotes a URL from elsewhere, such as a driver error.
    """
    secrets: set[str] = set()
    environ_file = os.environ.get(config_module.env_name("database_url_file"))
    for raw in (os.environ.get(config_module.env_name("database_url")), url_in_file(environ_file), *urls):
        secrets.update(secrets_of(raw))
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def url_in_file(path: str | Path | None) -> str | None:
    """Return the stripped text of a database URL file, or None when there is none or it cannot be read."""
    if not path:
        return None
    try:
        # O_NONBLOCK and the regular-file check: a FIFO must not block an error message.
        descriptor = os.open(Path(path).expanduser(), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return handle.read().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(descriptor)


def current_user() -> str:
    """Return the OS login name, for ``submitted_by`` and ``cancel_requested_by``."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # No login name and no passwd entry, as in some containers.
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def acting_user(engine: Engine, requested: str | None) -> str | None:
    """Return the user name a command records for its writes, or None to let the store use the login.

    ``requested`` (``--user``) wins when given; the store permits another
    user's name only to operators and unrestricted sessions. Otherwise a
    session that row-level security does not restrict (a superuser or the
    tables' owner, as in single-user setups) records the OS login name, as
    before roles existed, and any other session records its database login.
    """
    if requested is not None:
        return requested
    try:
        with engine.connect() as connection:
            session = access.current_session(connection)
    except sa.exc.DBAPIError as error:
        if access.is_permission_error(error):
            raise access.permission_denied(error) from error
        raise
    return None if session.restricted else current_user()


def print_error(message: str, ctx: typer.Context | None = None) -> None:
    options = ctx.find_object(GlobalOptions) if ctx is not None else None
    overrides = options.overrides if options is not None else {}
    flag_urls = (overrides.get("database_url"), url_in_file(overrides.get("database_url_file")))
    typer.echo(f"error: {scrub(message, flag_urls)}", err=True)


def database_error(error: Exception) -> DatabaseUnavailable:
    """Convert a database failure in the middle of a command into ``DatabaseUnavailable``."""
    detail = getattr(error, "orig", None) or error
    first_line = str(detail).strip().splitlines()[0] if str(detail).strip() else type(detail).__name__
    if isinstance(detail, psycopg.errors.QueryCanceled):
        return DatabaseUnavailable(
            f"a database query timed out: {first_line}; run the command again, or raise "
            "ANALYSIS_STATEMENT_TIMEOUT_MS if the database is busy"
        )
    return DatabaseUnavailable(
        f"the database connection failed: {first_line}; "
        "check that the server is running and the database URL (`analysisctl config show`) is right, "
        "then run the command again"
    )


class CommandGroup(TyperGroup):
    """The root command group: turns expected errors into a message and an exit code.

    ``ServiceError`` subclasses carry their exit code (``supervisor.errors``).
    A connection lost in the middle of a command exits like
    ``DatabaseUnavailable``, and a privilege error from the server that the
    store did not translate exits like ``PermissionDenied``. Other exceptions
    are bugs and keep their traceback.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServiceError as error:
            print_error(error.message, ctx)
            raise typer.Exit(error.exit_code) from None
        except (sa.exc.OperationalError, sa.exc.InterfaceError, psycopg.OperationalError) as error:
            converted = database_error(error)
            print_error(converted.message, ctx)
            raise typer.Exit(converted.exit_code) from None
        except (sa.exc.DBAPIError, psycopg.errors.InsufficientPrivilege) as error:
            if not access.is_permission_error(error):
                raise
            denied = access.permission_denied(error)
            print_error(denied.message, ctx)
            raise typer.Exit(denied.exit_code) from None
        except alembic.util.CommandError as error:
            # Raised by the schema check for a revision that this version's
            # migrations do not contain, as after a newer version migrated.
            print_error(f"cannot check the database schema: {error}; if a newer version of analysis-jobs "
                        "migrated this database, upgrade analysis-jobs", ctx)
            raise typer.Exit(SchemaOutOfDate.exit_code) from None


def setting_help(name: str, extra: str = "") -> str:
    """Return option help text for a setting, taken from ``supervisor.config.SETTINGS``."""
    setting = next(setting for setting in config_module.SETTINGS if setting.name == name)
    text = setting.help
    if name.endswith("_seconds") and "second" not in text:
        text += ", in seconds"
    text = text[0].upper() + text[1:]
    if setting.default is not None:
        text += f". Default: {setting.default}"
    if extra:
        text += f". {extra.rstrip('.')}"
    return text + "."


def setting_metavar(name: str) -> str:
    """Return the placeholder shown in help for a setting's value, which names its unit."""
    setting = next(setting for setting in config_module.SETTINGS if setting.name == name)
    if name.endswith("_seconds"):
        return "SECONDS"
    if name.endswith("_ms"):
        return "MILLISECONDS"
    if name.endswith("_bytes"):
        return "BYTES"
    if setting.kind is Path:
        return "DIR"
    if setting.kind is int:
        return "N"
    return "VALUE"


def setting_option(name: str, *flags: str, extra: str = "", **kwargs: Any) -> Any:
    """Return a ``typer.Option`` for a setting, read also from its ``ANALYSIS_*`` variable."""
    kwargs.setdefault("metavar", setting_metavar(name))
    return typer.Option(
        *flags,
        help=setting_help(name, extra),
        envvar=config_module.env_name(name),
        show_envvar=True,
        show_default=False,
        **kwargs,
    )


def require_one_of(values: dict[str, Any]) -> None:
    """Raise a usage error when more than one of the mutually exclusive options is given."""
    present = [name for name, value in values.items() if value not in (None, False)]
    if len(present) > 1:
        raise typer.BadParameter(f"{' and '.join(present)} cannot be used together; pass only one")

