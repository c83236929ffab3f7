#!/usr/bin/env python3
"""Benchmark: the cost of one `knock` against the interpreter's own start.

Times, on this interpreter binary (sys.executable), the median of RUNS runs of
  - knockd_rotator_client.py knock 127.0.0.1 ssh   (10 ports),
  - the same with a PIN, and in totp mode with a code (the key costs a PBKDF2),
  - python3 -c pass,
  - knockd's C client `knock` sending the same 10 ports,
and prints the ratios.  Needs root: it runs inside a network namespace of its
own so that the knocks go to that namespace's loopback only.

    python3 bench/client_startup.py [--runs 31]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "knockd_rotator_client.py"


def median_seconds(command, env, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(runs):
    env = dict(os.environ, KNOCKD_ROTATOR_SECRET="benchmark-secret-0123456789",
               KNOCKD_ROTATOR_LENGTH="10")
    ports = subprocess.run([sys.executable, str(CLIENT), "generate", "ssh", "--format", "knock"],
                           env=env, check=True, capture_output=True, text=True).stdout.split()
    results = {
        "python3 -c pass": median_seconds([sys.executable, "-c", "pass"], env, runs),
        "client knock (10 ports)": median_seconds(
            [sys.executable, str(CLIENT), "knock", "127.0.0.1", "ssh"], env, runs),
        "client generate": median_seconds(
            [sys.executable, str(CLIENT), "generate", "ssh"], env, runs),
        "client knock, PIN": median_seconds(
            [sys.executable, str(CLIENT), "knock", "127.0.0.1", "ssh"],
            dict(env, KNOCKD_ROTATOR_PIN="2580"), runs),
        "client knock, totp code": median_seconds(
            [sys.executable, str(CLIENT), "knock", "127.0.0.1", "ssh", "--code", "123456"],
            dict(env, KNOCKD_ROTATOR_MODE="totp"), runs),
    }
    knock = shutil.which("knock")
    if knock:
        results["C knock (10 ports)"] = median_seconds([knock, "127.0.0.1"] + ports, env, runs)
    print("interpreter: %s (Python %s), %d runs each, median" % (
        sys.executable, sys.version.split()[0], runs))
    for name, seconds in results.items():
        print("  %-26s %7.1f ms" % (name, seconds * 1000))
    base = results["python3 -c pass"]
    ours = results["client knock (10 ports)"]
    print("ratio knock / python3 -c pass:  %.2f  (goal <= 1.5)" % (ours / base))
    print("ratio generate / python3 -c pass: %.2f" % (results["client generate"] / base))
    print("ratio knock with a PIN / knock:   %.2f"
          % (results["client knock, PIN"] / ours))
    if knock:
        print("ratio knock / C knock:          %.2f" % (ours / results["C knock (10 ports)"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return measure(args.runs)
    if os.geteuid() != 0:
        sys.exit("error: needs root to make a network namespace (run it as root)")
    namespace = "krbench-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__,
                        "--inside", "--runs", str(args.runs)], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    main()
