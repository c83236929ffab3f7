#!/usr/bin/env python3
"""Benchmark: one rotation of many PIN doors, the first and the next ones.

A PIN door's key is a PBKDF2 of 20 000 rounds.  A run of its own (the timer's
oneshot, a run by hand) derives every key; the watch keeps them in memory, so
its rotations after the first only compute sequences.  Times plan_rotation()
in this process for DOORS doors (all with a PIN): the first rotation, then the
median of RUNS rotations of later periods, and their ratio.

Then timer mode: a boundary run (`knockd_rotator_server.py --at MOMENT`, as
the timer's service leaves one) for the same doors, spawned 20 to 40 s before
a boundary (20 s period, no grace, no lead; commands `true`).  It derives the
keys before it sleeps; printed is how long after MOMENT knockd.conf held the
new sequences (its modification time, polled every 5 ms).

Last, the runs of their own that find the files current (the timer's hourly
run, a run by hand): `knockd_rotator_server.py --config C` twice in a row, a
1-hour period, the first rotating; printed is the second's wall time, from
spawn to exit (it finds the record of the first, and derives no key).

    python3 bench/pin_doors.py [--doors 1000] [--runs 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from knockd_rotator.core import settings as core_settings  # noqa: E402
from knockd_rotator.engines.knockd import render  # noqa: E402

SERVER = Path(__file__).resolve().parent.parent / "knockd_rotator_server.py"
PERIOD = 20


def run_env(environ, folder, **settings):
    """ENVIRON for a server run in FOLDER, its commands `true`, and SETTINGS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    env.update(environ, KNOCKD_ROTATOR_STATE_DIR=os.path.join(folder, "state"),
               KNOCKD_ROTATOR_ENV_FILE=os.path.join(folder, "absent.env"),
               KNOCKD_ROTATOR_TRIAL_KNOCKD="", KNOCKD_ROTATOR_CHECK_SECONDS="1")
    env.update(("KNOCKD_ROTATOR_" + name, "true") for name in core_settings.DEFAULT_COMMANDS)
    env.update(("KNOCKD_ROTATOR_" + name, str(value)) for name, value in settings.items())
    return env


def own_run(config, env):
    """Wall seconds of one run of the server over CONFIG, spawn to exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(SERVER), "--config", config], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def boundary_run(config, environ, folder):
    """Seconds from a boundary run's moment until CONFIG held its rotation."""
    env = run_env(environ, folder, PERIOD_MODULO=PERIOD, GRACE=0, LEAD=0)
    moment = (int(time.time()) // PERIOD + 2) * PERIOD
    before = os.stat(config).st_mtime_ns
    run = subprocess.Popen([sys.executable, str(SERVER), "--config", config, "--at",
                            str(moment)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        while os.stat(config).st_mtime_ns == before:
            if run.poll() is not None:
                sys.exit("error: the boundary run ended without rotating (exit %d)"
                         % run.returncode)
            time.sleep(0.005)
        return time.time() - moment
    finally:
        run.kill()         # its reload and check are `true`: nothing to wait for
        run.wait()


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
        render.plan_rotation(config, data, moment, core_settings.settings_reader(environ))
        return time.perf_counter() - started

    first = rotation(now)
    later = statistics.median(rotation(now + 3600 * (run + 1)) for run in range(args.runs))
    print("%d PIN doors on %s: first rotation %.3f s, later rotations (the watch) %.3f s "
          "median of %d, ratio %.1f" % (args.doors, sys.executable, first, later, args.runs,
                                        first / later))
    late = boundary_run(config, environ, folder)
    print("timer mode: a boundary run had knockd.conf rotated %.3f s after its moment "
          "(keys derived before it slept); ratio to the first rotation %.1f"
          % (late, first / late))
    env = run_env(environ, folder)
    rotating = own_run(config, env)
    current = own_run(config, env)
    print("runs of their own: %.3f s rotating, %.3f s over the current files (the timer's "
          "hourly run, a run by hand); ratio %.1f" % (rotating, current, rotating / current))


if __name__ == "__main__":
    main()
