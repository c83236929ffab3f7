#!/usr/bin/env python3
"""Benchmark: 10 concurrent knockers across rotations (issue 14, reliability).

In a network namespace of its own (loopback only): a listener on port 2222
behind an iptables DROP, Debian's knockd with one [ssh_ROTATOR] door that
inserts an ACCEPT for the knocking address, and `knockd_rotator_server.py
--watch` with a 10 s period and a 5 s grace.  Ten knockers each start a fresh
`knockd_rotator_client.py knock 127.0.0.1 ssh --check 2222` on every whole
second, all ten at once, for 6 rotations; after each knock this script
deletes that knocker's ACCEPT rule, so that every knock starts closed.

Knocker N (0-9) runs as uid 40000+N, and an iptables SNAT rule in the
namespace's nat POSTROUTING, matched on that uid, gives its packets (knocks
and connects alike) the source 127.0.0.(N+2): ten distinct sources to knockd,
each with a rule of its own, although the client cannot bind an address.
knockd's log, which names each source, shows that it worked.

It prints how many knocks opened the port, how many needed the client's retry
and of which kind (from the client's "knocking again ..." lines), and each
failure with its error output.  Needs root, knockd, iptables and ip
(tests/run installs them).

    /usr/bin/python3 bench/concurrent_knockers.py [--rotations 6] [--knockers 10]
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from knock_latency import (CLIENT, INSIDE, SERVER, door, iptables, in_own_namespace, listen,
                           need_root_and, rotator_env, start_knockd)

PORT = 2222
PERIOD = 10
GRACE = 5
UID_BASE = 40000
# No stop_command: this script removes each rule itself, right after the
# knock; a stop_command run cmd_timeout later could delete the rule of the
# same knocker's next knock before its connect got through.
DOOR = door(PORT)
RETRY = re.compile(r"knocking again (with the same sequence|with the previous period's "
                   r"sequence|with use \d+)")


def source(knocker):
    return "127.0.0.%d" % (knocker + 2)


def knocker(number, env, first, end, outcomes):
    """Knock at each whole second from FIRST until END; append (start time,
    exit code, stderr) to OUTCOMES."""
    moment = first
    while moment < end:
        time.sleep(max(0.0, moment - time.time()))
        started = time.time()
        result = subprocess.run([sys.executable, str(CLIENT), "knock", "127.0.0.1", "ssh",
                                 "--check", str(PORT)], env=env, capture_output=True,
                                text=True, user=UID_BASE + number, group=UID_BASE + number,
                                extra_groups=[])
        outcomes.append((started, result.returncode, result.stderr))
        # A retry may have opened it twice: delete until none is left.
        while iptables("-D", "INPUT", "-s", source(number), "-p", "tcp", "--dport", PORT,
                       "-j", "ACCEPT", check=False).returncode == 0:
            pass
        # A knock that took over a second (a retry) skips the seconds it used.
        moment = max(moment + 1, int(time.time()) + 1)


def measure(folder, rotations, knockers):
    iptables("-A", "INPUT", "-p", "tcp", "--dport", PORT, "-j", "DROP")
    for number in range(knockers):
        iptables("-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-m", "owner", "--uid-owner",
                 UID_BASE + number, "-j", "SNAT", "--to-source", source(number))
    listen(PORT)
    knockd, config, log = start_knockd(folder, DOOR)
    env = rotator_env(folder, knockd, PERIOD_MODULO=PERIOD, GRACE=GRACE, CHECK_SECONDS=1)
    server_log = folder / "server.log"
    server = subprocess.Popen([sys.executable, str(SERVER), "--watch", "--config", str(config)],
                              env=env, stderr=open(server_log, "wb"))
    try:
        while "re-reading config file" not in log.read_text():
            if server.poll() is not None:
                sys.exit("error: the server stopped: " + server_log.read_text())
            time.sleep(0.01)
        # Start on a boundary, so that the run holds ROTATIONS whole periods.
        first = (int(time.time()) // PERIOD + 1) * PERIOD
        end = first + rotations * PERIOD
        outcomes = [[] for _ in range(knockers)]
        threads = [threading.Thread(target=knocker, args=(n, env, first, end, outcomes[n]))
                   for n in range(knockers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.terminate()
        knockd.kill()
        for process in (server, knockd):
            process.wait()
    report(outcomes, log.read_text(), first, end, rotations, knockers)


def report(outcomes, knockd_log, first, end, rotations, knockers):
    total = sum(len(o) for o in outcomes)
    opened = sum(1 for o in outcomes for _, code, _ in o if code == 0)
    kinds = collections.Counter()
    retried = 0
    for _, code, errors in (entry for o in outcomes for entry in o):
        found = RETRY.findall(errors)
        retried += bool(found)
        kinds.update("use N" if kind.startswith("with use") else kind[5:] for kind in found)
    sesames = collections.Counter(re.findall(r"\] (\S+): ssh_ROTATOR\S*: OPEN SESAME",
                                             knockd_log))
    print("interpreter: %s (Python %s); period %d s, grace %d s; %d knockers, one knock a "
          "second each, %d s (%d rotations)"
          % (sys.executable, sys.version.split()[0], PERIOD, GRACE, knockers, end - first,
             rotations))
    print("command: %s %s --rotations %d --knockers %d"
          % (sys.executable, os.path.relpath(__file__), rotations, knockers))
    print("opened: %d/%d (%.1f %%; goal 100 %%): %s"
          % (opened, total, 100.0 * opened / total, "met" if opened == total else "NOT MET"))
    print("knocks that needed a retry: %d; retries by kind: %s"
          % (retried, ", ".join("%s %d" % item for item in sorted(kinds.items())) or "none"))
    print("sources in knockd's log (OPEN SESAME per source): %d distinct: %s"
          % (len(sesames), ", ".join("%s %d" % item for item in sorted(sesames.items()))))
    for number, entries in enumerate(outcomes):
        for started, code, errors in entries:
            if code != 0:
                print("FAILED: knocker %s at %.2f s into the period (exit %d):\n    %s"
                      % (source(number), started % PERIOD, code,
                         errors.strip().replace("\n", "\n    ")))
            elif RETRY.search(errors):
                print("retried: knocker %s at %.2f s into the period: %s"
                      % (source(number), started % PERIOD, "; ".join(RETRY.findall(errors))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rotations", type=int, default=6)
    parser.add_argument("--knockers", type=int, choices=range(1, 254), default=10,
                        metavar="1-253")
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.inside_namespace:
            with tempfile.TemporaryDirectory() as folder:
                measure(Path(folder), args.rotations, args.knockers)
            return 0
        need_root_and("knockd", "iptables", "ip")
        return in_own_namespace("krknockers", ["--rotations", str(args.rotations),
                                               "--knockers", str(args.knockers)])
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
