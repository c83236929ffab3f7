#!/usr/bin/env python3
"""Benchmark: 10 concurrent knockers across rotations (issue 14, reliability),
with the doors spread over several knockd as add-client spreads them.

In a network namespace of its own (loopback only): listeners on ports 2222 to
2231, one for each knocker, behind an iptables DROP; --doors N rotator doors,
each with a secret of its own, placed as add-client places them: --per-knockd
K in knockd.conf, then K in each instance file knockd_rotator.d/1.conf,
2.conf, ... (K 0: all in knockd.conf, one knockd, as before the server ran
several; the default is the server's); one Debian knockd per file (`knockd
-d`, with the glibc settings of the units: MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ 131072), and `knockd_rotator_server.py --watch` (10 s
period, 5 s grace) rotating them all, with the instance commands
(KNOCKD_ROTATOR_INSTANCE_*_COMMAND, `%i` the instance's number) working on
each knockd's pid file.

Ten knockers each start a fresh `knockd_rotator_client.py knock 127.0.0.1
DOOR --check 2222+N` (knocker N) on every whole second, all ten at once, for
6 rotations.  The knockers are spread evenly over the knockd, the first and
the last included (knocker i: knockd round(i (M-1) / 9) of M), each with a
door of its own while its knockd has enough: knocks are in progress while
other knockd reload, and the last knockd, which the server's pass over the
files reaches last, is knocked too.  Each knocked door's start_command
inserts an ACCEPT for the knocking address (the other doors' commands are
`true`: an accidental opening lets nobody in).  After each knock this script
deletes that knocker's ACCEPT rule, so that every knock starts closed.

Knocker N (0-9) runs as uid 40000+N, and an iptables SNAT rule in the
namespace's nat POSTROUTING, matched on that uid, gives its packets (knocks
and connects alike) the source 127.0.0.(N+2): ten distinct sources to
knockd, each with a rule of its own, although the client cannot bind an
address.  knockd's logs, which name each source, show that it worked.  Each
knocker checks a port of its own because conntrack keeps the address
translation of a tuple (127.0.0.1:P to 127.0.0.1:PORT) for as long as it
keeps the entry, a dropped SYN's for 2 minutes: a knocker whose connect
reused a source port that another knocker's dropped SYN used came in with
that knocker's address, through its door, and counted as opened.  A check
counts connections from another address, and knocks that opened without a
rule of their own (both should be 0).

It prints how many knocks opened the port, how many needed the client's retry
and of which kind (from the client's "knocking again ..." lines), and each
failure with its error output; the knocks by second into the period; for each
knockd, the stretches in which it was deaf, reloading (its process state,
sampled every 10 ms); the rotation lag (from each boundary until the knockd's
file holds the new period's sequence, negative when before it: the server
starts KNOCKD_ROTATOR_LEAD seconds before the boundary, and walks the files,
one knockd compiling per CPU at a time; a knockd whose file it has not
reached by the boundary opens only to the previous sequence, which the
client tries on its retry, within the grace); and the server's errors, since
a server that gave up leaves stale doors.  Needs root, knockd, iptables and
ip (tests/run installs them).

    /usr/bin/python3 bench/concurrent_knockers.py [--rotations 6] [--knockers 10]
        [--doors 1] [--per-knockd K] [--lead L]     (K, L: the server's defaults)
"""

import argparse
import collections
import os
import re
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from knock_latency import CLIENT, INSIDE, SERVER, iptables, in_own_namespace, need_root_and
from knockd_scale import MALLOC_ASSIGNMENTS

sys.path.insert(0, str(SERVER.parent))
from knockd_rotator.core import settings as core_settings  # noqa: E402
from knockd_rotator.engines.knockd import config as knockd_config  # noqa: E402
from knockd_rotator.engines.knockd import grace as knockd_grace  # noqa: E402
from knockd_rotator.engines.knockd import instances  # noqa: E402

PORT = 2222             # knocker N checks PORT + N
PERIOD = 10
GRACE = 5
UID_BASE = 40000
# A knocked door: it lets the knocking address reach the knockers' ports (the
# address tells the knockers apart).  No stop_command: this script removes
# each rule itself, right after the knock; a stop_command run cmd_timeout
# later could delete the rule of the same knocker's next knock before its
# connect got through.
KNOCKED = """[{name}_ROTATOR]
\tsequence      = 1
\tseq_timeout   = 5
\ttcpflags      = syn
\tstart_command = iptables -I INPUT -s %IP% -p tcp --dport {ports} -j ACCEPT
"""
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
LOOK = 0.01          # seconds between two samples of every knockd and file
RETRY = re.compile(r"knocking again (with the same sequence|with the previous period's "
                   r"sequence|with use \d+)")


