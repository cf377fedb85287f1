"""Time each analysis body on the bundled data and on a series ten times longer.

Usage:

    .venv/bin/python bench/bench_analyses.py [--runs 3] [--scales 1,10] [--only NAME] [--output FILE]
        [--compare-stumpy]

Each body runs in this process with a minimal context, as a worker would run
it, with BLAS and OpenMP limited to one thread as the service's workers are.
The time includes reading the CSV and resampling, which the table also
shows on its own. The ten-times-longer data
set is synthesised from the bundled slice: the 15 days are concatenated ten
times, each copy shifted 15 days later, so every sensor has the same readings
and gaps in each copy (150 days, about 1.1 million rows). Its matrix-profile
motifs are therefore exact repeats at distance 0; only its timing means
anything. The script prints a markdown table and writes it to ``--output``
when given.
"""

from __future__ import annotations

import os

# Before numpy is imported, so that BLAS starts with one thread, as in a worker.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_name] = "1"

import argparse
import gzip
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses import data, registry
from analyses.context import Context

COPY_SECONDS = 15 * 86_400

# Parameters per analysis, the same at every scale. relationship-matrix also
# runs its lag search, which is off by default.
CASES: dict[str, dict[str, Any]] = {
    "relationship-matrix": {"max_lag_minutes": 60},
    "related-sensors": {"target": "vlinder02.temp", "max_lag_minutes": 180},
    "spike-matching": {},
    "co-occurrence": {},
    "matrix-profile": {"target": "vlinder02.temp", "window": 36},
}


class BenchContext(Context):
    """A context that discards progress and keeps saved results only as shapes."""

    def __init__(self) -> None:
        self.job_id = 0
        self.attempt = 1
        self.logger = logging.getLogger("bench")
        self.database_url = None

    def progress(self, completed, total=None, message=None) -> None:
        pass

    def phase(self, name, total=None) -> None:
        pass

    @property
    def cancelled(self) -> bool:
        return False

    def register_process_group(self, pgid) -> None:
        pass

    def save_array(self, name, array) -> dict[str, Any]:
        return {"name": name, "shape": list(np.shape(array))}

    def save_json(self, name, document) -> dict[str, Any]:
        return {"name": name}


def write_tiled_csv(path: Path, copies: int) -> int:
    """Write the bundled readings ``copies`` times, each copy 15 days later, and return the row count."""
    readings = data.read_csv(data.bundled_readings_path())
    rows = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
        handle.write("sensor_id,ts,value\n")
        for copy in range(copies):
            for sensor, (times, values) in readings.series.items():
                shifted = times + copy * COPY_SECONDS
                handle.writelines(
                    f"{sensor},{data.format_timestamp(float(t))},{v!r}\n" for t, v in zip(shifted, values.tolist())
                )
                rows += times.size
    return rows


def time_load(params: dict[str, Any], runs: int) -> tuple[list[float], dict[str, Any]]:
    """Time reading and resampling every sensor, the first step of every body."""
    checked = data.check_data_params(params)
    durations = []
    grid = None
    for _ in range(runs):
        started = time.perf_counter()
        grid = data.load_grid(checked, BenchContext(), None)
        durations.append(time.perf_counter() - started)
    return durations, {"data": grid.describe()}


def time_case(name: str, params: dict[str, Any], runs: int) -> tuple[list[float], dict[str, Any]]:
    analysis = registry.get(name)
    validated = analysis.validate_params(params)
    durations = []
    summary = None
    for _ in range(runs):
        started = time.perf_counter()
        summary = analysis.body(validated, BenchContext())
        durations.append(time.perf_counter() - started)
    return durations, summary


def time_stumpy(params: dict[str, Any], runs: int) -> tuple[list[float], dict[str, Any]]:
    """Time stumpy.stump on the grid series matrix-profile uses, after one run that compiles it.

    stumpy (a test dependency) runs numba on all CPUs; the BLAS limit does not apply to it.
    """
    import warnings

    import stumpy

    checked = data.check_data_params(params)
    grid = data.load_grid(checked, BenchContext(), [], target=params["target"])
    series = grid.values[0]
    with warnings.catch_warnings():
        # stumpy divides by zero for subsequences with gaps before masking them.
        warnings.simplefilter("ignore")
        stumpy.stump(series, params["window"])
        durations = []
        for _ in range(runs):
            started = time.perf_counter()
            stumpy.stump(series, params["window"])
            durations.append(time.perf_counter() - started)
    return durations, {"data": grid.describe()}


def grid_shape(summary: dict[str, Any]) -> str:
    described = summary["data"]
    return f"{len(described['sensors'])} x {described['n_times']}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Time the analysis bodies on the bundled data.")
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the table shows their median (default 3)")
    parser.add_argument("--scales", default="1,10", help="comma-separated data lengths in copies of the slice")
    parser.add_argument("--only", action="append", help="analysis to time; repeat for more (default: all)")
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--compare-stumpy", action="store_true",
                        help="also time stumpy.stump on the matrix-profile series (excluding reading the data)")
    args = parser.parse_args()
    scales = [int(scale) for scale in args.scales.split(",")]
    names = args.only or list(CASES)

    load_before = os.getloadavg()[0]
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}; BLAS limited to 1 thread. Median of {args.runs} runs."
    )
    lines = [
        machine,
        "",
        "| analysis | parameters | data | grid (sensors x times) | median s | min s | max s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for scale in scales:
            if scale == 1:
                source = {}
                label = "bundled slice (15 days)"
            else:
                path = Path(folder) / f"tiled_{scale}.csv.gz"
                rows = write_tiled_csv(path, scale)
                source = {"source": "csv", "csv_path": str(path)}
                label = f"{scale} x tiled ({15 * scale} days, {rows:,} rows)"
            durations, summary = time_load(source, args.runs)
            lines.append(
                f"| (read + resample only) | all sensors | {label} | {grid_shape(summary)} "
                f"| {statistics.median(durations):.2f} | {min(durations):.2f} | {max(durations):.2f} |"
            )
            print(lines[-1], flush=True)
            for name in names:
                params = {**CASES[name], **source}
                durations, summary = time_case(name, params, args.runs)
                shown = ", ".join(f"{key}={value}" for key, value in CASES[name].items()) or "defaults"
                lines.append(
                    f"| {name} | {shown} | {label} | {grid_shape(summary)} | {statistics.median(durations):.2f} "
                    f"| {min(durations):.2f} | {max(durations):.2f} |"
                )
                print(lines[-1], flush=True)
            if args.compare_stumpy and "matrix-profile" in names:
                durations, summary = time_stumpy({**CASES["matrix-profile"], **source}, args.runs)
                lines.append(
                    f"| stumpy.stump for comparison (numba, {os.cpu_count()} CPUs, no data reading) "
                    f"| window=36 | {label} | {grid_shape(summary)} | {statistics.median(durations):.2f} "
                    f"| {min(durations):.2f} | {max(durations):.2f} |"
                )
                print(lines[-1], flush=True)

    lines += ["", f"1-minute load average: {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."]
    table = "\n".join(lines)
    print()
    print(table)
    if args.output:
        args.output.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
