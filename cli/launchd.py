"""launchctl for `analysisctl service`: the host check, the commands and the output of `launchctl print`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cli import service_definition as definition
from cli.service_definition import ServiceSpec
from supervisor.errors import ServiceManagerFailed, ServiceManagerUnavailable

# launchctl print and bootout wait for the service; bootout waits up to its ExitTimeOut.
LAUNCHCTL_TIMEOUT_SECONDS = 120


def launchctl_path() -> str | None:
    """Return the launchctl executable, or None on a host without launchd."""
    if sys.platform != "darwin":
        return None
    return shutil.which("launchctl")


def require_launchctl() -> str:
    """Return the launchctl executable, or raise ``ServiceManagerUnavailable``."""
    launchctl = launchctl_path()
    if launchctl is None:
        reason = f"this is {sys.platform}, not macOS" if sys.platform != "darwin" else "launchctl is not on PATH"
        raise ServiceManagerUnavailable(
            f"launchd is not available on this host ({reason}); nothing was changed. "
            "`analysisctl service install --dry-run` prints the plist, and "
            "`analysisctl service install --systemd --dry-run` a systemd unit for Linux"
        )
    return launchctl


def run_launchctl(launchctl: str, arguments: list[str]) -> subprocess.CompletedProcess:
    """Run launchctl and raise ``ServiceManagerFailed`` with its output when it fails."""
    command = [launchctl, *arguments]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCHCTL_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServiceManagerFailed(f"`{shlex.join(command)}` failed: {error}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or "no output"
        raise ServiceManagerFailed(f"`{shlex.join(command)}` failed with exit code {result.returncode}: {detail}")
    return result


def launchctl_print(launchctl: str, target: str) -> str | None:
    """Return ``launchctl print`` output for ``target``, or None when no such service is loaded."""
    try:
        result = subprocess.run([launchctl, "print", target], capture_output=True, text=True,
                                timeout=LAUNCHCTL_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServiceManagerFailed(f"`launchctl print {target}` failed: {error}") from None
    return result.stdout if result.returncode == 0 else None


def is_loaded(launchctl: str, target: str) -> bool:
    return launchctl_print(launchctl, target) is not None


def install_commands(spec: ServiceSpec, destination: Path, loaded: bool) -> list[list[str]]:
    """Return the launchctl commands that start the service from ``destination``.

    ``enable`` comes first because bootstrap fails for a service that was
    disabled before. A service that is loaded already is not bootstrapped
    again, which launchctl rejects; kickstart -k then restarts it.
    """
    target = definition.launchd_service_target(spec.kind, spec.account)
    commands = [["enable", target]]
    if not loaded:
        commands.append(["bootstrap", definition.launchd_domain(spec.kind, spec.account), str(destination)])
    commands.append(["kickstart", "-k", target])
    return commands


def parse_launchctl_print(text: str) -> dict[str, str]:
    """Return the top-level ``key = value`` fields of ``launchctl print`` output.

    The format is meant for people and may change between macOS versions,
    so fields that are missing are left out rather than guessed.
    """
    fields = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\t([^\t=][^=]*?) = (.*)", line)
        if match and match.group(2) != "{":
            fields.setdefault(match.group(1), match.group(2).strip())
    return fields
