#!/usr/bin/env python3
"""Benchmark: knocks across rotations, with the server in --watch mode.

In a network namespace of its own: a listener on port 2222 behind an iptables
DROP, Debian's knockd with one [ssh_ROTATOR] door, and
`knockd_rotator_server.py --watch` with a 10 s period and the default grace
(5 s at that period).  Once a second a fresh client process runs
`knock 127.0.0.1 ssh --check 2222`; after each knock the door's rule is
removed so that every attempt starts closed.  It prints:

  - the success ratio, and how many knocks needed the client's retry;
  - the lag from each of the server's events (the start of the lead, 5 s
    before each boundary at this period, and the grace end: here the same
    moment) to knockd having re-read its file (seen in knockd's log, polled
    every 2 ms): median and max;
  - the number of reloads.

It runs three series: knocks started on the whole second, half a second
later, and 30 ms before the whole second (a client takes about that long to
start, so those knocks go out as knockd re-reads its file: the worst case).  Needs root, knockd and
iptables (tests/run installs them).

    python3 bench/rotation.py [--rotations 5] [--period 10]
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "knockd_rotator_client.py"
SERVER = ROOT / "knockd_rotator_server.py"
sys.path.insert(0, str(ROOT))
from knockd_rotator.core.settings import DEFAULT_LEAD  # noqa: E402
PORT = 2222
DOOR = """[options]
\tlogfile = {log}
[ssh_ROTATOR]
\tsequence      = 1
\tseq_timeout   = 5
\ttcpflags      = syn
\tstart_command = iptables -I INPUT -s %IP% -p tcp --dport {port} -j ACCEPT
\tcmd_timeout   = 600
\tstop_command  = iptables -D INPUT -s %IP% -p tcp --dport {port} -j ACCEPT
"""
LISTENER = ("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', %d))\ns.listen(16)\n"
            "while True: s.accept()[0].close()\n" % PORT)


class LogWatcher(threading.Thread):
    """Notes the wall time at which each `re-reading config file` line appears."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.times, self.stopping = path, [], False

    def run(self):
        seen = 0
        while not self.stopping:
            count = self.path.read_text(errors="replace").count("re-reading config file")
            now = time.time()
            self.times.extend([now] * (count - seen))
            seen = count
            time.sleep(0.002)


def run_in(namespace, *command, **kwargs):
    return subprocess.run(["ip", "netns", "exec", namespace] + [str(c) for c in command],
                          **kwargs)


def knock_series(namespace, env, phase, seconds):
    """A knock each second at PHASE past the second: [(time, ok, retried)]."""
    outcomes = []
    moment = int(time.time()) + 1 + phase
    end = moment + seconds
    while moment < end:
        time.sleep(max(0.0, moment - time.time()))
        started = time.time()
        result = run_in(namespace, sys.executable, CLIENT, "knock", "127.0.0.1", "ssh",
                        "--check", PORT, "--check-timeout", "3", env=env,
                        capture_output=True, text=True)
        outcomes.append((started, result.returncode == 0, "knocking again" in result.stderr))
        while "-j ACCEPT" in run_in(namespace, "iptables", "-S", "INPUT", capture_output=True,
                                    text=True).stdout:
            run_in(namespace, "iptables", "-D", "INPUT", "-s", "127.0.0.1", "-p", "tcp",
                   "--dport", PORT, "-j", "ACCEPT", check=True)
        moment = max(moment + 1, int(time.time()) + phase + (time.time() % 1 > phase))
    return outcomes


def events_between(first, last, period, grace, lead):
    """The server's events from FIRST to LAST: leads' starts (LEAD seconds
    before each boundary) and grace ends, which may be the same moment."""
    events = set()
    start = int(first) // period * period
    while start <= last + lead:
        events.update(e for e in (start - lead, start + grace) if first <= e <= last)
        start += period
    return sorted(events)


