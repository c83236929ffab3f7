#!/usr/bin/env python3
"""Benchmark: add-client for the 501st client against the 2nd (several knockd).

Times whole runs of `knockd_rotator_server.py --config C add-client NAME
--firewall iptables` on this interpreter (sys.executable), from spawn to exit,
for the client whose ordinal each of --clients gives: client N with N-1
enrolled already, laid out as add-client lays them out with
KNOCKD_ROTATOR_DOORS_PER_KNOCKD K (--per-knockd, default the server's): K
doors in knockd.conf, then K in each instance file knockd_rotator.d/N.conf.
By default the 2nd and the 501st, and the clients that start a new knockd
soonest after them, whose rotation starts it through
KNOCKD_ROTATOR_INSTANCE_RECOVER_COMMAND: timed as a kind of their own.  With
K 12: the 2nd lands in knockd.conf (1 door) and the 501st in
knockd_rotator.d/41.conf (8 doors), both with a running knockd; the 13th and
the 505th start knockd_rotator.d/1.conf and 42.conf.

In a network namespace of its own (loopback only): one Debian knockd per file
(`knockd -d -i lo`, with the units' glibc settings MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ 131072), the server's reload, check, recover and kill
commands and their instance forms (`%i` the instance's number) on each
knockd's pid file, the iptables rules add-client asks for (its firewall
commands are only written into the door; they run when it opens, and nobody
knocks here), and every other setting at its default (CHECK_SECONDS 2, the
trial knockd /usr/sbin/knockd, single-use doors); all in an environment file,
the only variable add-client gets besides PATH.

--layout write (the default) writes the enrolled clients' doors and secrets
directly, the same bytes add-client writes (the server's own functions make
them), then rotates once to give them sequences and start every knockd;
--layout enrol enrols them one by one with add-client, and reports how long
those calls took.  Either way the layout is then rotated once more (every
sequence stale), so that every knockd has been reloaded once, as on a server
that has run a while: the server notes each knockd's size at its first
reload, a one-off.  Then each layout is saved (its files, the environment
file, the state folder).

Each round times one add-client for each ordinal, in a shuffled order, each
with a new client name (a new door is a file in a new shape: the server tries
it on a trial knockd first, as for a real new client).  After each, the saved
layout comes back (files, environment file, state folder), the knockd whose
file changed re-reads it, and a knockd the run started is killed.  Prints
each ordinal's median wall time (min-max), median CPU time (user + sys of
add-client and the children it waited for; not the new knockd's own), and
the ratio of its median to the first ordinal's.  Needs root, knockd,
iptables and ip (tests/run installs them).

    /usr/bin/python3 bench/add_client.py [--runs 7] [--clients 2,13,501,505]
        [--per-knockd 12] [--layout write|enrol]
"""

import argparse
import collections
import os
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from concurrent_knockers import commands, state_of
from knock_latency import INSIDE, SERVER, in_own_namespace, need_root_and

sys.path.insert(0, str(SERVER.parent))
from knockd_rotator.clients import firewalls  # noqa: E402
from knockd_rotator.clients import knockd as manage  # noqa: E402
from knockd_rotator.core import files as core_files  # noqa: E402
from knockd_rotator.core import generator  # noqa: E402
from knockd_rotator.core import settings as core_settings  # noqa: E402
from knockd_rotator.engines.knockd import burns  # noqa: E402
from knockd_rotator.engines.knockd import config as knockd_config  # noqa: E402
from knockd_rotator.engines.knockd import instances as knockd_instances  # noqa: E402

SERVICE_PORT = 22          # add-client's default
FIREWALL = "iptables"
PLACED = re.compile(r"door \[\S+\] in (\S+) opens")


def placement(existing, per_knockd):
    """[doors in each file] after EXISTING clients, knockd.conf first, and
    (index of the file the next client goes into, whether it is a new one),
    as place_client decides one client after the other."""
    counts = [0]
    for number in range(existing + 1):
        fewest = min(range(len(counts)), key=lambda index: counts[index])
        made = bool(per_knockd) and counts[fewest] >= per_knockd
        if number == existing:
            return counts, (len(counts) if made else fewest, made)
        if made:
            counts.append(0)
            fewest = len(counts) - 1
        counts[fewest] += 1


