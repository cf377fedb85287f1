"""Settings of the service, read from defaults, a TOML file, the environment and flags.

Later sources win: a flag beats ``ANALYSIS_*`` environment variables, which
beat the TOML file (``ANALYSIS_CONFIG``, else ``<data dir>/config.toml``),
which beats the defaults below. Every setting records where its value came
from, and ``analysisctl config show`` prints it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

from supervisor.errors import ConfigError

ENV_PREFIX = "ANALYSIS_"
APP_NAME = "analysis-jobs"

# Lease and heartbeat: a supervisor renews every HEARTBEAT seconds, so a lease
# of LEASE seconds survives two missed renewals before another supervisor may
# recover the job.
LEASE_SECONDS_DEFAULT = 30.0
HEARTBEAT_SECONDS_DEFAULT = 5.0
# The fallback poll when a LISTEN notification is lost; a lost notification
# costs at most this long.
POLL_SECONDS_DEFAULT = 1.0
CANCEL_GRACE_SECONDS_DEFAULT = 10.0
# A stopping supervisor must re-queue its jobs before its service manager
# sends SIGKILL: the plist and unit that `analysisctl service install`
# renders allow this grace plus 20 s (cli/service_definition.py).
SHUTDOWN_GRACE_SECONDS_DEFAULT = 10.0
PROGRESS_INTERVAL_SECONDS_DEFAULT = 0.5
WORKER_START_TIMEOUT_SECONDS_DEFAULT = 60.0
# Parameters are stored in job rows. A list of a few thousand sensor ids is
# about 100 KB, so 256 KiB leaves room without letting rows grow unbounded.
MAX_PARAMS_BYTES_DEFAULT = 256 * 1024
STATEMENT_TIMEOUT_MS_DEFAULT = 30_000
IDLE_IN_TRANSACTION_TIMEOUT_MS_DEFAULT = 60_000
RETRY_BASE_SECONDS_DEFAULT = 2.0
RETRY_MAX_SECONDS_DEFAULT = 300.0


def default_data_dir(home: Path | None = None) -> Path:
    """Return the per-user folder for the embedded database and result files.

    With ``home``, return the folder of the user whose home folder that is;
    ``XDG_DATA_HOME`` of the current environment is then ignored.
    """
    if sys.platform == "darwin":
        return (home or Path.home()) / "Library" / "Application Support" / APP_NAME
    xdg = os.environ.get("XDG_DATA_HOME") if home is None else None
    return (Path(xdg) if xdg else (home or Path.home()) / ".local" / "share") / APP_NAME


def default_workers() -> int:
    """Return the number of worker slots the machine can give.

    On Apple silicon this is the performance-core count: ``os.cpu_count()``
    and psutil include the efficiency cores, which are much slower for
    numeric work. Elsewhere it is the number of CPUs this process may use.
    """
    if sys.platform == "darwin" and platform.machine() == "arm64":
        import subprocess

        try:
            output = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout
            return max(1, int(output.strip()))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def max_workers() -> int:
    """Return the largest worker count accepted: 4 per CPU, so a typo cannot start thousands of processes."""
    return 4 * max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    kind: type
    default: Any
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("database_url", str, None,
            "Postgres URL (postgresql://user@host:port/db); unset starts an embedded server", secret=True),
    Setting("database_url_file", Path, None,
            "file containing the Postgres URL on one line, readable only by its owner (chmod 600); "
            "use instead of database_url to keep a password out of the environment"),
    Setting("data_dir", Path, None, "folder for the embedded database and result files"),
    Setting("results_dir", Path, None, "folder for result files (default: <data dir>/results)"),
    Setting("workers", int, None, "worker processes (default: performance cores, else usable CPUs)"),
    Setting("lease_seconds", float, LEASE_SECONDS_DEFAULT, "how long a claim stays valid without renewal"),
    Setting("heartbeat_seconds", float, HEARTBEAT_SECONDS_DEFAULT, "interval between lease renewals"),
    Setting("poll_seconds", float, POLL_SECONDS_DEFAULT, "interval between polls for work without notifications"),
    Setting("cancel_grace_seconds", float, CANCEL_GRACE_SECONDS_DEFAULT,
            "time a cancelled job gets to stop before its process is terminated"),
    Setting("shutdown_grace_seconds", float, SHUTDOWN_GRACE_SECONDS_DEFAULT,
            "time running jobs get to stop on SIGTERM before they are terminated and re-queued"),
    Setting("progress_interval_seconds", float, PROGRESS_INTERVAL_SECONDS_DEFAULT,
            "minimum interval between progress writes per job"),
    Setting("worker_start_timeout_seconds", float, WORKER_START_TIMEOUT_SECONDS_DEFAULT,
            "time a new worker process gets to become ready"),
    Setting("max_jobs_per_worker", int, None, "recycle a worker process after this many jobs (default: never)"),
    Setting("max_params_bytes", int, MAX_PARAMS_BYTES_DEFAULT, "maximum size of a job's parameters as JSON"),
    Setting("statement_timeout_ms", int, STATEMENT_TIMEOUT_MS_DEFAULT, "Postgres statement_timeout"),
    Setting("idle_in_transaction_timeout_ms", int, IDLE_IN_TRANSACTION_TIMEOUT_MS_DEFAULT,
            "Postgres idle_in_transaction_session_timeout"),
    Setting("throttle_pause_cpu_percent", float, 85.0,
            "pause claims while other programs use more CPU than this, in percent of all CPUs "
            "(over 100 disables the CPU throttle)"),
    Setting("throttle_resume_cpu_percent", float, 65.0,
            "resume claims once other programs use less CPU than this, in percent"),
    Setting("retry_base_seconds", float, RETRY_BASE_SECONDS_DEFAULT, "first retry delay; doubles per attempt"),
    Setting("retry_max_seconds", float, RETRY_MAX_SECONDS_DEFAULT, "upper bound of the retry delay"),
)
_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective settings; ``sources`` maps each name to where its value came from.

    ``database_url_from_file`` is the URL read from ``database_url_file`` when
    the settings were loaded; ``effective_database_url`` is the one to use.
    """

    values: dict[str, Any]
    sources: dict[str, str]
    database_url_from_file: str | None = dataclasses.field(default=None, repr=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def effective_data_dir(self) -> Path:
        return Path(self.values["data_dir"] or default_data_dir())

    @property
    def effective_results_dir(self) -> Path:
        return Path(self.values["results_dir"] or self.effective_data_dir / "results")

    @property
    def effective_workers(self) -> int:
        return self.values["workers"] or default_workers()

    @property
    def effective_database_url(self) -> str | None:
        """The URL from ``database_url`` or ``database_url_file``; None means the embedded server."""
        return self.values["database_url"] or self.database_url_from_file

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with ``overrides`` applied as flags (``None`` means unset)."""
        values, sources = dict(self.values), dict(self.sources)
        for name, value in overrides.items():
            if value is None:
                continue
            values[name] = _convert(_BY_NAME[name], value, "flag")
            sources[name] = "flag"
        return _build(values, sources)


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    def invalid(reason: str) -> ConfigError:
        return ConfigError(f"invalid value {raw!r} for {setting.name} (from {source}): {reason}")

    if raw is None:
        return setting.default
    if raw == "":
        raise invalid("must not be empty (remove the setting to use its default)")
    try:
        if setting.kind is Path:
            return Path(raw).expanduser()
        # TOML booleans are ints in Python, and 2.5 workers is no number of workers.
        if isinstance(raw, bool) or (setting.kind is int and isinstance(raw, float)):
            raise ValueError
        value = setting.kind(raw)
    except (TypeError, ValueError):
        raise invalid(f"expected {setting.kind.__name__}") from None
    if setting.kind is float and not math.isfinite(value):
        raise invalid("must be a finite number")
    if setting.kind in (int, float) and value < 0:
        raise invalid("must be >= 0")
    return value


def _check(values: dict[str, Any], sources: dict[str, str]) -> None:
    def shown(name: str) -> str:
        return f"{name} = {values[name]} (from {sources[name]})"

    if values["workers"] is not None and values["workers"] < 1:
        raise ConfigError(f"invalid {shown('workers')}: must be at least 1")
    if values["workers"] is not None and values["workers"] > max_workers():
        raise ConfigError(
            f"invalid {shown('workers')}: at most {max_workers()} on this machine (4 per CPU); each worker is "
            "a process of about 100 MB, and more workers than CPUs only wait for each other"
        )
    for name in ("lease_seconds", "heartbeat_seconds", "poll_seconds"):
        if values[name] <= 0:
            raise ConfigError(f"invalid {shown(name)}: must be greater than 0")
    if values["heartbeat_seconds"] * 2 > values["lease_seconds"]:
        raise ConfigError(
            f"{shown('heartbeat_seconds')} must be at most half of {shown('lease_seconds')}, "
            "so one missed renewal does not lose the lease"
        )
    if values["throttle_resume_cpu_percent"] > values["throttle_pause_cpu_percent"]:
        raise ConfigError(
            f"{shown('throttle_resume_cpu_percent')} must not exceed {shown('throttle_pause_cpu_percent')}, "
            "or claims would pause and resume in quick succession"
        )
    if values["database_url"] is not None and values["database_url_file"] is not None:
        # The URL itself is not shown: it may contain a password.
        raise ConfigError(
            f"database_url (from {sources['database_url']}) and {shown('database_url_file')} are both set; "
            "remove one of them"
        )


def _build(values: dict[str, Any], sources: dict[str, str]) -> Config:
    """Check the settings, read the database URL file if one is set, and return the Config."""
    _check(values, sources)
    path = values["database_url_file"]
    url = read_database_url_file(path, sources["database_url_file"]) if path is not None else None
    return Config(values, sources, url)


def read_database_url_file(path: Path, source: str) -> str:
    """Return the database URL in ``path``, without surrounding whitespace.

    Like ssh with a private key, this rejects a file that group or others may
    access, because the URL usually contains a password. ``source`` names
    where the path came from, for the error message.
    """
    where = f"database_url_file {path} (from {source})"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(
            f"{where} not found; write the database URL into it and run `chmod 600 {path}`, "
            "or unset database_url_file"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{where} cannot be read: permission denied; run the command as the user that owns the file"
        ) from None
    except OSError as error:
        raise ConfigError(f"{where} cannot be opened: {error.strerror}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"{where} is not a regular file; point database_url_file at a file")
        if status.st_mode & 0o077:
            raise ConfigError(
                f"{where} is accessible by group or others (mode {stat.S_IMODE(status.st_mode):04o}), "
                f"but it holds the database password; run `chmod 600 {path}`"
            )
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            raw = handle.read()
    finally:
        os.close(descriptor)
    try:
        url = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text; write the database URL into it") from None
    if not url:
        raise ConfigError(
            f"{where} is empty; write the database URL into it, such as "
            "postgresql://user:password@host:5432/database"
        )
    if "\n" in url or "\r" in url:
        raise ConfigError(f"{where} contains more than one line; write only the database URL into it")
    return url


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load(environ: dict[str, str] | None = None, config_file: Path | None = None) -> Config:
    """Read the settings from defaults, the TOML file and the environment."""
    environ = dict(os.environ if environ is None else environ)
    values = {setting.name: setting.default for setting in SETTINGS}
    sources = {setting.name: "default" for setting in SETTINGS}

    path = config_file or (Path(environ["ANALYSIS_CONFIG"]) if environ.get("ANALYSIS_CONFIG") else None)
    if path is None:
        data_dir = environ.get(env_name("data_dir"))
        path = (Path(data_dir) if data_dir else default_data_dir()) / "config.toml"
        explicit = False
    else:
        explicit = True
    if path.exists() or explicit:
        for name, raw in _read_toml(path).items():
            values[name] = _convert(_BY_NAME[name], raw, str(path))
            sources[name] = str(path)

    for setting in SETTINGS:
        raw = environ.get(env_name(setting.name))
        if raw not in (None, ""):
            values[setting.name] = _convert(setting, raw, env_name(setting.name))
            sources[setting.name] = env_name(setting.name)
    return _build(values, sources)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found; unset ANALYSIS_CONFIG or create it") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from None
    unknown = sorted(set(document) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"configuration file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_BY_NAME))}"
        )
    return document
