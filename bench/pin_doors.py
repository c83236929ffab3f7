#!/usr/bin/env python3
"""Benchmark: one rotation of many PIN doors, the first and the next ones.

A PIN door's key is a PBKDF2 of 20 000 rounds.  A run of its own (the timer's
oneshot, a run by hand) derives every key; the watch keeps them in memory, so
its rotations after the first only compute sequences.  Times plan_rotation()
in this process for DOORS doors (all with a PIN): the first rotation, then the
median of RUNS rotations of later periods, and their ratio.

    python3 bench/pin_doors.py [--doors 1000] [--runs 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import knockd_rotator_server as server  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--doors", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    config = os.path.join(folder, "knockd.conf")
    with open(config, "w") as handle:
        handle.write("".join("[client%05d_ROTATOR]\n\tstart_command = true\n" % i
                             for i in range(args.doors)))
    with open(config, "rb") as handle:
        data = handle.read()
    environ = {"KNOCKD_ROTATOR_SECRET": "bench-secret-" + "x" * 30,
               "KNOCKD_ROTATOR_PIN": "bench-pin-7413", "KNOCKD_ROTATOR_PERIOD_MODULO": "3600"}
    now = time.time()

    def rotation(moment):
        started = time.perf_counter()
        server.plan_rotation(config, data, moment, server.settings_reader(environ))
        return time.perf_counter() - started

    first = rotation(now)
    later = statistics.median(rotation(now + 3600 * (run + 1)) for run in range(args.runs))
    print("%d PIN doors on %s: first rotation %.3f s, later rotations (the watch) %.3f s "
          "median of %d, ratio %.1f" % (args.doors, sys.executable, first, later, args.runs,
                                        first / later))


if __name__ == "__main__":
    main()
