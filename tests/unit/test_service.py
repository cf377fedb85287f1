"""The supervisor as a launchd service: plist and unit rendering, and `analysisctl service`.

No test runs the real launchctl or systemctl. Commands that would change the
system run against a fake launchctl script that records its arguments, with
every folder overridden to a temporary one.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import launchd, log_tail, service
from cli import service_definition as definition
from cli.main import app
from cli.service_definition import Account, Kind, ServiceSpec
from supervisor import config

REPOSITORY = Path(__file__).resolve().parents[2]
PROGRAM = Path(os.path.abspath(sys.executable)).parent / "analysisctl"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")
SECRET_URL = "postgresql://analysis:hunter2@127.0.0.1:5432/analysis"
# `launchctl print` output of a running service, trimmed from the format macOS prints.
PRINT_OUTPUT = """\
system/local.analysis-jobs.supervisor = {
\tactive count = 1
\tpath = /Library/LaunchDaemons/local.analysis-jobs.supervisor.plist
\ttype = LaunchDaemon
\tstate = running

\tprogram = /Users/analysis/analysis-jobs/.venv/bin/analysisctl
\targuments = {
\t\t/Users/analysis/analysis-jobs/.venv/bin/analysisctl
\t\tsupervisor
\t\trun
\t}

\truns = 3
\tpid = 4242
\tlast exit code = 5
}
"""


def user_name() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def make_spec(kind: Kind = Kind.DAEMON, grace: float = 10.0, url_file: Path | None = None) -> ServiceSpec:
    account = Account(name="analysis", uid=501, gid=20, home=Path("/Users/analysis"))
    return ServiceSpec(kind=kind, program=PROGRAM, account=account,
                       data_dir=Path("/Users/analysis/Library/Application Support/analysis-jobs"),
                       log_dir=Path("/Library/Logs/analysis-jobs"), shutdown_grace_seconds=grace,
                       database_url_file=url_file)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Data, plist and log folders under tmp_path; the plist folder exists and is empty."""
    paths = {"data": tmp_path / "data", "install": tmp_path / "install", "logs": tmp_path / "logs"}
    paths["install"].mkdir()
    return paths


@pytest.fixture
def runner(folders) -> CliRunner:
    return CliRunner(env={
        "ANALYSIS_DATA_DIR": str(folders["data"]), "ANALYSIS_DATABASE_URL": None,
        "ANALYSIS_DATABASE_URL_FILE": None, "ANALYSIS_CONFIG": None, "ANALYSIS_SHUTDOWN_GRACE_SECONDS": None,
        "SUDO_USER": None, "COLUMNS": "200",
    })


@pytest.fixture
def no_launchd(monkeypatch):
    """A host without launchd, whatever this one is."""
    monkeypatch.setattr(launchd, "launchctl_path", lambda: None)


class FakeLaunchctl:
    """A launchctl script that records its arguments and keeps a loaded flag in a folder."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.folder = folder
        self.calls_path = folder / "calls"
        self.path = folder / "launchctl"
        self.path.write_text(f"""#!/bin/sh
echo "$*" >> '{self.calls_path}'
if [ -f '{folder}/fail-'"$1" ]; then echo "$1 failed: 5: Input/output error" >&2; exit 5; fi
case "$1" in
    print)
        if [ -f '{folder}/loaded' ]; then cat '{folder}/print-output'; exit 0; fi
        echo 'Could not find service in domain' >&2; exit 113 ;;
    bootstrap) : > '{folder}/loaded' ;;
    bootout) rm -f '{folder}/loaded' ;;
