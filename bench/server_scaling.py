#!/usr/bin/env python3
"""Benchmark: server run time against the number of rotator doors.

For 1, 100, 1000 and 10 000 [*_ROTATOR] sections, times the median of RUNS
whole runs of knockd_rotator_server.py on this interpreter (sys.executable),
with --dry-run and with a real write (each real run gets a fresh copy of the
unrotated file, so it always writes; reload and check are `true`).  Prints
milliseconds, the cost of each door beyond the first, and `python3 -c pass`
for reference.

    python3 bench/server_scaling.py [--runs 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "knockd_rotator_server.py"
SIZES = (1, 100, 1000, 10000)


def config_text(doors):
    return "".join("[door%05d_ROTATOR]\n\tsequence = 1\n\tseq_timeout = 10\n"
                   "\tstart_command = true\n\tcmd_timeout = 10\n\tstop_command = true\n" % i
                   for i in range(doors))


def median_ms(command, env, runs, prepare=None):
    times = []
    for _ in range(runs):
        if prepare:
            prepare()
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, KNOCKD_ROTATOR_SECRET="benchmark-secret-0123456789",
                   KNOCKD_ROTATOR_RELOAD_COMMAND="true", KNOCKD_ROTATOR_CHECK_COMMAND="true",
                   KNOCKD_ROTATOR_CHECK_SECONDS="1", KNOCKD_ROTATOR_PERIOD_MODULO="31622400",
                   KNOCKD_ROTATOR_STATE_DIR=os.path.join(folder, "state"),
                   KNOCKD_ROTATOR_ENV_FILE=os.path.join(folder, "absent.env"))
        base = median_ms([sys.executable, "-c", "pass"], env, runs)
        print("interpreter: %s (Python %s), median of %d runs" % (
            sys.executable, sys.version.split()[0], runs))
        print("python3 -c pass: %.1f ms" % base)
        print("%7s %12s %12s %18s" % ("doors", "dry-run ms", "write ms", "write us/extra door"))
        single = None
        for doors in SIZES:
            config = Path(folder) / "knockd.conf"
            original = config_text(doors)
            config.write_text(original)
            command = [sys.executable, str(SERVER), "--config", str(config)]
            dry = median_ms(command + ["--dry-run"], env, runs)
            write = median_ms(command, env, runs, prepare=lambda: config.write_text(original))
            assert config.read_text() != original, "the real run must write"
            single = write if single is None else single
            extra = (write - single) * 1000 / (doors - 1) if doors > 1 else 0.0
            print("%7d %12.1f %12.1f %18.1f" % (doors, dry, write, extra))


if __name__ == "__main__":
    main()
