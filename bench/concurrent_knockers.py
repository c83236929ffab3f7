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

With --doors N, knockd.conf holds N-1 more rotator doors, c000_ssh_ROTATOR
and on, each with a secret of its own, as a server with one door per client
has them; nobody knocks them, but knockd compiles all of them (and, during
each grace window, their siblings) into its filter at every reload, and
hears nothing meanwhile.

It prints how many knocks opened the port, how many needed the client's retry
and of which kind (from the client's "knocking again ..." lines), and each
failure with its error output; the knocks by second into the period; the
stretches in which knockd was deaf, reloading (its process state, sampled);
and the server's errors, since a server that gave up leaves stale doors.
Needs root, knockd, iptables and ip (tests/run installs them).

    /usr/bin/python3 bench/concurrent_knockers.py [--rotations 6] [--knockers 10] [--doors 1]
"""

import argparse
import collections
import os
import re
import secrets
import statistics
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
# The doors add-client writes, less their firewall: an accidental opening
# must not let a knocker in.
FILLER = """[{name}_ROTATOR]
\tsequence      = 1
\tseq_timeout   = 15
\ttcpflags      = syn
\tstart_command = true
\tcmd_timeout   = 30
\tstop_command  = true
"""
# knockd handles a knock in well under this; a longer stretch without
# waiting for packets is a reload, which it does inside its SIGHUP handler,
# hearing nothing meanwhile.
BUSY = 0.1
RETRY = re.compile(r"knocking again (with the same sequence|with the previous period's "
                   r"sequence|with use \d+)")


def filler_names(doors):
    return ["c%03d_ssh" % number for number in range(doors - 1)]


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


def watch_knockd(pid, stop, stretches):
    """Until STOP is set or knockd is gone, append to STRETCHES the length
    of each stretch longer than BUSY in which knockd was not waiting for
    packets (its state in /proc, read every 10 ms, other than S)."""
    since = None
    while not stop.is_set():
        try:
            with open("/proc/%d/stat" % pid) as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        now = time.monotonic()
        if state in ("Z", "gone"):
            break
        if state != "S" and since is None:
            since = now
        elif state == "S" and since is not None:
            if now - since > BUSY:
                stretches.append(now - since)
            since = None
        time.sleep(0.01)
    if since is not None and time.monotonic() - since > BUSY:
        stretches.append(time.monotonic() - since)


def measure(folder, rotations, knockers, doors):
    iptables("-A", "INPUT", "-p", "tcp", "--dport", PORT, "-j", "DROP")
    for number in range(knockers):
        iptables("-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-m", "owner", "--uid-owner",
                 UID_BASE + number, "-j", "SNAT", "--to-source", source(number))
    listen(PORT)
    fillers = filler_names(doors)
    knockd, config, log = start_knockd(folder, DOOR + "".join(FILLER.format(name=name)
                                                              for name in fillers))
    env = rotator_env(folder, knockd, PERIOD_MODULO=PERIOD, GRACE=GRACE, CHECK_SECONDS=1,
                      **{"SECRET_" + name.upper(): secrets.token_urlsafe(32)
                         for name in fillers})
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
        time.sleep(max(0.0, first - time.time()))
        stop, deaf = threading.Event(), []
        watcher = threading.Thread(target=watch_knockd, args=(knockd.pid, stop, deaf))
        for thread in threads + [watcher]:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        watcher.join()
        died, gave_up = knockd.poll(), server.poll()
    finally:
        server.terminate()
        knockd.kill()
        for process in (server, knockd):
            process.wait()
    server_errors = [line for line in server_log.read_text().splitlines() if "error:" in line]
    report(outcomes, log.read_text(), first, end, rotations, knockers, doors,
           (deaf, died, server_errors, gave_up))


def report(outcomes, knockd_log, first, end, rotations, knockers, doors, health):
    """HEALTH: (knockd's deaf stretches, its exit code or None, the server's
    error lines, its exit code or None)."""
    deaf, died, server_errors, gave_up = health
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
          "second each, %d s (%d rotations); %d rotator doors in knockd.conf (%d during a "
          "grace window)"
          % (sys.executable, sys.version.split()[0], PERIOD, GRACE, knockers, end - first,
             rotations, doors, 2 * doors))
    print("command: %s %s --rotations %d --knockers %d --doors %d"
          % (sys.executable, os.path.relpath(__file__), rotations, knockers, doors))
    print("opened: %d/%d (%.1f %%; goal 100 %%): %s"
          % (opened, total, 100.0 * opened / total, "met" if opened == total else "NOT MET"))
    print("knocks that needed a retry: %d; retries by kind: %s"
          % (retried, ", ".join("%s %d" % item for item in sorted(kinds.items())) or "none"))
    by_second = collections.defaultdict(lambda: [0, 0, 0])
    for started, code, errors in (entry for o in outcomes for entry in o):
        counts = by_second[int(started % PERIOD)]
        counts[0] += code == 0
        counts[1] += 1
        counts[2] += bool(RETRY.search(errors))
    print("by second into the period (opened/knocks, retried): %s"
          % ", ".join("%d: %d/%d, %d" % ((second,) + tuple(by_second[second]))
                      for second in sorted(by_second)))
    print("knockd deaf (reloading, busy over %g s): %d times, median %.2f s, max %.2f s, "
          "%.0f %% of the %d s%s"
          % (BUSY, len(deaf), statistics.median(deaf) if deaf else 0, max(deaf, default=0),
             100.0 * sum(deaf) / (end - first), end - first,
             "" if died is None else "; knockd EXITED (%d) during the run" % died))
    # A server that failed its events, or gave up, leaves knockd on old doors:
    # the knocks then measure that, not rotations.
    print("server errors: %d%s%s" % (len(server_errors), "" if gave_up is None else
                                     "; the server EXITED (%d) during the run" % gave_up,
                                     "; the first: " + server_errors[0] if server_errors
                                     else ""))
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
    # knockd 0.8 exits at about 1000 doors, as many as 500 rotator doors
    # are during a grace window.
    parser.add_argument("--doors", type=int, choices=range(1, 501), default=1, metavar="1-500",
                        help="rotator doors in knockd.conf, the knocked one included")
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.inside_namespace:
            with tempfile.TemporaryDirectory() as folder:
                measure(Path(folder), args.rotations, args.knockers, args.doors)
            return 0
        need_root_and("knockd", "iptables", "ip")
        return in_own_namespace("krknockers", ["--rotations", str(args.rotations),
                                               "--knockers", str(args.knockers),
                                               "--doors", str(args.doors)])
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
