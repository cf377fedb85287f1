"""The supervisor as a service: the launchd plist and the systemd unit, rendered from Python data.

Both are built in code rather than from a template file, so an installed
package (``pip install .``, not only an editable install) renders them with
no data file. launchd/README.md explains each value.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import plistlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from xml.parsers.expat import ExpatError

from supervisor import config as config_module
from supervisor.worker import NATIVE_THREAD_VARIABLES

LABEL = "local.analysis-jobs.supervisor"
SYSTEMD_UNIT_NAME = "analysis-jobs.service"
# StandardErrorPath gets the JSON log lines; stdout stays apart so that
# anything printed there cannot break them.
LOG_FILE_NAME = "supervisor.log"
STDOUT_FILE_NAME = "supervisor.stdout.log"

# The supervisor runs at this nice value, and its workers lower their own
# priority by a further 10 (supervisor.pool), to 15.
NICE = 5
# At most one start per this many seconds after a failure (launchd
# ThrottleInterval, systemd RestartSec), on top of the supervisor's own
# start-up backoff.
RESTART_SECONDS = 30
# Time a stopping supervisor needs after the shutdown grace. It terminates
# the workers that ignored the grace (up to 2.5 s) and closes the pool (1 s).
# Then it re-queues their jobs and marks itself stopped in the database,
# which may be slow. The service manager sends SIGKILL only after the grace
# plus this margin.
STOP_MARGIN_SECONDS = 20
# Open files: database connections, the pipes to each worker, spool and
# result files. launchd's default soft limit is 256.
NUMBER_OF_FILES = 4096


class Kind(enum.StrEnum):
    """Service type: a launchd agent or daemon, or a systemd unit."""

    AGENT = "agent"
    DAEMON = "daemon"
    SYSTEMD = "systemd"


@dataclasses.dataclass(frozen=True)
class Account:
    """The user the service runs as."""

    name: str
    uid: int
    gid: int
    home: Path


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """Everything the plist and the unit contain; every path is absolute."""

    kind: Kind
    program: Path
    account: Account
    data_dir: Path
    log_dir: Path
    shutdown_grace_seconds: float
    database_url_file: Path | None = None

    @property
    def exit_timeout_seconds(self) -> int:
        """Seconds between SIGTERM and SIGKILL: longer than the shutdown grace."""
        return math.ceil(self.shutdown_grace_seconds) + STOP_MARGIN_SECONDS

    @property
    def log_path(self) -> Path:
        return self.log_dir / LOG_FILE_NAME

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / STDOUT_FILE_NAME

    @property
    def program_arguments(self) -> list[str]:
        return [str(self.program), "supervisor", "run"]

    def environment(self) -> dict[str, str]:
        """Return the service's environment variables; a database URL is never one of them.

        ANALYSIS_SHUTDOWN_GRACE_SECONDS is set so that the grace the
        supervisor uses is the one the exit timeout was computed from, even
        if the TOML file changes later.
        """
        environment = {name: "1" for name in NATIVE_THREAD_VARIABLES}
        environment[config_module.env_name("data_dir")] = str(self.data_dir)
        environment[config_module.env_name("shutdown_grace_seconds")] = format(self.shutdown_grace_seconds, "g")
        if self.database_url_file is not None:
            environment[config_module.env_name("database_url_file")] = str(self.database_url_file)
        return environment


# launchd -----------------------------------------------------------------------


def render_plist(spec: ServiceSpec) -> dict[str, Any]:
    """Return the launchd job definition of ``spec`` as plist data."""
    if spec.kind is Kind.SYSTEMD:
        raise ValueError("a systemd service has no plist; use render_unit")
    plist: dict[str, Any] = {
        "Label": LABEL,
        "ProgramArguments": spec.program_arguments,
        "EnvironmentVariables": spec.environment(),
        "WorkingDirectory": str(spec.data_dir),
        "RunAtLoad": True,
        # Restart after a non-zero exit or a crash, but not after the clean
        # exit 0 that follows SIGTERM.
        "KeepAlive": {"SuccessfulExit": False, "Crashed": True},
        "ThrottleInterval": RESTART_SECONDS,
        "ExitTimeOut": spec.exit_timeout_seconds,
        # Background would confine the supervisor and every worker to the
        # efficiency cores on Apple silicon.
        "ProcessType": "Standard",
        "Nice": NICE,
        "LowPriorityIO": True,
        "StandardOutPath": str(spec.stdout_path),
        "StandardErrorPath": str(spec.log_path),
        "SoftResourceLimits": {"NumberOfFiles": NUMBER_OF_FILES},
    }
    if spec.kind is Kind.DAEMON:
        plist["UserName"] = spec.account.name
    return plist


# Exceptions that plistlib.loads raises for content that is not a valid property list.
PLIST_ERRORS = (plistlib.InvalidFileException, ExpatError, ValueError)


def plist_bytes(plist: dict[str, Any]) -> bytes:
    """Return ``plist`` as an XML property list with sorted keys, so equal data give equal bytes."""
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=True)


def validate_plist(content: bytes) -> dict[str, Any]:
    """Parse ``content`` back and lint it with ``plutil`` where present; raise ``ValueError`` if invalid."""
    try:
        parsed = plistlib.loads(content, fmt=plistlib.FMT_XML)
    except PLIST_ERRORS as error:
        raise ValueError(f"the rendered plist does not parse: {error}") from error
    if plist_bytes(parsed) != content:
        raise ValueError("the rendered plist changes when parsed and written again")
    plutil = shutil.which("plutil")
    if plutil is not None:
        _lint_with_plutil(plutil, content)
    return parsed


def _lint_with_plutil(plutil: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="analysis-jobs-plist-") as folder:
        path = Path(folder) / f"{LABEL}.plist"
        path.write_bytes(content)
        result = subprocess.run([plutil, "-lint", str(path)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        detail = (result.stdout + result.stderr).strip()
        raise ValueError(f"plutil -lint rejected the rendered plist: {detail}")


# systemd -----------------------------------------------------------------------


def render_unit(spec: ServiceSpec) -> str:
    """Return a systemd unit that runs ``spec`` as a system service under its account."""
    environment = [f"Environment={_unit_quote(f'{name}={value}', command=False)}"
                   for name, value in spec.environment().items()]
    exec_start = " ".join(_unit_quote(argument, command=True) for argument in spec.program_arguments)
    lines = [
        "# Rendered by `analysisctl service install --systemd --dry-run`.",
        "[Unit]",
        "Description=analysis-jobs supervisor: claims queued analysis jobs and runs them",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={_unit_escape(spec.account.name)}",
        f"WorkingDirectory={_unit_escape(str(spec.data_dir))}",
        f"ExecStart={exec_start}",
        *environment,
        # Restart after a non-zero exit or a crash, not after the exit 0 that follows SIGTERM.
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        "KillSignal=SIGTERM",
        # SIGTERM goes to the supervisor only, which stops its workers itself;
        # whatever is left when it exits or the timeout passes gets SIGKILL.
        "KillMode=mixed",
        f"TimeoutStopSec={spec.exit_timeout_seconds}",
        f"Nice={NICE}",
        "IOSchedulingClass=best-effort",
        "IOSchedulingPriority=7",
        f"LimitNOFILE={NUMBER_OF_FILES}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _unit_escape(text: str) -> str:
    """Escape systemd's specifier character; reject what a unit line cannot contain."""
    if any(character in text for character in "\n\r\0"):
        raise ValueError(f"{text!r} contains a line break or NUL, which a systemd unit line cannot contain")
    return text.replace("%", "%%")


