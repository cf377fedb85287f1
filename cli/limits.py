"""``analysisctl limits``: concurrency limits per submitting user and per analysis."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli import output
from cli.common import load_settings, open_engine
from supervisor import store

LIMITS_EPILOG = """\
Examples:

  analysisctl limits set --user '*' 4

  analysisctl limits set --user alice 8

  analysisctl limits set --analysis matrix-profile 1

  analysisctl limits clear --analysis matrix-profile

  analysisctl limits show

A limit caps the running jobs of one user or analysis across every
supervisor on the database; jobs over it wait in the queue. The name '*'
sets the limit of each user or analysis without one of its own. Without a
limit, a user or analysis may fill every slot while no other job waits.
Whenever several users wait, free slots go to the user with the fewest
running jobs.
"""

limits_app = typer.Typer(help="Show and set concurrency limits per user and per analysis.",
                         no_args_is_help=True, epilog=LIMITS_EPILOG)

UserOption = Annotated[str | None, typer.Option(
    "--user", metavar="NAME", help="Limit the jobs of this submitting user ('*': each user).", show_default=False)]
AnalysisOption = Annotated[str | None, typer.Option(
    "--analysis", metavar="TYPE", help="Limit the jobs of this analysis ('*': each analysis).", show_default=False)]


def _target(user: str | None, analysis: str | None) -> tuple[str, str]:
    if (user is None) == (analysis is None):
        raise typer.BadParameter("give exactly one of --user NAME or --analysis TYPE")
    return ("user", user) if user is not None else ("analysis", analysis)


@limits_app.command("set")
def limits_set(
    ctx: typer.Context,
    max_running: Annotated[int, typer.Argument(
        metavar="MAX_RUNNING", help=f"Running jobs allowed at once, 0 to {store.MAX_LIMIT}; 0 keeps all of them queued.",
        show_default=False)],
    user: UserOption = None,
    analysis: AnalysisOption = None,
) -> None:
    """Set the limit of one user or analysis, replacing any earlier one."""
    scope, name = _target(user, analysis)
    engine = open_engine(ctx, load_settings(ctx))
    limit = store.set_limit(engine, scope, name, max_running)
    typer.echo(f"{scope} {output.printable(name)}: at most {limit.max_running} running job(s)")


@limits_app.command("clear")
def limits_clear(ctx: typer.Context, user: UserOption = None, analysis: AnalysisOption = None) -> None:
    """Remove the limit of one user or analysis."""
    scope, name = _target(user, analysis)
    engine = open_engine(ctx, load_settings(ctx))
    if store.clear_limit(engine, scope, name):
        typer.echo(f"{scope} {output.printable(name)}: limit removed")
    else:
        typer.echo(f"{scope} {output.printable(name)} had no limit; nothing changed")


@limits_app.command("show")
def limits_show(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")] = False,
) -> None:
    """List the limits in force."""
    engine = open_engine(ctx, load_settings(ctx))
    limits = store.list_limits(engine)
    if json_output:
        output.print_json([{"scope": limit.scope, "name": limit.name, "max_running": limit.max_running,
                            "updated_at": limit.updated_at} for limit in limits])
        return
    if not limits:
        typer.echo("no limits: any user or analysis may use every free slot")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SCOPE", "NAME", "MAX RUNNING", "UPDATED"):
        table.add_column(column, no_wrap=True, justify="right" if column == "MAX RUNNING" else "left")
    for limit in limits:
        table.add_row(limit.scope, output.printable(limit.name), str(limit.max_running),
                      output.format_time(limit.updated_at))
    output.console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(limits_app, name="limits")
