#!/usr/bin/env python3
"""Benchmark: how the cost of a knockd reload grows with its number of doors,
with and without `knockd -4` (IPv4 only) (issue 16).

In a network namespace of its own (loopback only), for each door count N
(--doors, default 10,50,100,200) and each mode (`knockd -i lo` and
`knockd -4 -i lo`), it starts Debian's knockd 0.8 on a file with N static
doors (each a distinct, non-ascending sequence of --ports TCP ports above
2000, default 3, no port shared by two doors, `command = true`, seq_timeout 5) plus one door,
`timed`, whose knock it times.  Then, --reloads times (default 10):

  deafness   it sends knockd a SIGHUP and at once starts knocking the timed
             door from Python sockets (a SYN per port: a non-blocking connect
             to 127.0.0.1:PORT), a full attempt every 20 ms, each
             attempt from a source address of its own (127.1.x.y; loopback
             accepts all of 127/8), until knockd's log (polled every 2 ms)
             shows `timed: OPEN SESAME` for an attempt sent after the SIGHUP.
             The deafness is the time from the SIGHUP to that log line: knockd
             reloads inside its signal handler and reads no packet meanwhile.
             The source in the log line names the attempt that opened; "sent"
             is the time from the SIGHUP to that attempt's last packet.  It
             shows whether knocks sent during the reload were lost (sent late)
             or only held back in the capture buffer (sent early).  "no
             reload" is the same knock, three times, with no SIGHUP: the cost
             of any knock (knockd reads packets in 50 ms batches).
  memory     VmHWM (peak RSS) of knockd from /proc/PID/status after the
             reloads; VmRSS and PSS (proportional set size, from
             /proc/PID/smaps_rollup: shared pages divided among the processes
             that map them) at rest, 0.3 s after the last reload opened; and
             the growth of VmRSS per reload (the least-squares slope from after
             the first reload to the last) (knockd 0.8 never frees its IPv6
             filter string: about 139 bytes per door per reload).

With --malloc-env, each mode also runs with knockd's environment holding
MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072, as the units
give it (modes `default+malloc`, `-4+malloc`): glibc then serves big blocks
with mmap and hands the heap back after the filter compilation instead of
keeping it, so knockd at rest is smaller; its peak (VmHWM) is not.

A door count whose start or reload takes more than --cap seconds (default 15)
is abandoned for that mode, and so are the larger ones; the table says so.
It prints a table (median and max deafness, the same per door, when the knock
that opened was sent, a knock with no reload, VmHWM, VmRSS and PSS at rest,
RSS growth per reload and per door) and the command to reproduce it.  Needs root, ip and
knockd (tests/run installs them):

    /usr/bin/python3 bench/knockd_scale.py [--doors 10,50,100,200] [--ports 3] [--reloads 10]
        [--malloc-env]
"""

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from knock_latency import INSIDE, in_own_namespace, need_root_and  # noqa: E402

INTERVAL = 0.020          # one full attempt of the timed door every 20 ms
POLL = 0.002              # how often the log is read while waiting
MODES = (("default", []), ("-4", ["-4"]))
# What the units give knockd (knockd_rotator-knockd@.service, the drop-in for
# knockd.service): glibc hands the heap of the filter compilation back.  Read
# from the template unit, so that the benches run knockd as it ships.
UNIT = Path(__file__).resolve().parent.parent / "knockd_rotator-knockd@.service"
MALLOC_ENV = dict(item.split("=", 1) for line in UNIT.read_text().splitlines()
                  if line.startswith("Environment=MALLOC_")
                  for item in line[len("Environment="):].split())
MALLOC_ASSIGNMENTS = " ".join("%s=%s" % item for item in MALLOC_ENV.items())
DOOR = """[{name}]
\tsequence    = {ports}
\tseq_timeout = 5
\ttcpflags    = syn
\tcommand     = true
"""


def sequences(count, length, rng):
    """COUNT sequences of LENGTH ports, no port used twice (so that no door's
    packets disturb another's attempt), none ascending (the second port is
    below the first: an ascending port scan must not open a door by accident)."""
    ports = rng.sample(range(2001, 65536), length * count)
    result = []
    for i in range(count):
        seq = ports[length * i:length * (i + 1)]
        if seq[1] > seq[0]:
            seq[0], seq[1] = seq[1], seq[0]
        result.append(tuple(seq))
    return result


def write_config(path, log, doors, length, rng):
    """The file with DOORS static doors and the timed door; its sequence."""
    seqs = sequences(doors + 1, length, rng)
    parts = ["[options]\n\tlogfile = %s\n" % log]
    for number, seq in enumerate(seqs[:-1]):
        parts.append(DOOR.format(name="door%04d" % number, ports=",".join(map(str, seq))))
    parts.append(DOOR.format(name="timed", ports=",".join(map(str, seqs[-1]))))
    path.touch(mode=0o600)
    path.write_text("".join(parts))
    return seqs[-1]