def door_name(number):
    return "d%04d_ssh" % number


def source(knocker):
    return "127.0.0.%d" % (knocker + 2)


def ports(knockers):
    """The guarded ports, for iptables: one for each knocker."""
    return "%d:%d" % (PORT, PORT + knockers - 1)


def listen(count, accepted):
    """Listeners on 127.0.0.1:PORT to PORT+COUNT-1 that accept and close, in
    a thread; ACCEPTED counts the connections by (port, source address)."""
    chooser = selectors.DefaultSelector()
    for port in range(PORT, PORT + count):
        server_socket = socket.socket()
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server_socket.bind(("127.0.0.1", port))
        server_socket.listen(64)
        chooser.register(server_socket, selectors.EVENT_READ, port)

    def serve():
        while True:
            for key, _ in chooser.select():
                connection, (address, _) = key.fileobj.accept()
                connection.close()
                accepted[key.data, address] += 1
    threading.Thread(target=serve, daemon=True).start()


def layout(doors, per_knockd):
    """The door numbers of each knockd's file, knockd.conf first, as
    add-client places them one by one: into the file with the fewest doors
    while that has fewer than PER_KNOCKD, else into a new instance file
    (PER_KNOCKD 0: no limit, so all in knockd.conf)."""
    if per_knockd == 0:
        return [list(range(doors))]
    return [list(range(first, min(first + per_knockd, doors)))
            for first in range(0, doors, per_knockd)]


def knocked_doors(files, knockers):
    """{knocker: door}: the knockers spread evenly over the knockd, the first
    and the last included (the server rotates the files in order, so the
    last knockd gets its new sequence last), each knocker with a door of
    its own as long as its knockd has enough."""
    knocked, taken = {}, collections.Counter()
    for number in range(knockers):
        index = round(number * (len(files) - 1) / max(1, knockers - 1))
        members = files[index]
        knocked[number] = members[taken[index] % len(members)]
        taken[index] += 1
    return knocked


def knockd_of(files, door):
    return next(index for index, members in enumerate(files) if door in members)


class Knockd:
    """The paths of one knockd: INDEX 0 reads knockd.conf, INDEX n its instance file n."""

    def __init__(self, folder, index):
        self.index = index
        if index == 0:
            self.config, self.pidfile = folder / "knockd.conf", folder / "knockd.pid"
            self.log = folder / "knockd.log"
        else:
            self.config = folder / instances.INSTANCE_FOLDER / ("%d.conf" % index)
            self.pidfile = folder / ("knockd-%d.pid" % index)
            self.log = folder / ("knockd-%d.log" % index)

    def pid(self):
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------- shared with
# bench/add_client.py, which imports these.

def commands(config, pidfile):
    """The server's reload, check, recover and kill commands for the knockd
    that reads CONFIG and writes PIDFILE (either may hold %i).  knockd -d
    returns before its child writes the pid file: recover waits for it, as
    `systemctl start` waits for the service.  The check does not take a
    zombie for knockd (nothing reaps an orphan here)."""
    return {
        "RELOAD_COMMAND": "kill -HUP $(cat %s)" % pidfile,
        "CHECK_COMMAND": 'case "$(cat /proc/$(cat %s 2>/dev/null)/stat 2>/dev/null)" in '
                         '*") "[!ZX]*) ;; *) false;; esac' % pidfile,
        "RECOVER_COMMAND": "rm -f {p}; {m} knockd -d -i lo -c {c} -p {p} && i=0; "
                           "while [ ! -s {p} ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); "
                           "done".format(p=pidfile, c=config, m=MALLOC_ASSIGNMENTS),
        "KILL_COMMAND": "kill -KILL $(cat %s)" % pidfile}


