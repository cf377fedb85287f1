"""``analysisctl service``: run the supervisor as a launchd service, and inspect or remove it.

``install`` renders the plist for the ``analysisctl`` of this virtual
environment, validates it, writes it where launchd loads it at boot (daemon)
or login (agent), then enables, loads and starts it with launchctl. On a host
without launchd every command except ``install --dry-run`` exits with
``ServiceManagerUnavailable`` (7) and changes nothing. ``--systemd --dry-run``
prints a systemd unit for Linux hosts instead.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import launchd, log_tail, output
from cli.common import EXIT_INTERRUPTED, EXIT_NOT_SUCCEEDED, current_user, load_settings, require_one_of
from cli import service_definition as definition
from cli.service_definition import Account, Kind, ServiceSpec
from supervisor import config as config_module
from supervisor.errors import InvalidOption, InvalidRequest

# `launchctl print` fields shown by `service status`, in this order.
STATUS_FIELDS = ("state", "pid", "last exit code", "last terminating signal", "runs", "path")

SERVICE_EPILOG = """\
Examples:

  analysisctl service install --dry-run

  sudo .venv/bin/analysisctl service install --daemon --user analysis \\
      --database-url-file /Users/analysis/.config/analysis-jobs/database-url

  analysisctl service status

  analysisctl service logs --follow