def status(pid):
    """VmHWM and VmRSS of PID in bytes."""
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def pss(pid):
    """PID's proportional set size in bytes (/proc/PID/smaps_rollup)."""
    for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise OSError("no Pss in smaps_rollup")


class Knocker:
    """Attempts of the timed door, each from a source address of its own, so
    that knockd's `SOURCE: timed: OPEN SESAME` line names the attempt."""

    def __init__(self, sequence):
        self.sequence = sequence
        self.count = 0
        self.sent = {}            # source address: time of its last packet

    def attempt(self):
        self.count = self.count % 60000 + 1     # 127.1.0.2 to 127.1.240.1, then again
        source = "127.1.%d.%d" % (self.count // 250, self.count % 250 + 1)
        for port in self.sequence:
            probe = socket.socket()
            probe.setblocking(False)
            probe.bind((source, 0))
            # The SYN leaves in connect(); no listener, so the kernel answers
            # with a RST, which knockd's filter (destination ports) ignores.
            probe.connect_ex(("127.0.0.1", port))
            probe.close()
        self.sent[source] = time.monotonic()


def opened_sources(text):
    return [line.split("] ", 1)[-1].split(":", 1)[0]
            for line in text.splitlines() if ": timed: OPEN SESAME" in line]


def knock_until_open(knocker, log, since, offset, cap, knockd):
    """Knock every INTERVAL until the log after OFFSET shows an attempt of
    KNOCKER opening; (seconds from SINCE to that attempt's last packet,
    seconds from SINCE to seeing it), or a reason string."""
    next_attempt = time.monotonic()
    with open(log) as stream:
        stream.seek(offset)
        text = ""
        while True:
            now = time.monotonic()
            if now - since > cap:
                return "over %g s" % cap
            if knockd.poll() is not None:
                return "knockd exited (%s)" % knockd.returncode
            if now >= next_attempt:
                knocker.attempt()
                next_attempt += INTERVAL
            text += stream.read()
            opened = [s for s in opened_sources(text) if s in knocker.sent]
            if opened:
                seen = time.monotonic()
                first = min(knocker.sent[s] for s in opened)
                return first - since, seen - since
            time.sleep(min(POLL, max(0.0, next_attempt - time.monotonic())))


def measure_one(folder, doors, length, flags, env, reloads, cap, rng):
    config, log = folder / "knockd.conf", folder / "knockd.log"
    sequence = write_config(config, log, doors, length, rng)
    log.write_text("")
    # -p: the namespace shares the host's file system; keep off its pid file.
    knockd = subprocess.Popen(["knockd"] + flags + ["-i", "lo", "-c", str(config),
                                                    "-p", str(folder / "knockd.pid")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, **env))
    row = {"doors": doors, "deaf": [], "seen": [], "note": ""}
    try:
        knocker = Knocker(sequence)
        started = time.monotonic()
        # Ready once the timed door opens: knockd has compiled its filter.
        result = knock_until_open(knocker, log, started, 0, cap, knockd)
        if isinstance(result, str):
            row["note"] = "start: " + result
            return row
        row["start"] = result[1]
        # The same knock with no reload: what a knock costs anyway (knockd
        # reads packets in 50 ms batches), to set against the reloads.
        row["idle"] = []
        for _ in range(3):
            time.sleep(0.3)
            offset = log.stat().st_size
            knocker.sent.clear()
            since = time.monotonic()
            result = knock_until_open(knocker, log, since, offset, cap, knockd)
            if not isinstance(result, str):
                row["idle"].append(result[1])
        rss = []
        for _ in range(reloads):
            time.sleep(0.3)         # let the `true` children and late openings settle
            offset = log.stat().st_size
            knocker.sent.clear()    # only attempts sent after this SIGHUP count
            since = time.monotonic()
            knockd.send_signal(signal.SIGHUP)
            result = knock_until_open(knocker, log, since, offset, cap, knockd)
            if isinstance(result, str):
                row["note"] = "reload: " + result
                break
            row["deaf"].append(result[0])
            row["seen"].append(result[1])
            rss.append(status(knockd.pid)["VmRSS"])
        if knockd.poll() is None:
            time.sleep(0.3)         # at rest: the `true` children have exited
            row["hwm"] = status(knockd.pid)["VmHWM"]
            row["rss"] = status(knockd.pid)["VmRSS"]
            row["pss"] = pss(knockd.pid)
        if len(rss) >= 3:
            # The least-squares slope from after the first reload on: the
            # first one may grow the heap for good (allocator pools), which is
            # not a leak, and one reload's RSS moves by pages either way.
            points = list(enumerate(rss[1:]))
            mean_x = statistics.mean(x for x, _ in points)
            mean_y = statistics.mean(y for _, y in points)
            row["growth"] = (sum((x - mean_x) * (y - mean_y) for x, y in points)
                             / sum((x - mean_x) ** 2 for x, _ in points))
        return row
    finally:
        knockd.kill()
        knockd.wait()


def modes(malloc_env):
    """(name, knockd's flags, its extra environment) of each mode."""
    result = []
    for mode, flags in MODES:
        result.append((mode, flags, {}))
        if malloc_env:
            result.append((mode + "+malloc", flags, MALLOC_ENV))
    return result


def measure(doors_list, length, reloads, cap, seed, malloc_env):
    rng = random.Random(seed)
    rows = []
    for mode, flags, env in modes(malloc_env):
        abandoned = None
        for doors in doors_list:
            if abandoned:
                rows.append({"mode": mode, "doors": doors, "deaf": [], "seen": [],
                             "note": "skipped (%d doors: %s)" % abandoned})
                continue
            with tempfile.TemporaryDirectory() as folder:
                row = measure_one(Path(folder), doors, length, flags, env, reloads, cap,
                                  rng)
            row["mode"] = mode
            rows.append(row)
            print("  %s, %d doors: %s" % (mode, doors, summary(row)), flush=True)
            if row["note"]:
                abandoned = (doors, row["note"])
    return rows


def summary(row):
    if not row["deaf"]:
        return row["note"]
    deaf = [d * 1000 for d in row["seen"]]
    return "deaf %s ms%s" % (", ".join("%.0f" % d for d in deaf),
                             "; " + row["note"] if row["note"] else "")


def report(rows, doors_list, length, reloads, cap, seed, malloc_env):
    print("knockd: %s; %d reloads per door count and mode; a knock attempt every %d ms%s"
          % (subprocess.run(["knockd", "-V"], capture_output=True, text=True)
             .stdout.splitlines()[0], reloads, INTERVAL * 1000,
             "; +malloc: knockd's environment holds %s"
             % MALLOC_ASSIGNMENTS if malloc_env else ""))
    print("command: %s %s --doors %s --ports %d --reloads %d --cap %g --seed %d%s"
          % (sys.executable, os.path.relpath(__file__), ",".join(map(str, doors_list)),
             length, reloads, cap, seed, " --malloc-env" if malloc_env else ""))
    print()
    print("| doors | mode | deafness median | max | per door | knock that opened, sent |"
          " no reload | VmHWM | VmRSS at rest | PSS at rest | RSS growth per reload |"
          " per door per reload |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["deaf"]:
            print("| %d | %s | %s | | | | | | | | | |"
                  % (row["doors"], row["mode"], row["note"]))
            continue
        deaf = statistics.median(row["seen"]) * 1000
        growth = row.get("growth")
        print("| %d | %s | %.0f ms | %.0f ms | %.2f ms | %.0f ms (max %.0f) | %s | %s | %s | %s |"
              " %s | %s |%s"
              % (row["doors"], row["mode"], deaf, max(row["seen"]) * 1000,
                 deaf / row["doors"], statistics.median(row["deaf"]) * 1000,
                 max(row["deaf"]) * 1000,
                 "%.0f ms" % (statistics.median(row["idle"]) * 1000) if row["idle"] else "?",
                 "%.1f MB" % (row["hwm"] / 1e6) if "hwm" in row else "?",
                 "%.1f MB" % (row["rss"] / 1e6) if "rss" in row else "?",
                 "%.1f MB" % (row["pss"] / 1e6) if "pss" in row else "?",
                 "%.1f KB" % (growth / 1024) if growth is not None else "?",
                 "%.0f B" % (growth / row["doors"]) if growth is not None else "?",
                 " " + row["note"] if row["note"] else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--doors", default="10,50,100,200",
                        help="door counts, comma-separated (default 10,50,100,200)")
    parser.add_argument("--ports", type=int, default=3,
                        help="ports in each door's sequence (default 3; at most 32)")
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--cap", type=float, default=15.0,
                        help="seconds a start or reload may take before that door count "
                             "and the larger ones are skipped (default 15)")
    parser.add_argument("--seed", type=int, default=16, help="of the random sequences")
    parser.add_argument("--malloc-env", action="store_true",
                        help="also run each mode with the units' glibc environment for "
                             "knockd (%s)" % MALLOC_ASSIGNMENTS)
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    doors_list = sorted(int(d) for d in args.doors.split(","))
    try:
        if args.inside_namespace:
            rows = measure(doors_list, args.ports, args.reloads, args.cap, args.seed,
                           args.malloc_env)
            report(rows, doors_list, args.ports, args.reloads, args.cap, args.seed,
                   args.malloc_env)
            return 0
        need_root_and("knockd", "ip")
        if not 2 <= args.ports <= 32:
            sys.exit("error: --ports must be 2 to 32 (knockd's limit)")
        return in_own_namespace("krscale", ["--doors", args.doors, "--ports", str(args.ports),
                                            "--reloads",
                                            str(args.reloads), "--cap", str(args.cap),
                                            "--seed", str(args.seed)]
                                + (["--malloc-env"] if args.malloc_env else []))
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
