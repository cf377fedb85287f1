"""``analysisctl``: the command-line client of the analysis job service."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from cli import admin, data, demo, doctor, jobs, limits, service
from cli.common import CommandGroup, GlobalOptions, command_line_values, setting_help
from supervisor import config as config_module

MAIN_EPILOG = """\
Examples:

  analysisctl demo

  analysisctl submit noop --param steps=100 --param step_seconds=0.05 --wait

  analysisctl list --status running

  ANALYSIS_DATABASE_URL=postgresql://user@db.example:5432/analysis analysisctl doctor

With no database URL configured, an embedded Postgres in the data folder
is started and left running for later commands.

Exit codes:
  0  success
  1  the job did not end as expected (failed, cancelled or expired), doctor found a problem,
     or service status found no loaded service
  2  invalid command line or configuration
  3  job not found
  4  invalid request (unknown analysis, bad parameter, unreadable input file, a different
     service plist in the way); nothing was written
  5  database unavailable
  6  database schema out of date (run `analysisctl db upgrade`)
  7  launchd is not available on this host (service commands); nothing was changed
  8  a launchctl command failed (service commands)
  9  not permitted: the database login lacks the role or privilege; nothing was written
  130  interrupted (Ctrl-C); a followed job keeps running
"""

app = typer.Typer(
    cls=CommandGroup,
    help="Submit, follow and manage durable analysis jobs of the sensor-monitoring controller.",
    epilog=MAIN_EPILOG,
    no_args_is_help=True,
    rich_markup_mode="rich",
    # Locals in a traceback could include the database password.
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("analysis-jobs")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        typer.echo(f"analysisctl {version}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", metavar="URL",
        help=setting_help("database_url", "Prefer the environment variable: a password on the "
                                          "command line is visible to other users of the machine"),
        envvar=config_module.env_name("database_url"), show_envvar=True, show_default=False)] = None,
    database_url_file: Annotated[Path | None, typer.Option(
        "--database-url-file", metavar="FILE", help=setting_help("database_url_file"),
        envvar=config_module.env_name("database_url_file"), show_envvar=True, show_default=False,
        dir_okay=False)] = None,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", metavar="DIR", help=setting_help("data_dir"),
        envvar=config_module.env_name("data_dir"), show_envvar=True, show_default=False, file_okay=False)] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE", help="TOML file with settings. Default: <data dir>/config.toml when it exists.",
        envvar="ANALYSIS_CONFIG", show_envvar=True, show_default=False, dir_okay=False)] = None,
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", callback=_show_version, is_eager=True)] = False,
) -> None:
    """Submit, follow and manage durable analysis jobs of the sensor-monitoring controller."""
    overrides = command_line_values(ctx, database_url=database_url, database_url_file=database_url_file,
                                    data_dir=data_dir)
    typed_config = command_line_values(ctx, config_file=config_file)
    ctx.obj = GlobalOptions(config_file=typed_config.get("config_file"), overrides=overrides)


jobs.register(app)
admin.register(app)
doctor.register(app)
data.register(app)
demo.register(app)
limits.register(app)
service.register(app)


def run() -> None:
    """Entry point of the ``analysisctl`` script."""
    app(prog_name="analysisctl")


if __name__ == "__main__":
    run()