launchd/README.md in the source tree explains every value of the plist.
"""

service_app = typer.Typer(help="Run the supervisor as a launchd service, or print a systemd unit.",
                          no_args_is_help=True, epilog=SERVICE_EPILOG)


# Input -------------------------------------------------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


def choose_kind(agent: bool, daemon: bool, systemd: bool) -> Kind | None:
    """Return the kind the flags name, or None when none was given."""
    require_one_of({"--agent": agent, "--daemon": daemon, "--systemd": systemd})
    if daemon:
        return Kind.DAEMON
    if systemd:
        return Kind.SYSTEMD
    return Kind.AGENT if agent else None


def current_account() -> Account:
    entry = pwd.getpwuid(os.getuid())
    return Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=Path(entry.pw_dir))


def resolve_account(kind: Kind, user: str | None, *, dry_run: bool = False) -> Account:
    """Return the account the service runs as, or raise ``InvalidOption`` naming the fix.

    A dry run renders for another machine too: an account unknown here
    then gets a warning and the macOS home folder of that name.
    """
    if kind is Kind.AGENT:
        if user is not None:
            raise InvalidOption("--user", "an agent runs as the user who installs it; --user applies to "
                                          "--daemon and --systemd only")
        if is_root() and os.environ.get("SUDO_USER"):
            raise InvalidOption("--agent", "an agent belongs to the logged-in user: run the command without "
                                           "sudo, or pass --daemon to run the supervisor without anyone logged in")
        return current_account()
    name = user or (os.environ.get("SUDO_USER") if is_root() else None) or current_user()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if dry_run:
            typer.echo(f"warning: no user named {name!r} on this host; rendering for an account of that name "
                       f"with home folder /Users/{name}", err=True)
            return Account(name=name, uid=-1, gid=-1, home=Path("/Users") / name)
        raise InvalidOption("--user", f"no user named {name!r} on this host; create the account first, or pass "
                                      "an existing one") from None
    if entry.pw_uid == 0 and user is None:
        raise InvalidOption("--user", "the supervisor would run as root; pass --user NAME with the account it "
                                      "should run as, or --user root to confirm (services should not run as "
                                      "root, and under root the embedded Postgres runs as a separate system "
                                      "user)")
    return Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=Path(entry.pw_dir))


def absolute_path(path: Path, option: str) -> Path:
    """Return ``path`` with ``~`` expanded, or raise ``InvalidOption`` when it is relative."""
    expanded = path.expanduser()
    if not expanded.is_absolute():
        raise InvalidOption(option, f"{str(path)!r} is a relative path, but the service does not start in this "
                                    f"folder; pass an absolute path such as {Path.cwd() / expanded}")
    return expanded


def analysisctl_program() -> Path:
    """Return the ``analysisctl`` script of this virtual environment, next to its Python."""
    program = Path(os.path.abspath(sys.executable)).parent / "analysisctl"
    if not program.is_file() or not os.access(program, os.X_OK):
        raise InvalidRequest(
            f"no analysisctl script next to {sys.executable} (in {sys.prefix}); install analysis-jobs into "
            "this virtual environment (`pip install .`) and run its analysisctl"
        )
    return program


def check_url_file_owner(path: Path, account: Account) -> None:
    """Raise unless ``account`` owns ``path``: a file only its owner may read must belong to the service user."""
    owner_uid = path.stat().st_uid
    if owner_uid == account.uid:
        return
    try:
        owner = pwd.getpwuid(owner_uid).pw_name
    except KeyError:
        owner = f"uid {owner_uid}"
    raise InvalidOption("--database-url-file", f"{path} belongs to {owner}, but the service runs as "
                                               f"{account.name} and could not read it; run "
                                               f"`chown {account.name} {path}`")


def build_spec(ctx: typer.Context, kind: Kind, user: str | None, database_url_file: Path | None,
               shutdown_grace_seconds: float | None, log_dir: Path | None, *, dry_run: bool = False) -> ServiceSpec:
    """Check the options and return what the service will run; nothing is changed."""
    account = resolve_account(kind, user, dry_run=dry_run)
    installer_settings = load_settings(ctx)
    if installer_settings.data_dir is not None:
        data_dir = absolute_path(installer_settings.data_dir, "--data-dir")
    elif kind is Kind.AGENT:
        data_dir = config_module.default_data_dir()
    else:
        data_dir = config_module.default_data_dir(home=account.home)
    url_file = database_url_file or installer_settings.database_url_file
    if url_file is not None:
        url_file = absolute_path(url_file, "--database-url-file")
        config_module.read_database_url_file(url_file, "--database-url-file")
        check_url_file_owner(url_file, account)
    elif installer_settings.sources["database_url"] in (config_module.env_name("database_url"), "flag"):
        typer.echo("note: the service does not get database_url from this shell, so that no password sits in "
                   "the plist; pass --database-url-file FILE to use that database", err=True)

    # The settings the service will see: its data folder's config.toml and the variables of the plist.
    service_environ = {config_module.env_name("data_dir"): str(data_dir)}
    if url_file is not None:
        service_environ[config_module.env_name("database_url_file")] = str(url_file)
    service_settings = config_module.load(service_environ).replace(shutdown_grace_seconds=shutdown_grace_seconds)

    return ServiceSpec(
        kind=kind,
        program=analysisctl_program(),
        account=account,
        data_dir=data_dir,
        log_dir=absolute_path(log_dir, "--log-dir") if log_dir else definition.default_log_dir(kind, account),
        shutdown_grace_seconds=service_settings.shutdown_grace_seconds,
        database_url_file=url_file,
    )


def render(spec: ServiceSpec) -> bytes:
    """Return the plist (or unit) of ``spec``, validated; raise ``InvalidRequest`` if it is invalid."""
    try:
        if spec.kind is Kind.SYSTEMD:
            return definition.render_unit(spec).encode()
        content = definition.plist_bytes(definition.render_plist(spec))
        definition.validate_plist(content)
    except ValueError as error:
        raise InvalidRequest(f"cannot render the service definition: {error}") from None
    return content


def compare_existing(destination: Path, content: bytes) -> str | None:
    """Return None when ``destination`` is missing, "identical", or raise ``InvalidRequest`` when it differs."""
    try:
        existing = destination.read_bytes()
    except FileNotFoundError:
        return None
    if existing == content:
        return "identical"
    fix = ("run `analysisctl service uninstall` first, then install again; "
           "`analysisctl service install --dry-run` prints the new one")
    try:
        old = plistlib.loads(existing)
    except definition.PLIST_ERRORS:
        raise InvalidRequest(f"{destination} exists and is not a valid plist; move it away or {fix}") from None
    new = plistlib.loads(content)
    changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key)) or ["formatting"]
    raise InvalidRequest(f"{destination} exists and differs from the plist this command renders "
                         f"(changed: {', '.join(changed)}); nothing was changed. To replace it, {fix}")


def check_parent_folders(spec: ServiceSpec, destination: Path) -> None:
    """Raise unless the folders that install creates have existing parents."""
    for folder, option in ((spec.data_dir, "--data-dir"), (spec.log_dir, "--log-dir"),
                           (destination.parent, "--install-dir")):
        if not folder.exists() and not folder.parent.is_dir():
            raise InvalidOption(option, f"cannot create {folder}: its parent folder {folder.parent} does not "
                                        "exist; create it, or pass another folder")


# Changes -------------------------------------------------------------------------------


def make_folder(folder: Path, mode: int, owner: Account | None) -> None:
    """Create ``folder`` (not its parents) unless it exists, owned by ``owner`` when given."""
    try:
        folder.mkdir(mode=mode)
    except FileExistsError:
        return
    if owner is not None:
        os.chown(folder, owner.uid, owner.gid)


def prepare_folders(spec: ServiceSpec) -> None:
    """Create the data and log folders and empty log files, owned by a daemon's user.

    Creating the log files here means they belong to the service user from
    the start, so the supervisor can reopen them after log rotation.
    """
    owner = spec.account if spec.kind is Kind.DAEMON and is_root() else None
    make_folder(spec.data_dir, 0o700, owner)
    make_folder(spec.log_dir, 0o755, owner)
    for path in (spec.log_path, spec.stdout_path):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            continue
        os.close(descriptor)
        if owner is not None:
            os.chown(path, owner.uid, owner.gid)


def write_definition(destination: Path, content: bytes) -> None:
    """Write ``destination`` atomically with mode 0644, which launchd requires: no group or other write."""
    destination.parent.mkdir(mode=0o755, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(content)
        temporary.chmod(0o644)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


# install --------------------------------------------------------------------------------

INSTALL_EPILOG = """\
Examples:

  analysisctl service install --dry-run

  analysisctl service install --agent

  sudo .venv/bin/analysisctl service install --daemon --user analysis \\
      --database-url-file /Users/analysis/.config/analysis-jobs/database-url

  analysisctl service install --systemd --user analysis --dry-run