def _unit_quote(word: str, *, command: bool) -> str:
    """Quote one word of ExecStart= (``command``) or Environment= for systemd's word splitting.

    Only ExecStart= expands ``$NAME``, so only there a dollar sign is doubled.
    """
    escaped = _unit_escape(word).replace("\\", "\\\\").replace('"', '\\"')
    if command:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"' if escaped != word or any(character.isspace() for character in word) else word


# Where files go ------------------------------------------------------------------


def default_install_dir(kind: Kind, account: Account) -> Path:
    """Return the folder the service manager loads the definition from at boot or login."""
    if kind is Kind.AGENT:
        return account.home / "Library" / "LaunchAgents"
    if kind is Kind.DAEMON:
        return Path("/Library/LaunchDaemons")
    return Path("/etc/systemd/system")


def default_log_dir(kind: Kind, account: Account) -> Path:
    """Return the folder for StandardOutPath and StandardErrorPath; a systemd unit logs to the journal."""
    if kind is Kind.DAEMON:
        return Path("/Library/Logs") / config_module.APP_NAME
    return account.home / "Library" / "Logs" / config_module.APP_NAME


def definition_file_name(kind: Kind) -> str:
    return SYSTEMD_UNIT_NAME if kind is Kind.SYSTEMD else f"{LABEL}.plist"


def launchd_domain(kind: Kind, account: Account) -> str:
    """Return the launchctl domain target: the user's GUI session for an agent, the system for a daemon."""
    return f"gui/{account.uid}" if kind is Kind.AGENT else "system"


def launchd_service_target(kind: Kind, account: Account) -> str:
    return f"{launchd_domain(kind, account)}/{LABEL}"


def example_spec() -> ServiceSpec:
    """Return the daemon spec behind launchd/example-daemon.plist, with placeholder paths."""
    account = Account(name="analysis", uid=501, gid=20, home=Path("/Users/analysis"))
    return ServiceSpec(
        kind=Kind.DAEMON,
        program=Path("/Users/analysis/analysis-jobs/.venv/bin/analysisctl"),
        account=account,
        data_dir=Path("/Users/analysis/Library/Application Support") / config_module.APP_NAME,
        log_dir=default_log_dir(Kind.DAEMON, account),
        shutdown_grace_seconds=config_module.SHUTDOWN_GRACE_SECONDS_DEFAULT,
        database_url_file=Path("/Users/analysis/.config/analysis-jobs/database-url"),
    )