def measure(namespace, folder, args):
    config, log = folder / "knockd.conf", folder / "knockd.log"
    config.write_text(DOOR.format(log=log, port=PORT))
    log.write_text("")
    run_in(namespace, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", PORT, "-j", "DROP",
           check=True)
    listener = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c",
                                 LISTENER])
    knockd = subprocess.Popen(["ip", "netns", "exec", namespace, "knockd", "-i", "lo", "-c",
                               str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while "listening on lo" not in log.read_text():
        time.sleep(0.01)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    env.update(KNOCKD_ROTATOR_SECRET="benchmark-secret-0123456789",
               KNOCKD_ROTATOR_PERIOD_MODULO=str(args.period),
               KNOCKD_ROTATOR_STATE_DIR=str(folder / "state"),
               KNOCKD_ROTATOR_ENV_FILE=str(folder / "absent.env"),
               KNOCKD_ROTATOR_RELOAD_COMMAND="kill -HUP %d" % knockd.pid,
               KNOCKD_ROTATOR_CHECK_COMMAND="kill -0 %d" % knockd.pid,
               KNOCKD_ROTATOR_RECOVER_COMMAND="false", KNOCKD_ROTATOR_CHECK_SECONDS="1")
    grace = min(30, args.period // 2)
    lead = min(DEFAULT_LEAD, args.period - grace)
    watcher = LogWatcher(log)
    watcher.start()
    server = subprocess.Popen([sys.executable, str(SERVER), "--watch", "--config", str(config)],
                              env=env, stderr=open(folder / "server.log", "wb"))
    try:
        while not watcher.times:
            if server.poll() is not None:
                sys.exit("error: the server stopped: " + (folder / "server.log").read_text())
            time.sleep(0.01)
        began = time.time()
        series = {phase: knock_series(namespace, env, phase, args.rotations * args.period)
                  for phase in (0.0, 0.5, 0.97)}
        ended = time.time()
    finally:
        server.terminate()
        server.wait()
        watcher.stopping = True
        # SIGKILL: on SIGTERM knockd waits for a door's child (cmd_timeout).
        for process in (knockd, listener):
            process.kill()
            process.wait()
    events = events_between(began, ended - 0.5, args.period, grace, lead)
    lags = []
    for event in events:
        after = [t - event for t in watcher.times if event <= t < event + grace]
        lags.append(min(after) if after else float("inf"))

    print("interpreter: %s (Python %s); period %d s, grace %d s, lead %d s, %d s of knocks "
          "per series" % (sys.executable, sys.version.split()[0], args.period, grace, lead,
                          args.rotations * args.period))
    for phase, outcomes in series.items():
        ok = sum(1 for _, success, _ in outcomes if success)
        retried = sum(1 for _, success, again in outcomes if success and again)
        print("knocks at +%.2f s past the second: %d/%d opened (%.1f%%), %d of them on the "
              "client's retry" % (phase, ok, len(outcomes), 100.0 * ok / len(outcomes), retried))
        for started, success, again in outcomes:
            if not success or again:
                print("    %s at %.2f s into the period" % (
                    "retried" if success else "FAILED", started % args.period))
    print("leads' starts and grace ends: %d; reloads seen: %d (1 at start-up)"
          % (len(events), len(watcher.times)))
    print("lag from event to knockd re-reading its file: median %.0f ms, max %.0f ms "
          "(goal: at most 1000 ms)" % (statistics.median(lags) * 1000, max(lags) * 1000))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rotations", type=int, default=5)
    parser.add_argument("--period", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: needs root to make a network namespace (run it as root)")
    for program in ("knockd", "iptables", "ip"):
        if not shutil.which(program):
            sys.exit("error: needs %s (tests/run installs it)" % program)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))   # clean up all the same
    namespace = "krbench-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        with tempfile.TemporaryDirectory() as folder:
            measure(namespace, Path(folder), args)
    finally:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                              text=True).stdout.split()
        subprocess.run(["kill", "-KILL"] + pids, check=False, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    main()