def state_of(pid):
    """knockd's state letter in /proc (S: waiting for packets), or "gone"."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# ---------------------------------------------------------------- this benchmark

def start_knockds(folder, files, knocked):
    """Write each knockd's file (FILES, see layout) and start its knockd, as
    the server's recover command would; return the Knockds once all listen."""
    knockds = [Knockd(folder, index) for index in range(len(files))]
    if len(files) > 1:
        (folder / instances.INSTANCE_FOLDER).mkdir(mode=0o700)
    knocked_set = set(knocked.values())
    for knockd, members in zip(knockds, files):
        knockd.config.touch(mode=0o600)     # live sequences: the server warns of a readable file
        knockd.config.write_text("[options]\n\tlogfile = %s\n" % knockd.log + "".join(
            (KNOCKED if door in knocked_set else FILLER).format(name=door_name(door),
                                                                ports=ports(len(knocked)))
            for door in members))
        knockd.log.write_text("")
        start = commands(knockd.config, knockd.pidfile)["RECOVER_COMMAND"]
        subprocess.run(start, shell=True, check=True)
    deadline = time.monotonic() + 30
    for knockd in knockds:
        while "listening on lo" not in knockd.log.read_text():
            if time.monotonic() > deadline:
                sys.exit("error: knockd %d did not start: %s"
                         % (knockd.index, knockd.log.read_text()))
            time.sleep(0.01)
    return knockds