An agent runs while its user is logged in; a daemon runs from boot, without
anyone logged in, as --user (default: the user who ran sudo). The plist runs
this virtual environment's analysisctl and sets ANALYSIS_DATA_DIR,
ANALYSIS_SHUTDOWN_GRACE_SECONDS and, with --database-url-file,
ANALYSIS_DATABASE_URL_FILE; a database URL itself is never written into it.
Other settings come from config.toml in the data folder.

--dry-run prints the plist (or unit) on stdout, and its destination and the
commands that install would run on stderr; it changes nothing and works on
any host. Without launchd, install exits with 7 and changes nothing. An
existing plist that differs stops the install (exit 4): uninstall first.
"""


@service_app.command("install", epilog=INSTALL_EPILOG)
def install(
    ctx: typer.Context,
    agent: Annotated[bool, typer.Option("--agent", help="Install a LaunchAgent for the current user (default).")]
    = False,
    daemon: Annotated[bool, typer.Option("--daemon", help="Install a LaunchDaemon that runs as --user; needs root.")]
    = False,
    systemd: Annotated[bool, typer.Option("--systemd", help="Print a systemd unit for Linux; needs --dry-run.")]
    = False,
    user: Annotated[str | None, typer.Option(
        "--user", metavar="NAME", help="Account a daemon or systemd unit runs as. Default: SUDO_USER under sudo, "
                                       "else the current user.")] = None,
    database_url_file: Annotated[Path | None, typer.Option(
        "--database-url-file", metavar="FILE",
        help="Absolute path of a file with the database URL, owned by the service user with mode 600. "
             "Default: the configured database_url_file.", dir_okay=False)] = None,
    shutdown_grace_seconds: Annotated[float | None, typer.Option(
        "--shutdown-grace-seconds", metavar="SECONDS", min=0,
        help="Shutdown grace the service uses, in seconds; ExitTimeOut allows this plus "
             f"{definition.STOP_MARGIN_SECONDS}. Default: shutdown_grace_seconds of the service's config.toml, "
             f"else {config_module.SHUTDOWN_GRACE_SECONDS_DEFAULT:g}.")] = None,
    install_dir: Annotated[Path | None, typer.Option(
        "--install-dir", metavar="DIR", file_okay=False,
        help="Folder for the plist. Default: ~/Library/LaunchAgents (agent), /Library/LaunchDaemons (daemon), "
             "/etc/systemd/system (systemd); launchd reads only the defaults at boot and login.")] = None,
    log_dir: Annotated[Path | None, typer.Option(
        "--log-dir", metavar="DIR", file_okay=False,
        help="Folder for the log files. Default: ~/Library/Logs/analysis-jobs (agent), "
             "/Library/Logs/analysis-jobs (daemon).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plist, its destination and the launchctl commands; change nothing.")]
    = False,
) -> None:
    """Install and start the supervisor as a launchd service of this virtual environment."""
    kind = choose_kind(agent, daemon, systemd) or Kind.AGENT
    if kind is Kind.SYSTEMD and not dry_run:
        raise InvalidOption("--systemd", "installing a systemd unit is not automated: run with --dry-run, save "
                                         "the unit it prints and run the commands it lists")
    launchctl = None if dry_run else launchd.require_launchctl()

    spec = build_spec(ctx, kind, user, database_url_file, shutdown_grace_seconds, log_dir, dry_run=dry_run)
    content = render(spec)
    folder = absolute_path(install_dir, "--install-dir") if install_dir else definition.default_install_dir(
        kind, spec.account)
    destination = folder / definition.definition_file_name(kind)

    if dry_run:
        print_dry_run(spec, content, destination)
        return

    assert launchctl is not None
    if kind is Kind.DAEMON and not is_root():
        raise InvalidOption("--daemon", f"installing a LaunchDaemon needs root: run `sudo {spec.program} service "
                                        f"install --daemon --user {spec.account.name}`")
    existing = compare_existing(destination, content)
    check_parent_folders(spec, destination)
    target = definition.launchd_service_target(kind, spec.account)
    loaded = launchd.is_loaded(launchctl, target)

    prepare_folders(spec)
    if existing is None:
        write_definition(destination, content)
        typer.echo(f"wrote {destination}")
    else:
        typer.echo(f"{destination} is already installed")
    for arguments in launchd.install_commands(spec, destination, loaded):
        launchd.run_launchctl(launchctl, arguments)
        typer.echo(f"ran: {shlex.join(['launchctl', *arguments])}")
    typer.echo(f"the supervisor runs as {target} (user {spec.account.name}); "
               f"its log is {spec.log_path}; `analysisctl service status` shows its state")


def print_dry_run(spec: ServiceSpec, content: bytes, destination: Path) -> None:
    """Print the definition on stdout, and its destination and the commands on stderr."""
    typer.echo(content.decode(), nl=False)
    try:
        existing = compare_existing(destination, content)
    except InvalidRequest as conflict:
        typer.echo(f"install would stop: {conflict.message}", err=True)
        existing = "different"
    if existing is None:
        typer.echo(f"would write {destination}", err=True)
    elif existing == "identical":
        typer.echo(f"{destination} exists and is identical; install would leave it", err=True)
    if spec.kind is Kind.SYSTEMD:
        name = definition.SYSTEMD_UNIT_NAME
        for command in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", name]):
            typer.echo(f"then run: {shlex.join(command)}", err=True)
        return
    launchctl = launchd.launchctl_path()
    target = definition.launchd_service_target(spec.kind, spec.account)
    loaded = launchctl is not None and launchd.is_loaded(launchctl, target)
    for arguments in launchd.install_commands(spec, destination, loaded):
        typer.echo(f"would run: {shlex.join(['launchctl', *arguments])}", err=True)


# uninstall, status, logs ---------------------------------------------------------------


def locate(kind: Kind | None, install_dir: Path | None) -> tuple[Kind, Path] | None:
    """Return the kind and plist path of the installed service, or None when no plist is found.

    Without ``kind`` the default folders of both an agent and a daemon are searched.
    """
    if kind is Kind.SYSTEMD:
        raise InvalidOption("--systemd", "only `service install --dry-run` supports --systemd; use systemctl "
                                         f"and journalctl -u {definition.SYSTEMD_UNIT_NAME} for a systemd unit")
    account = current_account()
    if install_dir is not None and kind is None:
        raise InvalidOption("--install-dir", "pass --agent or --daemon with it")
    kinds = [kind] if kind is not None else [Kind.AGENT, Kind.DAEMON]
    candidates = []
    for candidate in kinds:
        folder = absolute_path(install_dir, "--install-dir") if install_dir else definition.default_install_dir(
            candidate, account)
        candidates.append((candidate, folder / definition.definition_file_name(candidate)))
    present = [candidate for candidate in candidates if candidate[1].exists()]
    if len(present) > 1:
        raise InvalidOption("--agent/--daemon", f"both an agent ({present[0][1]}) and a daemon "
                                                f"({present[1][1]}) are installed; pass --agent or --daemon")
    if present:
        return present[0]
    if kind is not None:
        return kind, candidates[0][1]
    return None


def not_installed_message(kind: Kind | None, install_dir: Path | None) -> str:
    account = current_account()
    kinds = [kind] if kind is not None else [Kind.AGENT, Kind.DAEMON]
    paths = [str((install_dir or definition.default_install_dir(candidate, account))
                 / definition.definition_file_name(candidate)) for candidate in kinds]
    return f"the service is not installed: no plist at {' or '.join(paths)}"


KIND_OPTIONS_HELP = "Default: whichever of the two is installed."


@service_app.command("uninstall", epilog="Examples:\n\n  analysisctl service uninstall\n\n"
                                         "  sudo .venv/bin/analysisctl service uninstall --daemon\n\n"
                                         "launchd sends SIGTERM, so running jobs are re-queued before the "
                                         "supervisor exits. The log files stay.")
def uninstall(
    agent: Annotated[bool, typer.Option("--agent", help=f"Remove the LaunchAgent. {KIND_OPTIONS_HELP}")] = False,
    daemon: Annotated[bool, typer.Option("--daemon", help="Remove the LaunchDaemon; needs root.")] = False,
    install_dir: Annotated[Path | None, typer.Option(
        "--install-dir", metavar="DIR", file_okay=False, help="Folder of the plist, if not the default.")] = None,
) -> None:
    """Stop the service, unload it from launchd and delete its plist."""
    launchctl = launchd.require_launchctl()
    kind = choose_kind(agent, daemon, False)
    located = locate(kind, install_dir)
    if located is None:
        typer.echo(not_installed_message(kind, install_dir) + "; nothing to uninstall")
        return
    kind, path = located
    if kind is Kind.DAEMON and not is_root():
        raise InvalidOption("--daemon", "removing a LaunchDaemon needs root: run the command with sudo")
    target = definition.launchd_service_target(kind, current_account())
    loaded = launchd.is_loaded(launchctl, target)
    if not loaded and not path.exists():
        typer.echo(not_installed_message(kind, install_dir) + f" and {target} is not loaded; nothing to uninstall")
        return
    if loaded:
        launchd.run_launchctl(launchctl, ["bootout", target])
        typer.echo(f"ran: launchctl bootout {target}")
    if path.exists():
        path.unlink()
        typer.echo(f"deleted {path}")


STATUS_EPILOG = """\
Examples:

  analysisctl service status

  analysisctl service status --json