esac
exit 0
""")
        self.path.chmod(0o755)
        (folder / "print-output").write_text(PRINT_OUTPUT)

    def calls(self) -> list[str]:
        return self.calls_path.read_text().splitlines() if self.calls_path.exists() else []

    def changing_calls(self) -> list[str]:
        return [call for call in self.calls() if not call.startswith("print ")]

    def fail(self, subcommand: str) -> None:
        (self.folder / f"fail-{subcommand}").touch()


@pytest.fixture
def launchctl(monkeypatch, tmp_path) -> FakeLaunchctl:
    fake = FakeLaunchctl(tmp_path / "fake-launchctl")
    monkeypatch.setattr(launchd, "launchctl_path", lambda: str(fake.path))
    return fake


def install_args(folders: dict[str, Path], *extra: str) -> list[str]:
    return ["service", "install", "--install-dir", str(folders["install"]), "--log-dir", str(folders["logs"]),
            *extra]


def plist_from(text: str) -> dict:
    return plistlib.loads(text.encode())


# Rendering ---------------------------------------------------------------------------


def test_plist_has_every_key():
    plist = definition.render_plist(make_spec())

    assert plist["Label"] == definition.LABEL
    assert plist["ProgramArguments"] == [str(PROGRAM), "supervisor", "run"]
    assert plist["UserName"] == "analysis"
    assert plist["WorkingDirectory"] == "/Users/analysis/Library/Application Support/analysis-jobs"
    assert plist["RunAtLoad"] is True
    assert plist["ThrottleInterval"] == definition.RESTART_SECONDS
    assert plist["ProcessType"] == "Standard"
    assert plist["Nice"] == definition.NICE
    assert plist["LowPriorityIO"] is True
    assert plist["StandardErrorPath"] == "/Library/Logs/analysis-jobs/supervisor.log"
    assert plist["StandardOutPath"] == "/Library/Logs/analysis-jobs/supervisor.stdout.log"
    assert plist["SoftResourceLimits"] == {"NumberOfFiles": definition.NUMBER_OF_FILES}


def test_plist_value_types():
    plist = definition.render_plist(make_spec())

    for key in ("Label", "UserName", "WorkingDirectory", "ProcessType", "StandardOutPath", "StandardErrorPath"):
        assert isinstance(plist[key], str), key
    for key in ("ThrottleInterval", "ExitTimeOut", "Nice"):
        assert type(plist[key]) is int, key
    for key in ("RunAtLoad", "LowPriorityIO"):
        assert type(plist[key]) is bool, key
    assert all(isinstance(argument, str) for argument in plist["ProgramArguments"])
    assert all(isinstance(name, str) and isinstance(value, str)
               for name, value in plist["EnvironmentVariables"].items())
    for key in ("WorkingDirectory", "StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).is_absolute(), key
    assert Path(plist["ProgramArguments"][0]).is_absolute()


def test_plist_keep_alive_is_dictionary():
    keep_alive = definition.render_plist(make_spec())["KeepAlive"]

    assert isinstance(keep_alive, dict)
    assert keep_alive["SuccessfulExit"] is False
    assert keep_alive["Crashed"] is True


def test_plist_environment_limits_threads():
    environment = definition.render_plist(make_spec())["EnvironmentVariables"]

    for name in THREAD_VARIABLES:
        assert environment[name] == "1", name
    assert environment["ANALYSIS_DATA_DIR"] == "/Users/analysis/Library/Application Support/analysis-jobs"
    assert environment["ANALYSIS_SHUTDOWN_GRACE_SECONDS"] == "10"
    assert "ANALYSIS_DATABASE_URL" not in environment
    assert "ANALYSIS_DATABASE_URL_FILE" not in environment


def test_plist_environment_names_url_file():
    environment = definition.render_plist(make_spec(url_file=Path("/etc/analysis/url")))["EnvironmentVariables"]

    assert environment["ANALYSIS_DATABASE_URL_FILE"] == "/etc/analysis/url"
    assert "ANALYSIS_DATABASE_URL" not in environment


@pytest.mark.parametrize("grace", [0.0, 0.5, 10.0, 12.5, 60.0, 600.0])
def test_exit_timeout_exceeds_grace(grace):
    plist = definition.render_plist(make_spec(grace=grace))

    assert plist["ExitTimeOut"] > grace
    assert plist["ExitTimeOut"] >= grace + definition.STOP_MARGIN_SECONDS
    assert plist["EnvironmentVariables"]["ANALYSIS_SHUTDOWN_GRACE_SECONDS"] == format(grace, "g")


def test_default_exit_timeout_beats_macos_default():
    # Recent macOS sends SIGKILL about 5 s after SIGTERM when ExitTimeOut is unset.
    plist = definition.render_plist(make_spec(grace=config.SHUTDOWN_GRACE_SECONDS_DEFAULT))

    assert plist["ExitTimeOut"] > config.SHUTDOWN_GRACE_SECONDS_DEFAULT > 5


def test_agent_plist_has_no_user_name():
    plist = definition.render_plist(make_spec(kind=Kind.AGENT))

    assert "UserName" not in plist
    assert plist["ProcessType"] == "Standard"


def test_plist_round_trip():
    plist = definition.render_plist(make_spec())
    content = definition.plist_bytes(plist)

    assert definition.validate_plist(content) == plist
    assert content.startswith(b"<?xml")


def test_validate_plist_rejects_broken_xml():
    with pytest.raises(ValueError, match="does not parse"):
        definition.validate_plist(b"<?xml version='1.0'?><plist><dict><key>Label</key></plist>")


def test_validate_plist_reports_plutil_failure(monkeypatch, tmp_path):
    plutil = tmp_path / "plutil"
    plutil.write_text("#!/bin/sh\necho \"$2: Encountered unknown tag\" >&2\nexit 1\n")
    plutil.chmod(0o755)
    monkeypatch.setattr(definition.shutil, "which", lambda name: str(plutil) if name == "plutil" else None)

    with pytest.raises(ValueError, match="plutil -lint rejected the rendered plist: .*unknown tag"):
        definition.validate_plist(definition.plist_bytes(definition.render_plist(make_spec())))


def test_validate_plist_passes_plutil(monkeypatch, tmp_path):
    plutil = tmp_path / "plutil"
    calls = tmp_path / "calls"
    plutil.write_text(f"#!/bin/sh\necho \"$*\" >> '{calls}'\necho \"$2: OK\"\n")
    plutil.chmod(0o755)
    monkeypatch.setattr(definition.shutil, "which", lambda name: str(plutil) if name == "plutil" else None)

    definition.validate_plist(definition.plist_bytes(definition.render_plist(make_spec())))

    assert calls.read_text().startswith("-lint ")


def test_example_plist_matches_rendering():
    example = REPOSITORY / "launchd" / "example-daemon.plist"
    rendered = definition.plist_bytes(definition.render_plist(definition.example_spec()))

    assert example.read_bytes() == rendered, (
        "launchd/example-daemon.plist is out of date; rewrite it with: .venv/bin/python -c 'import sys; "
        "from cli import service_definition as d; "
        "sys.stdout.buffer.write(d.plist_bytes(d.render_plist(d.example_spec())))' > launchd/example-daemon.plist"
    )


def test_unit_has_restart_and_stop_settings():
    unit = definition.render_unit(make_spec(kind=Kind.SYSTEMD, grace=45))
    lines = unit.splitlines()

    assert "Restart=on-failure" in lines
    assert "KillSignal=SIGTERM" in lines
    assert "KillMode=mixed" in lines
    assert f"Nice={definition.NICE}" in lines
    assert "User=analysis" in lines
    timeout = next(int(line.split("=", 1)[1]) for line in lines if line.startswith("TimeoutStopSec="))
    assert timeout > 45
    assert f"ExecStart={PROGRAM} supervisor run" in lines
    for name in THREAD_VARIABLES:
        assert f"Environment={name}=1" in lines, name


def test_unit_quotes_spaces_and_specifiers():
    spec = make_spec(kind=Kind.SYSTEMD, url_file=Path("/etc/analysis jobs/100%/url"))

    lines = definition.render_unit(spec).splitlines()

    assert 'Environment="ANALYSIS_DATABASE_URL_FILE=/etc/analysis jobs/100%%/url"' in lines
    assert "WorkingDirectory=/Users/analysis/Library/Application Support/analysis-jobs" in lines


def test_unit_command_doubles_dollar():
    assert definition._unit_quote("/opt/$HOME/analysisctl", command=True) == '"/opt/$$HOME/analysisctl"'
    assert definition._unit_quote("A=$HOME", command=False) == "A=$HOME"


def test_unit_rejects_line_break():
    spec = make_spec(kind=Kind.SYSTEMD, url_file=Path("/etc/url\nExecStartPre=/bin/false"))

    with pytest.raises(ValueError, match="line break"):
        definition.render_unit(spec)


def test_parse_launchctl_print_fields():
    fields = launchd.parse_launchctl_print(PRINT_OUTPUT)

    assert fields["state"] == "running"
    assert fields["pid"] == "4242"
    assert fields["last exit code"] == "5"
    assert fields["runs"] == "3"
    assert "arguments" not in fields


# install --dry-run -------------------------------------------------------------------------


def test_dry_run_agent(runner, folders):
    result = runner.invoke(app, install_args(folders, "--dry-run"))

    assert result.exit_code == 0, result.output
    plist = plist_from(result.stdout)
    assert plist["ProgramArguments"][0] == str(PROGRAM)
    assert Path(plist["ProgramArguments"][0]).is_relative_to(sys.prefix)
    assert plist["WorkingDirectory"] == str(folders["data"])
    assert plist["StandardErrorPath"] == str(folders["logs"] / "supervisor.log")
    assert "UserName" not in plist
    destination = folders["install"] / f"{definition.LABEL}.plist"
    assert f"would write {destination}" in result.stderr
    target = f"gui/{os.getuid()}/{definition.LABEL}"
    assert f"would run: launchctl enable {target}" in result.stderr
    assert f"would run: launchctl bootstrap gui/{os.getuid()} {destination}" in result.stderr
    assert f"would run: launchctl kickstart -k {target}" in result.stderr


def test_dry_run_daemon(runner, folders):
    result = runner.invoke(app, install_args(folders, "--daemon", "--user", user_name(), "--dry-run"))

    assert result.exit_code == 0, result.output
    plist = plist_from(result.stdout)
    assert plist["UserName"] == user_name()
    assert plist["ProgramArguments"] == [str(PROGRAM), "supervisor", "run"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert f"would run: launchctl bootstrap system {folders['install']}/{definition.LABEL}.plist" in result.stderr
    assert f"would run: launchctl kickstart -k system/{definition.LABEL}" in result.stderr


def test_dry_run_daemon_default_folders(runner):
    result = runner.invoke(app, ["service", "install", "--daemon", "--user", user_name(), "--dry-run"])

    assert result.exit_code == 0, result.output
    assert plist_from(result.stdout)["StandardErrorPath"] == "/Library/Logs/analysis-jobs/supervisor.log"
    assert f"would write /Library/LaunchDaemons/{definition.LABEL}.plist" in result.stderr


def test_dry_run_systemd(runner, folders):
    result = runner.invoke(app, ["service", "install", "--systemd", "--user", user_name(), "--dry-run"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Restart=on-failure" in lines
    assert "KillSignal=SIGTERM" in lines
    assert f"User={user_name()}" in lines
    assert f"ExecStart={PROGRAM} supervisor run" in lines
    timeout = next(int(line.split("=", 1)[1]) for line in lines if line.startswith("TimeoutStopSec="))
    assert timeout > config.SHUTDOWN_GRACE_SECONDS_DEFAULT
    assert "would write /etc/systemd/system/analysis-jobs.service" in result.stderr
    assert "then run: systemctl enable --now analysis-jobs.service" in result.stderr


def test_dry_run_changes_nothing(runner, folders):
    result = runner.invoke(app, install_args(folders, "--dry-run"))

    assert result.exit_code == 0, result.output
    assert list(folders["install"].iterdir()) == []
    assert not folders["logs"].exists()
    assert not folders["data"].exists()


def test_dry_run_runs_without_launchd(runner, folders, no_launchd):
    result = runner.invoke(app, install_args(folders, "--dry-run"))

    assert result.exit_code == 0, result.output
    assert plist_from(result.stdout)["Label"] == definition.LABEL


def test_dry_run_grace_from_config_toml(runner, folders):
    folders["data"].mkdir()
    (folders["data"] / "config.toml").write_text("shutdown_grace_seconds = 60\n")

    result = runner.invoke(app, install_args(folders, "--dry-run"))

    plist = plist_from(result.stdout)
    assert plist["ExitTimeOut"] > 60
    assert plist["EnvironmentVariables"]["ANALYSIS_SHUTDOWN_GRACE_SECONDS"] == "60"


def test_dry_run_grace_flag(runner, folders):
    result = runner.invoke(app, install_args(folders, "--shutdown-grace-seconds", "120", "--dry-run"))

    plist = plist_from(result.stdout)
    assert plist["ExitTimeOut"] > 120
    assert plist["EnvironmentVariables"]["ANALYSIS_SHUTDOWN_GRACE_SECONDS"] == "120"


def test_dry_run_url_file_rendered(runner, folders, tmp_path):
    url_file = tmp_path / "database-url"
    url_file.write_text(SECRET_URL + "\n")
    url_file.chmod(0o600)

    result = runner.invoke(app, install_args(folders, "--database-url-file", str(url_file), "--dry-run"))

    assert result.exit_code == 0, result.output
    environment = plist_from(result.stdout)["EnvironmentVariables"]
    assert environment["ANALYSIS_DATABASE_URL_FILE"] == str(url_file)
    assert "hunter2" not in result.output


def test_dry_run_url_file_from_environment(runner, folders, tmp_path):
    url_file = tmp_path / "database-url"
    url_file.write_text(SECRET_URL + "\n")
    url_file.chmod(0o600)

    result = runner.invoke(app, install_args(folders, "--dry-run"),
                           env={"ANALYSIS_DATABASE_URL_FILE": str(url_file)})

    assert result.exit_code == 0, result.output
    assert plist_from(result.stdout)["EnvironmentVariables"]["ANALYSIS_DATABASE_URL_FILE"] == str(url_file)


def test_dry_run_never_renders_database_url(runner, folders):
    result = runner.invoke(app, install_args(folders, "--dry-run"), env={"ANALYSIS_DATABASE_URL": SECRET_URL})

    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.stdout
    assert "ANALYSIS_DATABASE_URL" not in plist_from(result.stdout)["EnvironmentVariables"]
    assert "--database-url-file" in result.stderr


def test_dry_run_reports_differing_plist(runner, folders):
    existing = folders["install"] / f"{definition.LABEL}.plist"
    existing.write_bytes(plistlib.dumps({"Label": definition.LABEL, "ProgramArguments": ["/old/analysisctl"]}))

    result = runner.invoke(app, install_args(folders, "--dry-run"))

    assert result.exit_code == 0, result.output
    assert "install would stop" in result.stderr
    assert "ProgramArguments" in result.stderr


# Bad input ------------------------------------------------------------------------------


def test_install_unknown_user_rejected(runner, folders, launchctl):
    result = runner.invoke(app, install_args(folders, "--daemon", "--user", "no-such-user-h7"))

    assert result.exit_code == 2
    assert "no user named 'no-such-user-h7'" in result.output
    assert launchctl.calls() == []


def test_dry_run_for_unknown_user_warns_and_renders(runner, folders):
    # A dry run may render for the Mac mini's service account on another machine.
    result = runner.invoke(app, install_args(folders, "--daemon", "--user", "no-such-user-h7", "--dry-run"))

    assert result.exit_code == 0
    assert "warning: no user named 'no-such-user-h7'" in result.output
    assert "<string>no-such-user-h7</string>" in result.output


def test_install_user_with_agent_rejected(runner, folders):
    result = runner.invoke(app, install_args(folders, "--agent", "--user", user_name(), "--dry-run"))

    assert result.exit_code == 2
    assert "--daemon" in result.output


def test_install_agent_under_sudo_rejected(runner, folders, monkeypatch):
    monkeypatch.setattr(service, "is_root", lambda: True)

    result = runner.invoke(app, install_args(folders, "--dry-run"), env={"SUDO_USER": user_name()})

    assert result.exit_code == 2
    assert "without sudo" in result.output


def test_install_two_kinds_rejected(runner, folders):
    result = runner.invoke(app, install_args(folders, "--agent", "--daemon", "--dry-run"))

    assert result.exit_code == 2
    assert "cannot be used together" in result.output


@pytest.mark.parametrize("option", ["--install-dir", "--log-dir", "--database-url-file"])
def test_install_relative_path_rejected(runner, folders, option):
    arguments = ["service", "install", "--dry-run", option, "relative/path"]

    result = runner.invoke(app, arguments)

    assert result.exit_code == 2
    assert "'relative/path' is a relative path" in result.output
    assert "absolute path" in result.output


def test_install_relative_data_dir_rejected(runner, folders):
    result = runner.invoke(app, ["--data-dir", "relative-data", "service", "install", "--dry-run"])

    assert result.exit_code == 2
    assert "'relative-data' is a relative path" in result.output


def test_install_group_readable_url_file_rejected(runner, folders, tmp_path):
    url_file = tmp_path / "database-url"
    url_file.write_text(SECRET_URL + "\n")
    url_file.chmod(0o640)

    result = runner.invoke(app, install_args(folders, "--database-url-file", str(url_file), "--dry-run"))

    assert result.exit_code == 2
    assert f"chmod 600 {url_file}" in result.output
    assert "hunter2" not in result.output


def test_install_missing_url_file_rejected(runner, folders, tmp_path):
    url_file = tmp_path / "missing-url"

    result = runner.invoke(app, install_args(folders, "--database-url-file", str(url_file), "--dry-run"))

    assert result.exit_code == 2
    assert str(url_file) in result.output
    assert "not found" in result.output


def test_install_url_file_of_other_owner_rejected(runner, folders, tmp_path, monkeypatch):
    url_file = tmp_path / "database-url"
    url_file.write_text(SECRET_URL + "\n")
    url_file.chmod(0o600)
    other = Account(name="someone-else", uid=os.getuid() + 1, gid=os.getgid(), home=tmp_path)
    monkeypatch.setattr(service, "current_account", lambda: other)

    result = runner.invoke(app, install_args(folders, "--database-url-file", str(url_file), "--dry-run"))

    assert result.exit_code == 2
    assert f"chown someone-else {url_file}" in result.output


def test_systemd_without_dry_run_rejected(runner, folders):
    result = runner.invoke(app, ["service", "install", "--systemd", "--user", user_name()])

    assert result.exit_code == 2
    assert "--dry-run" in result.output


# Without launchd ------------------------------------------------------------------------------


def test_install_without_launchd_changes_nothing(runner, folders, no_launchd):
    result = runner.invoke(app, install_args(folders))

    assert result.exit_code == 7
    assert "launchd is not available on this host" in result.stderr
    assert "nothing was changed" in result.stderr
    assert "--dry-run" in result.stderr
    assert list(folders["install"].iterdir()) == []
    assert not folders["logs"].exists()
    assert not folders["data"].exists()


def test_install_daemon_without_launchd_changes_nothing(runner, folders, no_launchd):
    result = runner.invoke(app, install_args(folders, "--daemon", "--user", user_name()))

    assert result.exit_code == 7
    assert list(folders["install"].iterdir()) == []


@pytest.mark.parametrize("command", [["uninstall"], ["status"], ["logs"]], ids=" ".join)
def test_commands_without_launchd_exit_7(runner, no_launchd, command, monkeypatch, tmp_path):
    monkeypatch.setattr(service, "current_account",
                        lambda: Account(name=user_name(), uid=os.getuid(), gid=os.getgid(), home=tmp_path))

    result = runner.invoke(app, ["service", *command])

    assert result.exit_code == 7
    assert "launchd is not available on this host" in result.stderr


# Install with a fake launchctl -------------------------------------------------------------


def test_install_agent_writes_and_starts(runner, folders, launchctl):
    result = runner.invoke(app, install_args(folders, "--agent"))

    assert result.exit_code == 0, result.output
    destination = folders["install"] / f"{definition.LABEL}.plist"
    plist = plistlib.loads(destination.read_bytes())
    assert plist["ProgramArguments"][0] == str(PROGRAM)
    assert stat.S_IMODE(destination.stat().st_mode) == 0o644
    target = f"gui/{os.getuid()}/{definition.LABEL}"
    assert launchctl.changing_calls() == [
        f"enable {target}",
        f"bootstrap gui/{os.getuid()} {destination}",
        f"kickstart -k {target}",
    ]
    assert (folders["logs"] / "supervisor.log").exists()
    assert (folders["logs"] / "supervisor.stdout.log").exists()
    assert stat.S_IMODE(folders["data"].stat().st_mode) == 0o700


def test_install_again_restarts_only(runner, folders, launchctl):
    first = runner.invoke(app, install_args(folders))
    second = runner.invoke(app, install_args(folders))

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "already installed" in second.stdout
    bootstraps = [call for call in launchctl.changing_calls() if call.startswith("bootstrap")]
    assert len(bootstraps) == 1
    assert launchctl.changing_calls()[-1].startswith("kickstart -k ")


def test_install_daemon_as_root(runner, folders, launchctl, monkeypatch):
    monkeypatch.setattr(service, "is_root", lambda: True)
    monkeypatch.setattr(service.os, "chown", lambda path, uid, gid: None)

    result = runner.invoke(app, install_args(folders, "--daemon", "--user", user_name()))

    assert result.exit_code == 0, result.output
    destination = folders["install"] / f"{definition.LABEL}.plist"
    assert plistlib.loads(destination.read_bytes())["UserName"] == user_name()
    assert launchctl.changing_calls() == [
        f"enable system/{definition.LABEL}",
        f"bootstrap system {destination}",
        f"kickstart -k system/{definition.LABEL}",
    ]


def test_install_daemon_needs_root(runner, folders, launchctl, monkeypatch):
    monkeypatch.setattr(service, "is_root", lambda: False)

    result = runner.invoke(app, install_args(folders, "--daemon", "--user", user_name()))

    assert result.exit_code == 2
    assert "needs root" in result.output
    assert "sudo" in result.output
    assert list(folders["install"].iterdir()) == []
    assert launchctl.changing_calls() == []


def test_install_differing_plist_rejected(runner, folders, launchctl):
    existing = folders["install"] / f"{definition.LABEL}.plist"
    old_content = plistlib.dumps({"Label": definition.LABEL, "ProgramArguments": ["/old/venv/bin/analysisctl"]})
    existing.write_bytes(old_content)

    result = runner.invoke(app, install_args(folders))

    assert result.exit_code == 4
    assert f"{existing} exists and differs" in result.stderr
    assert "ProgramArguments" in result.stderr
    assert "analysisctl service uninstall" in result.stderr
    assert existing.read_bytes() == old_content
    assert launchctl.changing_calls() == []
    assert not folders["logs"].exists()


def test_install_invalid_existing_plist_rejected(runner, folders, launchctl):
    existing = folders["install"] / f"{definition.LABEL}.plist"
    existing.write_text("not a plist")

    result = runner.invoke(app, install_args(folders))

    assert result.exit_code == 4
    assert "is not a valid plist" in result.stderr
    assert existing.read_text() == "not a plist"


def test_install_missing_parent_folder_rejected(runner, folders, launchctl, tmp_path):
    result = runner.invoke(app, ["service", "install", "--install-dir", str(folders["install"]),
                                 "--log-dir", str(tmp_path / "missing" / "logs")])

    assert result.exit_code == 2
    assert f"parent folder {tmp_path / 'missing'} does not exist" in result.output
    assert list(folders["install"].iterdir()) == []
    assert not folders["data"].exists()


def test_install_launchctl_failure_exit_8(runner, folders, launchctl):
    launchctl.fail("bootstrap")

    result = runner.invoke(app, install_args(folders))

    assert result.exit_code == 8
    assert "launchctl bootstrap" in result.stderr
    assert "exit code 5" in result.stderr
    assert "Input/output error" in result.stderr


# uninstall and status with a fake launchctl ----------------------------------------------------


def test_uninstall_boots_out_and_deletes(runner, folders, launchctl):
    runner.invoke(app, install_args(folders))
    destination = folders["install"] / f"{definition.LABEL}.plist"

    result = runner.invoke(app, ["service", "uninstall", "--agent", "--install-dir", str(folders["install"])])

    assert result.exit_code == 0, result.output
    assert not destination.exists()
    assert launchctl.changing_calls()[-1] == f"bootout gui/{os.getuid()}/{definition.LABEL}"
    assert (folders["logs"] / "supervisor.log").exists()


def test_uninstall_not_installed(runner, folders, launchctl):
    result = runner.invoke(app, ["service", "uninstall", "--agent", "--install-dir", str(folders["install"])])

    assert result.exit_code == 0, result.output
    assert "not installed" in result.stdout
    assert "nothing to uninstall" in result.stdout
    assert launchctl.changing_calls() == []


def test_status_summarises_launchctl_print(runner, folders, launchctl):
    runner.invoke(app, install_args(folders))

    result = runner.invoke(app, ["service", "status", "--agent", "--install-dir", str(folders["install"])])

    assert result.exit_code == 0, result.output
    assert "state: running" in result.stdout
    assert "pid: 4242" in result.stdout
    assert "last exit code: 5" in result.stdout
    assert f"log: {folders['logs'] / 'supervisor.log'}" in result.stdout


def test_status_not_loaded_exit_1(runner, folders, launchctl):
    result = runner.invoke(app, ["service", "status", "--agent", "--install-dir", str(folders["install"])])

    assert result.exit_code == 1
    assert "loaded: False" in result.stdout


# logs ----------------------------------------------------------------------------------------


def write_installed_plist(folders: dict[str, Path], log_path: Path) -> None:
    plist = definition.render_plist(make_spec(kind=Kind.AGENT))
    plist["StandardErrorPath"] = str(log_path)
    (folders["install"] / f"{definition.LABEL}.plist").write_bytes(definition.plist_bytes(plist))


def test_logs_prints_last_lines(runner, folders, tmp_path, no_launchd):
    log_path = tmp_path / "supervisor.log"
    log_path.write_text("".join(f'{{"n": {n}}}\n' for n in range(50)))
    write_installed_plist(folders, log_path)

    result = runner.invoke(app, ["service", "logs", "--agent", "--install-dir", str(folders["install"]), "-n", "3"])

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ['{"n": 47}', '{"n": 48}', '{"n": 49}']


def test_logs_missing_file(runner, folders, tmp_path, no_launchd):
    write_installed_plist(folders, tmp_path / "never-written.log")

    result = runner.invoke(app, ["service", "logs", "--agent", "--install-dir", str(folders["install"])])

    assert result.exit_code == 4
    assert "no log file at" in result.stderr


@pytest.mark.parametrize("kind", ["--agent", "--daemon"])
def test_logs_without_launchd_exit_7(runner, folders, no_launchd, kind):
    result = runner.invoke(app, ["service", "logs", kind, "--install-dir", str(folders["install"])])

    assert result.exit_code == 7, result.output
    assert "launchd is not available" in result.stderr


def test_logs_not_installed_exit_4(runner, folders, launchctl):
    result = runner.invoke(app, ["service", "logs", "--daemon", "--install-dir", str(folders["install"])])

    assert result.exit_code == 4, result.output
    assert "not installed" in result.stderr


def test_tail_lines_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(log_tail, "TAIL_BLOCK_BYTES", 16)
    path = tmp_path / "log"
    path.write_bytes(b"".join(f"line {n:04d}\n".encode() for n in range(100)))

    with open(path, "rb") as handle:
        lines = log_tail.tail_lines(handle, 5)
        position = handle.tell()

    assert lines == [f"line {n:04d}\n".encode() for n in range(95, 100)]
    assert position == path.stat().st_size


def test_tail_lines_short_file(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"one\ntwo")

    with open(path, "rb") as handle:
        assert log_tail.tail_lines(handle, 10) == [b"one\n", b"two"]
        assert log_tail.tail_lines(handle, 0) == []


def test_follow_file_follows_rotation(tmp_path):
    path = tmp_path / "supervisor.log"
    path.write_bytes(b"old 1\n")
    written: list[bytes] = []

    def append(data: bytes) -> None:
        with path.open("ab") as log_file:
            log_file.write(data)

    steps = iter([
        lambda: append(b"old 2\npartial"),
        lambda: (path.rename(tmp_path / "supervisor.log.0"), path.write_bytes(b"new 1\n")),
        lambda: append(b"new 2\n"),
    ])

    def sleep(seconds):
        try:
            next(steps)()
        except StopIteration:
            raise KeyboardInterrupt from None

    handle = open(path, "rb")
    handle.seek(0, os.SEEK_END)
    with pytest.raises(KeyboardInterrupt):
        log_tail.follow_file(path, handle, written.append, sleep)

    assert b"".join(written) == b"old 2\npartial\nnew 1\nnew 2\n"
    assert handle.closed


def test_service_help_has_examples(runner):
    for command in (["service"], ["service", "install"], ["service", "uninstall"], ["service", "status"],
                    ["service", "logs"]):
        result = runner.invoke(app, [*command, "--help"])

        assert result.exit_code == 0, result.output
        assert "Example" in result.output, command