def rotator_env(folder, doors, per_knockd, lead):
    """The environment of the server and the clients: the knockds of FOLDER,
    a secret for each door; no environment file.  LEAD None: the server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    settings = dict(SECRET=secrets.token_urlsafe(32), STATE_DIR=folder / "state",
                    ENV_FILE=folder / "absent.env", PERIOD_MODULO=PERIOD, GRACE=GRACE,
                    CHECK_SECONDS=1, DOORS_PER_KNOCKD=per_knockd)
    if lead is not None:
        settings["LEAD"] = lead
    settings.update(commands(folder / "knockd.conf", folder / "knockd.pid"))
    settings.update(("INSTANCE_" + name, command) for name, command in commands(
        folder / instances.INSTANCE_FOLDER / "%i.conf", folder / "knockd-%i.pid").items())
    settings.update(("SECRET_" + door_name(door).upper(), secrets.token_urlsafe(32))
                    for door in range(doors))
    env.update({"KNOCKD_ROTATOR_" + name: str(value) for name, value in settings.items()})
    return env


def close_iptables(number, knockers):
    """Delete knocker NUMBER's ACCEPT rules (a retry may have opened it
    twice: until none is left); how many there were."""
    deleted = 0
    while iptables("-D", "INPUT", "-s", source(number), "-p", "tcp", "--dport",
                   ports(knockers), "-j", "ACCEPT", check=False).returncode == 0:
        deleted += 1
    return deleted


def knocker(number, door, env, first, end, outcomes, knockers, close=close_iptables):
    """Knock DOOR at each whole second from FIRST until END; append (start
    time, exit code, stderr, what CLOSE(number, knockers) closed after it:
    the ACCEPT rules deleted) to OUTCOMES."""
    moment = first
    while moment < end:
        time.sleep(max(0.0, moment - time.time()))
        started = time.time()
        result = subprocess.run([sys.executable, str(CLIENT), "knock", "127.0.0.1",
                                 door_name(door), "--check", str(PORT + number)], env=env,
                                capture_output=True, text=True, user=UID_BASE + number,
                                group=UID_BASE + number, extra_groups=[])
        outcomes.append((started, result.returncode, result.stderr, close(number, knockers)))
        # A knock that took over a second (a retry) skips the seconds it used.
        moment = max(moment + 1, int(time.time()) + 1)


def distinct_sources(knockers):
    """Knocker N (0-9) runs as uid UID_BASE+N; an SNAT rule matched on that
    uid gives its packets the source 127.0.0.(N+2) (see the module's docstring)."""
    for number in range(knockers):
        iptables("-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-m", "owner", "--uid-owner",
                 UID_BASE + number, "-j", "SNAT", "--to-source", source(number))


def run_knockers(knocked, env, first, end, close=close_iptables):
    """Each knocker (KNOCKED: {number: door}) knocks its door once a second
    from FIRST until END, all at once, in threads; [[its outcomes]] (see knocker)."""
    outcomes = [[] for _ in knocked]
    threads = [threading.Thread(target=knocker, args=(n, knocked[n], env, first, end,
                                                        outcomes[n], len(knocked), close))
               for n in range(len(knocked))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def watch(knockds, stop, deaf, rewrites):
    """Until STOP is set: append to DEAF[i] the (start, length) of each
    stretch longer than BUSY in which knockd i was not waiting for packets
    (its state in /proc, other than S), and to REWRITES the (time, i, bytes)
    of each new version of knockd i's file (the server replaces it: a new
    modification time)."""
    pids = [knockd.pid() for knockd in knockds]
    since = [None] * len(knockds)
    stamps = [None] * len(knockds)
    while not stop.is_set():
        for index, pid in enumerate(pids):
            state = state_of(pid)
            now = time.monotonic()
            busy = state not in ("S", "Z", "X", "gone")
            if busy and since[index] is None:
                since[index] = now
            elif not busy and since[index] is not None:
                if now - since[index] > BUSY:
                    deaf[index].append((time.time() - (now - since[index]), now - since[index]))
                since[index] = None
            try:
                stamp = knockds[index].config.stat().st_mtime_ns
                if stamp != stamps[index]:
                    data = knockds[index].config.read_bytes()
                    if stamps[index] is not None:
                        rewrites.append((time.time(), index, data))
                    stamps[index] = stamp
            except OSError:
                continue
        time.sleep(LOOK)
    now = time.monotonic()
    for index, started in enumerate(since):
        if started is not None and now - started > BUSY:
            deaf[index].append((time.time() - (now - started), now - started))


def measure(folder, rotations, knockers, doors, per_knockd, lead):
    iptables("-A", "INPUT", "-p", "tcp", "--dport", ports(knockers), "-j", "DROP")
    distinct_sources(knockers)
    accepted = collections.Counter()
    listen(knockers, accepted)
    files = layout(doors, per_knockd)
    knocked = knocked_doors(files, knockers)
    knockds = []
    server_log = folder / "server.log"
    process = None
    try:
        knockds = start_knockds(folder, files, knocked)
        env = rotator_env(folder, doors, per_knockd, lead)
        process = subprocess.Popen([sys.executable, str(SERVER), "--watch", "--config",
                                    str(knockds[0].config)], env=env,
                                   stderr=open(server_log, "wb"))
        # The server's first rotation gives every door its sequence.
        deadline = time.monotonic() + 120
        for knockd in knockds:
            while "re-reading config file" not in knockd.log.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit("error: the server did not rotate %s: %s"
                             % (knockd.config, server_log.read_text()))
                time.sleep(0.01)
        # Start on a boundary, so that the run holds ROTATIONS whole periods,
        # and a period from now, so that the watcher sees its lead's rewrites.
        first = (int(time.time()) // PERIOD + 2) * PERIOD
        end = first + rotations * PERIOD
        # The watcher starts before the first boundary, to see its rewrites.
        stop, deaf, rewrites = threading.Event(), [[] for _ in knockds], []
        watcher = threading.Thread(target=watch, args=(knockds, stop, deaf, rewrites))
        watcher.start()
        outcomes = run_knockers(knocked, env, first, end)
        stop.set()
        watcher.join()
        died = [knockd.index for knockd in knockds
                if state_of(knockd.pid() or 0) in ("Z", "X", "gone")]
        gave_up = process.poll()
    finally:
        if process is not None:
            process.terminate()
            process.wait()
        for knockd in knockds:
            subprocess.run(commands(knockd.config, knockd.pidfile)["KILL_COMMAND"],
                           shell=True, stderr=subprocess.DEVNULL)
    server_errors = [line for line in server_log.read_text().splitlines() if "error:" in line]
    logs = [knockd.log.read_text() for knockd in knockds]
    lags = boundary_lags(rewrites, files, env, first, end)
    # Deafness within the run only, cut to it.
    deaf = [[min(end, start + length) - max(first, start) for start, length in stretches
             if start + length > first and start < end] for stretches in deaf]
    report(outcomes, logs, files, knocked,
           (first, end, rotations, knockers, doors, per_knockd, env),
           (deaf, lags, died, server_errors, gave_up, accepted))


def boundary_lags(rewrites, files, env, first, end):
    """[[lag of knockd i at each boundary] for each knockd i]: from each
    boundary from FIRST to END to the first version of knockd i's file
    (REWRITES, see watch) whose first door holds the new period's sequence;
    negative when it came before the boundary, as the server's lead has it.
    None: not within the run."""
    settings_of = core_settings.settings_reader(env)
    lags = []
    for index, members in enumerate(files):
        door = door_name(members[0]) + "_ROTATOR"
        held = [(moment, knockd_config.door_sequences(knockd_grace.split_grace_block(
            knockd_config.parse_config(data))[0]).get(door)) for moment, found, data in rewrites
            if found == index]
        lags.append([next((moment - boundary for moment, sequence in held
                           if sequence == settings_of(door).sequence_at(boundary)), None)
                     for boundary in range(first, end, PERIOD)])
    return lags


def report(outcomes, logs, files, knocked, run, health):
    """RUN: (first, end, rotations, knockers, doors, per_knockd, env).  HEALTH:
    (the deaf stretches of each knockd, its boundary lags, the knockd that
    exited, the server's error lines, its exit code or None, the listeners'
    connections by (port, source address))."""
    first, end, rotations, knockers, doors, per_knockd, env = run
    deaf, lags, died, server_errors, gave_up, accepted = health
    span = end - first
    entries = [entry for o in outcomes for entry in o]
    total = len(entries)
    opened = sum(1 for _, code, _, _ in entries if code == 0)
    kinds = collections.Counter()
    retried = 0
    for _, code, errors, _ in entries:
        found = RETRY.findall(errors)
        retried += bool(found)
        kinds.update("use N" if kind.startswith("with use") else kind[5:] for kind in found)
    lead = core_settings.rotation_settings(env, door_name(0) + "_ROTATOR").lead
    print("interpreter: %s (Python %s); period %d s, grace %d s, lead %d s; %d knockers, one "
          "knock a second each, %d s (%d rotations)"
          % (sys.executable, sys.version.split()[0], PERIOD, GRACE, lead, knockers, span,
             rotations))
    print("doors: %d rotator doors (%d during a grace window) in %d knockd, %s; knocked: %d "
          "doors in %d knockd"
          % (doors, 2 * doors, len(files),
             "all in knockd.conf (--per-knockd 0)" if per_knockd == 0 else
             "at most %d a knockd (knockd.conf, then knockd_rotator.d/1.conf ...)" % per_knockd,
             len(set(knocked.values())),
             len({knockd_of(files, door) for door in knocked.values()})))
    print("command: %s %s --rotations %d --knockers %d --doors %d --per-knockd %d%s"
          % (sys.executable, os.path.relpath(__file__), rotations, knockers, doors, per_knockd,
             "" if "KNOCKD_ROTATOR_LEAD" not in env else " --lead %d" % lead))
    print("opened: %d/%d (%.1f %%; goal 100 %%): %s"
          % (opened, total, 100.0 * opened / total, "met" if opened == total else "NOT MET"))
    print("knocks that needed a retry: %d; retries by kind: %s"
          % (retried, ", ".join("%s %d" % item for item in sorted(kinds.items())) or "none"))
    # Each knocker has a port and an address of its own: a connection from
    # another address, or a knock that opened without leaving a rule of its
    # own, would be one knocker getting in through another's door.
    strays = sum(count for (port, address), count in accepted.items()
                 if address != source(port - PORT))
    unruled = sum(1 for _, code, _, deleted in entries if code == 0 and not deleted)
    print("checks: connections from an address not the knocker's: %d; knocks that opened "
          "with no ACCEPT rule of the knocker's to delete: %d (both should be 0)"
          % (strays, unruled))
    by_second = collections.defaultdict(lambda: [0, 0, 0])
    for started, code, errors, _ in entries:
        counts = by_second[int(started % PERIOD)]
        counts[0] += code == 0
        counts[1] += 1
        counts[2] += bool(RETRY.search(errors))
    print("by second into the period (opened/knocks, retried): %s"
          % ", ".join("%d: %d/%d, %d" % ((second,) + tuple(by_second[second]))
                      for second in sorted(by_second)))
    stretches = [length for lengths in deaf for length in lengths]
    print("knockd deaf (reloading, busy over %g s), all knockd: %d times, median %.2f s, max "
          "%.2f s; the deafest knockd %.1f %% of the %d s%s"
          % (BUSY, len(stretches), statistics.median(stretches) if stretches else 0,
             max(stretches, default=0), 100.0 * max(sum(d) for d in deaf) / span, span,
             "" if not died else "; knockd EXITED during the run: %s"
             % ", ".join(map(str, died))))
    late = [(lag, index) for index, found in enumerate(lags) for lag in found]
    known = [lag for lag, _ in late if lag is not None]
    worst = [max((lag for lag in (found[b] for found in lags) if lag is not None),
                 default=float("nan"))
             for b in range(len(lags[0]))]
    print("rotation lag (boundary to each knockd's file holding the new sequence; negative: "
          "before it), %d boundaries x %d knockd: median %.2f s, max %.2f s (knockd %s); the "
          "last knockd at each boundary: %s s%s"
          % (len(lags[0]), len(lags), statistics.median(known) if known else 0,
             max(known, default=0), max(late, key=lambda item: -1e9 if item[0] is None
                                        else item[0])[1],
             ", ".join("%.2f" % lag for lag in worst),
             "; %d not within the run" % (len(late) - len(known)) if len(known) < len(late)
             else ""))
    # A server that failed its events, or gave up, leaves knockd on old doors:
    # the knocks then measure that, not rotations.
    print("server errors: %d%s%s" % (len(server_errors), "" if gave_up is None else
                                     "; the server EXITED (%d) during the run" % gave_up,
                                     "; the first: " + server_errors[0] if server_errors
                                     else ""))
    print("per knockd (0 reads knockd.conf, N knockd_rotator.d/N.conf): doors; its knockers; "
          "their knocks opened/all, retried; deaf stretches (median, max); rotation lag (max); "
          "OPEN SESAME by source")
    for index, members in enumerate(files):
        mine = [n for n in knocked if knockd_of(files, knocked[n]) == index]
        knocks = [entry for n in mine for entry in outcomes[n]]
        sesames = collections.Counter(re.findall(r"\] (\S+): d\d+_ssh_ROTATOR\S*: OPEN SESAME",
                                                 logs[index]))
        known = [lag for lag in lags[index] if lag is not None]
        print("  %3d: %3d doors; knockers %-5s %3d/%-3d opened, %2d retried; deaf %d (%.2f, "
              "%.2f s); lag %.2f s%s; %s"
              % (index, len(members), ",".join(map(str, mine)) or "-",
                 sum(1 for _, code, _, _ in knocks if code == 0), len(knocks),
                 sum(1 for _, _, errors, _ in knocks if RETRY.search(errors)), len(deaf[index]),
                 statistics.median(deaf[index]) if deaf[index] else 0,
                 max(deaf[index], default=0), max(known, default=float("nan")),
                 "" if len(known) == len(lags[index]) else " (and %d not within the run)"
                 % (len(lags[index]) - len(known)),
                 ", ".join("%s %d" % item for item in sorted(sesames.items())) or "-"))
    for number, entries_of in enumerate(outcomes):
        for started, code, errors, _ in entries_of:
            if code != 0:
                print("FAILED: knocker %s (door %s, knockd %d) at %.2f s into the period "
                      "(exit %d):\n    %s"
                      % (source(number), door_name(knocked[number]),
                         knockd_of(files, knocked[number]), started % PERIOD, code,
                         errors.strip().replace("\n", "\n    ")))
            elif RETRY.search(errors):
                print("retried: knocker %s (knockd %d) at %.2f s into the period: %s"
                      % (source(number), knockd_of(files, knocked[number]), started % PERIOD,
                         "; ".join(RETRY.findall(errors))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rotations", type=int, default=6)
    parser.add_argument("--knockers", type=int, choices=range(1, 254), default=10,
                        metavar="1-253")
    parser.add_argument("--doors", type=int, choices=range(1, 5001), default=1,
                        metavar="1-5000", help="rotator doors in all, the knocked ones included")
    parser.add_argument("--per-knockd", type=int, choices=range(0, 1001),
                        default=core_settings.DEFAULT_DOORS_PER_KNOCKD, metavar="0-1000",
                        help="doors in each knockd's file, as KNOCKD_ROTATOR_DOORS_PER_KNOCKD "
                             "(default %(default)s, the server's); 0: all in knockd.conf, "
                             "one knockd")
    parser.add_argument("--lead", type=int, choices=range(0, PERIOD),
                        metavar="0-%d" % (PERIOD - 1),
                        help="KNOCKD_ROTATOR_LEAD (default: the server's, %d s, at most "
                             "period - grace)" % core_settings.DEFAULT_LEAD)
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # knockd 0.8 exits at about 1000 doors, as many as 500 rotator doors
    # are during a grace window.
    if max(len(members) for members in layout(args.doors, args.per_knockd)) > 500:
        parser.error("more than 500 doors in one knockd: knockd 0.8 exits on the reload")
    try:
        if args.inside_namespace:
            with tempfile.TemporaryDirectory() as folder:
                measure(Path(folder), args.rotations, args.knockers, args.doors,
                        args.per_knockd, args.lead)
            return 0
        need_root_and("knockd", "iptables", "ip")
        return in_own_namespace("krknockers", ["--rotations", str(args.rotations),
                                               "--knockers", str(args.knockers),
                                               "--doors", str(args.doors),
                                               "--per-knockd", str(args.per_knockd)]
                                 + ([] if args.lead is None else ["--lead", str(args.lead)]))
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
