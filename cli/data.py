"""The ``data load`` command: bulk-load sensor readings from CSV."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from analyses import load
from cli import output
from cli.common import load_settings, open_engine
from supervisor.errors import InvalidRequest

data_app = typer.Typer(help="Load sensor readings that analyses read.", no_args_is_help=True,
                       epilog="Example:\n\n  analysisctl data load readings.csv.gz")

LOAD_EPILOG = """\
Examples:

  analysisctl data load readings.csv

  analysisctl data load export.csv.gz --replace

  analysisctl data load other.csv --table readings_test

The file needs a header line naming sensor_id, ts and value, and may be
gzip-compressed. ts is ISO-8601 with a time zone (2022-09-01T00:00:00Z);
value is a finite number. Every row is checked first: if any row is
invalid, or repeats a (sensor_id, ts) pair, nothing is loaded and the bad
lines are listed. Without --replace, readings already in the table are
rejected the same way.
"""


@data_app.command("load", epilog=LOAD_EPILOG)
def data_load(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(metavar="FILE.csv", help="CSV file, plain or .gz.", show_default=False)],
    table: Annotated[str, typer.Option(
        help="Target table, with columns sensor_id, ts and value.")] = load.DEFAULT_TABLE,
    replace: Annotated[bool, typer.Option(
        "--replace", help="First delete every existing reading of the sensors in the file; "
                          "readings of other sensors are kept.")] = False,
) -> None:
    """Load a sensor_id,ts,value CSV file into the readings table in one transaction."""
    started = time.perf_counter()
    try:
        load.check_table_name(table)
        readings = load.read_readings(path)
    except load.ReadingsError as error:
        raise InvalidRequest(str(error), field="file") from None
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    try:
        summary = load.load_readings(engine, readings, table=table, replace=replace)
    except load.ReadingsError as error:
        raise InvalidRequest(str(error), field="file") from None
    typer.echo(describe(summary, time.perf_counter() - started))


def describe(summary: load.LoadSummary, seconds: float) -> str:
    text = f"loaded {summary.rows:,} reading(s) of {summary.sensors} sensor(s) into {summary.table}"
    if summary.first_ts is not None:
        text += f", {summary.first_ts.isoformat()} to {summary.last_ts.isoformat()}"
    if summary.replaced_rows:
        text += f", replacing {summary.replaced_rows:,} earlier reading(s) of those sensors"
    return text + f" in {output.format_duration(seconds)}"


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
