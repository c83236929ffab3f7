#!/usr/bin/env python3
"""Benchmark: the start-up cost of the client against the interpreter's own.

On this interpreter binary (sys.executable: run it with the real binary, not
a shim), round by round, each round running every command once in a new
shuffled order so that the machine's drift hits all of them alike:
  - python3 -c pass,
  - knockd_rotator_client.py knock 127.0.0.1 ssh   (10 ports),
  - the same with a PIN, and in totp mode with the code typed on stdin
    (`--code -`): both derive the key with a PBKDF2,
  - knockd_rotator_client.py generate ssh,
  - knock and generate again with the single file run as a script, which
    Python compiles at every start (the client above is what install.sh puts
    on the PATH, a launcher importing the compiled client; installed here
    under a temporary DESTDIR),
  - knockd's C client `knock` sending the same 10 ports (when installed).
For each it prints the CPU time (user + sys of the child) and the wall time,
min/median/max, and the median of the per-round ratios to `python3 -c pass`.
Needs root: it runs inside a network namespace of its own so that the knocks
go to that namespace's loopback only.

    /usr/bin/python3 bench/client_startup.py [--rounds 41]
"""

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "knockd_rotator_client.py"
GOAL = 2.3     # issue 14: knock and generate at most this many times python3 -c pass


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(command, env, stdin):
    """(CPU seconds, wall seconds) of one run of COMMAND."""
    cpu = children_cpu()
    started = time.perf_counter()
    subprocess.run(command, env=env, input=stdin, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return children_cpu() - cpu, wall


def install(root):
    """The installed client's launcher under ROOT, compiled by this interpreter."""
    subprocess.run([str(ROOT / "install.sh")], env=dict(os.environ, DESTDIR=root), check=True,
                   stdout=subprocess.DEVNULL)
    module = os.path.join(root, "usr/local/lib/knockd_rotator/knockd_rotator_client.py")
    subprocess.run([sys.executable, "-m", "py_compile", module], check=True)
    return os.path.join(root, "usr/local/bin/knockd_rotator_client.py")


def commands(launcher):
    """{name: (argv, environment, stdin bytes)}, `python3 -c pass` first."""
    env = dict(os.environ, KNOCKD_ROTATOR_SECRET="benchmark-secret-0123456789",
               KNOCKD_ROTATOR_LENGTH="10")
    client = [sys.executable, launcher]
    script = [sys.executable, str(CLIENT)]
    knock = client + ["knock", "127.0.0.1", "ssh"]
    result = {
        "python3 -c pass": ([sys.executable, "-c", "pass"], env, None),
        "client knock (10 ports)": (knock, env, None),
        "client knock, PIN": (knock, dict(env, KNOCKD_ROTATOR_PIN="2580258025"), None),
        "client knock, totp --code -": (knock + ["--code", "-"],
                                        dict(env, KNOCKD_ROTATOR_MODE="totp"), b"123456\n"),
        "client generate": (client + ["generate", "ssh"], env, None),
        "script knock (one file)": (script + ["knock", "127.0.0.1", "ssh"], env, None),
        "script generate (one file)": (script + ["generate", "ssh"], env, None),
    }
    c_knock = shutil.which("knock")
    if c_knock:
        ports = subprocess.run(client + ["generate", "ssh", "--format", "knock"], env=env,
                               check=True, capture_output=True, text=True).stdout.split()
        result["C knock (10 ports)"] = ([c_knock, "127.0.0.1"] + ports, env, None)
    return result


def spread(values, scale=1.0, form="%.1f"):
    return " / ".join(form % (value * scale) for value in
                      (min(values), statistics.median(values), max(values)))


def measure(rounds):
    with tempfile.TemporaryDirectory() as root:
        table = commands(install(root))
        sample(table, rounds)


def sample(table, rounds):
    names = list(table)
    cpu = {name: [] for name in names}
    wall = {name: [] for name in names}
    for round_number in range(rounds + 1):
        random.shuffle(names)
        for name in names:
            figures = run_once(*table[name])
            # Round 0 only warms the page cache and the interpreter's files.
            if round_number:
                cpu[name].append(figures[0])
                wall[name].append(figures[1])

    base = "python3 -c pass"
    print("interpreter: %s (Python %s); %d rounds, each command once a round in a "
          "shuffled order" % (sys.executable, sys.version.split()[0], rounds))
    print("%-28s %-22s %-22s %s" % ("", "CPU ms min/med/max", "wall ms min/med/max",
                                     "CPU ratio to pass min/med/max"))
    for name in table:
        ratios = [ours / theirs for ours, theirs in zip(cpu[name], cpu[base])]
        print("%-28s %-22s %-22s %s" % (name, spread(cpu[name], 1000), spread(wall[name], 1000),
                                         spread(ratios, form="%.2f")))
    for name in ("client knock (10 ports)", "client generate", "script knock (one file)",
                 "script generate (one file)"):
        ratio = statistics.median(cpu[name]) / statistics.median(cpu[base])
        print("%s / python3 -c pass, CPU medians: %.2f (goal <= %.1f)" % (name, ratio, GOAL))
    print("reproduce: %s %s --rounds %d   (as root)"
          % (sys.executable, os.path.relpath(__file__), rounds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return measure(args.rounds)
    if os.geteuid() != 0:
        sys.exit("error: needs root to make a network namespace (run it as root)")
    namespace = "krbench-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__,
                        "--inside", "--rounds", str(args.rounds)], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    main()