Shows the state, pid and last exit code from `launchctl print`. Exits 0
when the service is loaded and 1 when it is not. A last exit code of 2
means invalid configuration, 5 database unavailable and 6 schema out of
date; `analysisctl service logs` shows the details.
"""


@service_app.command("status", epilog=STATUS_EPILOG)
def status(
    agent: Annotated[bool, typer.Option("--agent", help=f"Show the LaunchAgent. {KIND_OPTIONS_HELP}")] = False,
    daemon: Annotated[bool, typer.Option("--daemon", help="Show the LaunchDaemon.")] = False,
    install_dir: Annotated[Path | None, typer.Option(
        "--install-dir", metavar="DIR", file_okay=False, help="Folder of the plist, if not the default.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")] = False,
) -> None:
    """Show whether the service is loaded and running, its pid and its last exit code."""
    launchctl = launchd.require_launchctl()
    kind = choose_kind(agent, daemon, False)
    located = locate(kind, install_dir)
    if located is None:
        if json_output:
            output.print_json({"loaded": False})
        else:
            typer.echo(not_installed_message(kind, install_dir))
        raise typer.Exit(EXIT_NOT_SUCCEEDED)
    kind, path = located
    target = definition.launchd_service_target(kind, current_account())
    printed = launchd.launchctl_print(launchctl, target)
    loaded = printed is not None
    fields = launchd.parse_launchctl_print(printed) if printed is not None else {}
    summary = {"service": target, "plist": str(path), "installed": path.exists(), "loaded": loaded,
               **{name: fields[name] for name in STATUS_FIELDS if name in fields},
               "log": str(read_log_path(kind, path))}
    if json_output:
        output.print_json(summary)
    else:
        for name, value in summary.items():
            typer.echo(f"{name}: {value}")
    if not loaded:
        raise typer.Exit(EXIT_NOT_SUCCEEDED)


def read_log_path(kind: Kind, plist_path: Path) -> Path:
    """Return StandardErrorPath of the installed plist, else the default log file for ``kind``."""
    try:
        path = plistlib.loads(plist_path.read_bytes()).get("StandardErrorPath")
    except (OSError, *definition.PLIST_ERRORS):
        path = None
    if isinstance(path, str) and path:
        return Path(path)
    return definition.default_log_dir(kind, current_account()) / definition.LOG_FILE_NAME


LOGS_EPILOG = """\
Examples:

  analysisctl service logs

  analysisctl service logs -n 200 | jq -r .message

  analysisctl service logs --follow