def default_ordinals(per_knockd):
    """2 and 501, and the clients that start a new knockd soonest after
    them: K+1 and the first after 500 (with K 15: 16 and 511)."""
    if per_knockd == 0:
        return [2, 501]
    ordinals = {2, 501, per_knockd + 1, -(-500 // per_knockd) * per_knockd + 1}
    if placement(500, per_knockd)[1][1]:
        ordinals.add(500)        # 501 starts one: time one that does not, too
    return sorted(ordinals)


class Layout:
    """One folder: knockd.conf, knockd_rotator.d/, the environment file, the
    state folder, the knockd's pid files and their shared log."""

    def __init__(self, folder, existing, per_knockd):
        self.folder, self.existing = folder, existing
        self.config = folder / "knockd.conf"
        self.instances = folder / knockd_instances.INSTANCE_FOLDER
        self.env_file = folder / "rotator.env"
        self.state = folder / "state"
        self.log = folder / "knockd.log"
        self.saved = folder / "saved"
        self.env = {"PATH": os.environ.get("PATH", os.defpath),
                    "KNOCKD_ROTATOR_ENV_FILE": str(self.env_file)}
        settings = dict(STATE_DIR=self.state, DOORS_PER_KNOCKD=per_knockd)
        settings.update(commands(self.config, folder / "knockd.pid"))
        settings.update(("INSTANCE_" + name, command) for name, command in commands(
            self.instances / "%i.conf", folder / "knockd-%i.pid").items())
        descriptor = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("".join("KNOCKD_ROTATOR_%s=%s\n" % item for item in settings.items()))
        self.config.touch(mode=0o600)
        self.config.write_text("[options]\n\tlogfile = %s\n" % self.log)
        self.log.write_text("")

    def pidfile(self, path):
        """The pid file of the knockd that reads PATH."""
        path = Path(path)
        if path == self.config:
            return self.folder / "knockd.pid"
        return self.folder / ("knockd-%s.pid" % path.stem)

    def files(self):
        return [Path(path) for path in knockd_instances.knockd_files(str(self.config))]

    def add_client(self, name):
        """One timed add-client: (wall s, CPU s, the file it chose, its error output)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(SERVER), "--config", str(self.config),
                                 "add-client", name, "--firewall", FIREWALL], env=self.env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            sys.exit("error: add-client %s failed (exit %d):\n%s%s"
                     % (name, result.returncode, result.stdout, result.stderr))
        placed = PLACED.search(result.stdout)
        if not placed:
            sys.exit("error: add-client %s did not say where the door went:\n%s"
                     % (name, result.stdout))
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu, Path(placed.group(1)), result.stderr

    def write(self, per_knockd):
        """The doors and secrets of SELF.existing clients, as add-client
        writes them (client_door_lines, its burn command, its file placement
        and new instance files), without running it."""
        base = firewalls.firewall_commands(FIREWALL, SERVICE_PORT, self.env)
        counts, _ = placement(self.existing, per_knockd)
        paths = [str(self.config)] + [str(self.instances / ("%d.conf" % number))
                                      for number in range(1, len(counts))]
        if len(paths) > 1:
            self.instances.mkdir(mode=0o700)
        data = {paths[0]: bytearray(self.config.read_bytes())}
        assignments = []
        number = 0
        for index, count in enumerate(counts):
            # add-client makes an instance's file from knockd.conf as it is
            # then (full: the clients fill knockd.conf first).
            if index:
                data[paths[index]] = bytearray(knockd_instances.instance_options(
                    knockd_config.parse_config(bytes(data[paths[0]]))))
            for _ in range(count):
                number += 1
                name = "c%04d" % number
                door = "%s_ssh%s" % (name, generator.ROTATOR_SUFFIX)
                burn = burns.burn_command(paths[index], door, self.env)
                door_commands = (burn + base[0], base[1], burn + base[2], base[3])
                data[paths[index]] += b"".join(manage.client_door_lines(name, door,
                                                                        door_commands, b"\n"))
                assignments += [(generator.own_variable("SECRET", door), secrets.token_urlsafe(32)),
                                (generator.own_variable("SINGLE_USE", door), "1")]
        for path, content in data.items():
            core_files.replace_file(path, bytes(content), create=True)
        with open(self.env_file, "a") as handle:
            handle.write("".join("%s=%s\n" % pair for pair in assignments))

    def enrol(self):
        """Enrol SELF.existing clients with add-client: [(wall s, new knockd)]."""
        calls = []
        for number in range(1, self.existing + 1):
            before = set(self.files())
            wall, _, path, _ = self.add_client("c%04d" % number)
            calls.append((wall, path not in before))
        return calls

    def rotate(self):
        """One run of the server over every file (knockd started where none runs)."""
        result = subprocess.run([sys.executable, str(SERVER), "--config", str(self.config)],
                                env=dict(self.env, KNOCKD_ROTATOR_CHECK_SECONDS="1"),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit("error: the rotation of %s failed (exit %d):\n%s"
                     % (self.folder, result.returncode, result.stderr))

    def settle(self):
        """Make every knockd re-read its file once (each sequence made
        stale, then rotated back): the server notes each knockd's size at its
        first reload.  Then save the layout."""
        stale = re.compile(rb"^(\s*sequence\s*=\s*).*$", re.MULTILINE | re.IGNORECASE)
        for path in self.files():
            path.write_bytes(stale.sub(rb"\g<1>2000", path.read_bytes()))
        self.rotate()
        for path in self.files():
            pid = self.pid(path)
            if pid is None or state_of(pid) in ("Z", "X", "gone"):
                sys.exit("error: no knockd reads %s" % path)
        self.saved.mkdir()
        for path in self.files() + [self.env_file]:
            relative = path.relative_to(self.folder)
            (self.saved / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, self.saved / relative)
        shutil.copytree(self.state, self.saved / "state", symlinks=True)

    def pid(self, path):
        try:
            return int(self.pidfile(path).read_text())
        except (OSError, ValueError):
            return None

    def restore(self):
        """Put the saved layout back: a knockd started since is killed and
        its file removed; a knockd whose file changed re-reads the saved one."""
        saved = {path: (self.saved / path.relative_to(self.folder)).read_bytes()
                 for path in self.files() if (self.saved / path.relative_to(self.folder)).exists()}
        for path in self.files():
            if path in saved:
                continue
            pid = self.pid(path)
            if pid is not None:
                subprocess.run(["kill", "-KILL", str(pid)], check=False)
                wait(lambda: state_of(pid) in ("Z", "X", "gone"), 10, "knockd %d to die" % pid)
            self.pidfile(path).unlink(missing_ok=True)
            path.unlink()
        for path, data in saved.items():
            if path.read_bytes() == data:
                continue
            core_files.replace_file(str(path), data)
            pid, reloads = self.pid(path), self.log.read_text().count("re-reading config file")
            os.kill(pid, 1)
            wait(lambda: self.log.read_text().count("re-reading config file") > reloads
                 and state_of(pid) == "S", 30, "knockd %d to re-read %s" % (pid, path))
        shutil.copy2(self.saved / self.env_file.name, self.env_file)
        shutil.rmtree(self.state)
        shutil.copytree(self.saved / "state", self.state, symlinks=True)


def wait(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit("error: timed out waiting for " + what)
        time.sleep(0.005)


def firewall():
    """The rules add-client prints for its iptables doors (the recent list
    it warns about without them)."""
    for rule in firewalls.firewall_rules(FIREWALL, SERVICE_PORT, firewalls.CLIENT_CMD_TIMEOUT):
        subprocess.run(rule, shell=True, check=rule.startswith("iptables "),
                       capture_output=True)


def measure(top, runs, ordinals, per_knockd, how):
    firewall()
    layouts = {}
    print("interpreter: %s (Python %s); %d doors a knockd (--per-knockd); layout: %s"
          % (sys.executable, sys.version.split()[0], per_knockd,
             "written directly" if how == "write" else "enrolled with add-client"))
    print("command: %s %s --runs %d --clients %s --per-knockd %d --layout %s"
          % (sys.executable, os.path.relpath(__file__), runs, ",".join(map(str, ordinals)),
             per_knockd, how))
    try:
        for ordinal in ordinals:
            folder = top / ("clients-%d" % (ordinal - 1))
            folder.mkdir(mode=0o700)
            layout = Layout(folder, ordinal - 1, per_knockd)
            started = time.monotonic()
            if how == "write":
                layout.write(per_knockd)
                layout.rotate()
                made = "written and rotated (every knockd started)"
            else:
                layout.rotate()     # knockd.conf's knockd runs, as on a server
                calls = layout.enrol()
                made = "enrolled with add-client" + enrolment_summary(calls)
            built = time.monotonic() - started
            layout.settle()
            print("layout of %d clients in %d files: %s in %.1f s; settled (every knockd "
                  "reloaded once) in %.1f s"
                  % (ordinal - 1, len(layout.files()), made, built,
                     time.monotonic() - started - built))
            layouts[ordinal] = layout
        times = collections.defaultdict(list)
        order = list(ordinals)
        for run in range(runs):
            random.shuffle(order)
            for ordinal in order:
                layout = layouts[ordinal]
                before = layout.files()
                wall, cpu, path, _ = layout.add_client("t%04d" % (run * len(ordinals)
                                                                + ordinals.index(ordinal)))
                times[ordinal].append((wall, cpu, path, path not in before))
                layout.restore()
    finally:
        for layout in layouts.values():
            for path in layout.files():
                pid = layout.pid(path)
                if pid is not None:
                    subprocess.run(["kill", "-KILL", str(pid)], check=False)
    report(times, ordinals, per_knockd, runs)


def enrolment_summary(calls):
    """What the enrolling add-client calls took: into a running knockd and
    starting a new one, the first and the last few of each."""
    parts = []
    for new, what in ((False, "into a running knockd"), (True, "starting a new knockd")):
        walls = [wall for wall, made in calls if made == new]
        if walls:
            few = min(50 if not new else 5, len(walls))
            parts.append("%s %d calls, median of the first %d %.3f s, of the last %d %.3f s"
                         % (what, len(walls), few, statistics.median(walls[:few]), few,
                            statistics.median(walls[-few:])))
    return " (" + "; ".join(parts) + ")" if parts else ""


def report(times, ordinals, per_knockd, runs):
    print("%d runs each, in a shuffled order each round; wall: spawn to exit; CPU: user + "
          "sys of add-client and the children it waited for" % runs)
    print("| client | enrolled before | knockd before | goes into (doors there) | wall median "
          "(min-max) | CPU median | wall / client %d's |" % ordinals[0])
    print("|---|---|---|---|---|---|---|")
    first = statistics.median(wall for wall, _, _, _ in times[ordinals[0]])
    for ordinal in ordinals:
        counts, (index, made) = placement(ordinal - 1, per_knockd)
        walls = [wall for wall, _, _, _ in times[ordinal]]
        places = {(path.name, new) for _, _, path, new in times[ordinal]}
        expected = ("knockd.conf" if index == 0 else "%d.conf" % index, made)
        if places != {expected}:
            sys.exit("error: client %d went into %s, expected %s" % (ordinal, places, expected))
        print("| %d | %d | %d | %s (%s) | %.3f s (%.3f-%.3f) | %.3f s | %.2f |"
              % (ordinal, ordinal - 1, len(counts),
                 "knockd_rotator.d/" + expected[0] if index else expected[0],
                 "new knockd" if made else "%d" % counts[index],
                 statistics.median(walls), min(walls), max(walls),
                 statistics.median(cpu for _, cpu, _, _ in times[ordinal]),
                 statistics.median(walls) / first))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, choices=range(1, 1001), default=7,
                        metavar="1-1000", help="timed add-client runs for each client")
    parser.add_argument("--clients", help="the ordinals of the clients to time, "
                        "comma-separated (N: with N-1 enrolled before; default: 2, 501, and "
                        "the first to start a new knockd after 1 and after 500)")
    parser.add_argument("--per-knockd", type=int, choices=range(0, 1001),
                        default=core_settings.DEFAULT_DOORS_PER_KNOCKD, metavar="0-1000",
                        help="KNOCKD_ROTATOR_DOORS_PER_KNOCKD (default %(default)s, the "
                             "server's); 0: all in knockd.conf")
    parser.add_argument("--layout", choices=("write", "enrol"), default="write",
                        help="write the enrolled clients directly (default), or enrol them "
                             "with add-client")
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients is None:
        args.clients = ",".join(map(str, default_ordinals(args.per_knockd)))
    try:
        ordinals = [int(word) for word in args.clients.split(",")]
    except ValueError:
        parser.error("--clients: whole numbers, comma-separated")
    if not ordinals or min(ordinals) < 2 or len(set(ordinals)) != len(ordinals):
        parser.error("--clients: distinct ordinals of 2 or more (N: N-1 enrolled before)")
    if args.per_knockd == 0 and max(ordinals) > 500:
        parser.error("more than 500 doors in one knockd: knockd 0.8 exits on the reload")
    try:
        if args.inside_namespace:
            with tempfile.TemporaryDirectory() as folder:
                measure(Path(folder), args.runs, ordinals, args.per_knockd, args.layout)
            return 0
        need_root_and("knockd", "iptables", "ip")
        return in_own_namespace("kraddclient", ["--runs", str(args.runs), "--clients",
                                                args.clients, "--per-knockd",
                                                str(args.per_knockd), "--layout", args.layout])
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