Prints the supervisor's log file (StandardErrorPath of the plist): one JSON
object per line. Ctrl-C stops --follow with exit code 130.
"""


@service_app.command("logs", epilog=LOGS_EPILOG)
def logs(
    agent: Annotated[bool, typer.Option("--agent", help=f"Read the LaunchAgent's log. {KIND_OPTIONS_HELP}")]
    = False,
    daemon: Annotated[bool, typer.Option("--daemon", help="Read the LaunchDaemon's log.")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines", metavar="N", min=0,
                                       help="Print the last N lines.")] = 20,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing lines as they are written.")]
    = False,
    install_dir: Annotated[Path | None, typer.Option(
        "--install-dir", metavar="DIR", file_okay=False, help="Folder of the plist, if not the default.")] = None,
) -> None:
    """Print the last lines of the service's log file, and with --follow the lines that follow."""
    kind = choose_kind(agent, daemon, False)
    located = locate(kind, install_dir)
    # With --agent or --daemon, locate returns the expected path even when no plist is there.
    if located is None or not located[1].exists():
        launchd.require_launchctl()
        raise InvalidRequest(not_installed_message(kind, install_dir) + "; `analysisctl service install` installs it")
    kind, plist_path = located
    log_path = read_log_path(kind, plist_path)
    try:
        handle = open(log_path, "rb")
    except FileNotFoundError:
        raise InvalidRequest(f"no log file at {log_path}: the service has not started yet; "
                             "`analysisctl service status` shows its state") from None
    except PermissionError:
        raise InvalidRequest(f"cannot read {log_path}: permission denied; run the command as the service user "
                             "or with sudo") from None
    stdout = sys.stdout.buffer
    with handle:
        for line in log_tail.tail_lines(handle, lines):
            stdout.write(line)
        stdout.flush()
        if not follow:
            return

        def write(data: bytes) -> None:
            stdout.write(data)
            stdout.flush()

        try:
            log_tail.follow_file(log_path, handle, write)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


def register(app: typer.Typer) -> None:
    app.add_typer(service_app, name="service")
