#!/usr/bin/env python3
"""Benchmark: the knockd engine and the nftables engine side by side, in one
run, with references (C knock, fwknop), each part in a network namespace of
its own (loopback only; never the host's firewall), removed afterwards with
every process in it, also on an error or Ctrl-C.  Needs root, nft, knockd,
knock, iptables and ip; fwknop for its row (`apt-get install -y
fwknop-server fwknop-client`, or --install-fwknop).  Prints markdown tables.

Parts (--only takes a comma-separated list of them):
  latency     `knockd_rotator_client.py knock --check` to open, ROUNDS knocks
              each: the nftables engine; knockd with the C `knock` client
              and with the Python client; fwknop (bench/knock_latency.py's
              rounds, shuffled, each door shut before each knock).
  concurrent  (one run per engine) KNOCKERS concurrent knockers from distinct
              source addresses (bench/concurrent_knockers.py: uid-matched
              SNAT), a door and a port each, 10 s period, 5 s grace, a knock
              a second each across ROTATIONS boundaries: knocks that opened
              at the first try (no retry).  knockd: the project's server
              (--watch) rotating knockd.conf.  nftables: a thread renders
              each door's windows (valid_from = start - lead, valid_until =
              start + period + grace) with the engine's API and tops up once a
              period, LEAD before each boundary: the current and the next
              period for knockers 0-4's doors, AHEAD periods ahead for the
              others'.  In the same run: a knock across each boundary (first
              port 0.4 s before, the rest 0.2 s after, raw SYNs from an
              address of its own); then the server stops, and two periods
              later each knocker knocks once more.
  probe       a probe (a new source every 10 ms: knock, then connect) across
              a top-up that adds the next period's window to each of
              PROBE_DOORS doors; and the same probe (knockd's log tells the
              openings) across a SIGHUP of a knockd holding the probe's door
              and 9 others (the server's 10 doors a knockd).
  replay      a single-use sequence knocked, then replayed from another
              address 0, 10 and 100 ms later by the same sender, REPLAYS
              times each: nftables (the kernel burns), and knockd with the
              server's burn (bench/single_use.py's door).
  flood       FLOOD_RATE SYNs a second to ports of no door for FLOOD_SECONDS:
              the sender's system CPU (on loopback the receive path runs in
              its context) with no firewall, with the nftables table at 10
              and 10,000 doors, and with knockd (--knockd-flood: 10 doors in
              one knockd; 100 and 1,000 doors in 10 and 100 knockd, as the
              server lays them out; plus the knockd processes' own CPU).

    nice python3 bench/engines.py [--rounds 15] [--rotations 6] [--knockers 10]
        [--ahead 3] [--probe-doors 500,10000] [--replays 3] [--flood-seconds 5]
        [--flood-rate 10000] [--flood-repeats 3] [--knockd-flood 10/1,100/10,1000/100]
        [--only latency,concurrent,probe,replay,flood]
"""

import argparse
import collections
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import concurrent_knockers as knockers_bench
import knock_latency as latency_bench
from nft_engine import changes, flood
from single_use import SEND, single_use_knockd, wait

sys.path.insert(0, str(latency_bench.ROOT))
from knockd_rotator.core import generator  # noqa: E402
from knockd_rotator.core import settings as core_settings  # noqa: E402
from knockd_rotator.core import uses  # noqa: E402
from knockd_rotator.engines import nftables as engine  # noqa: E402

PARTS = ("latency", "concurrent", "probe", "replay", "flood")
NFT_PORT = 2224             # the latency part's nftables door (knockd 2222, fwknop 2223)
PROBE_PORT = 2300
SEQ_TIMEOUT = 5
OPEN_SECONDS = 30
PROBE_EVERY = 0.010
CROSS_BEFORE, CROSS_AFTER = 0.4, 0.2


# ---------------------------------------------------------------- the engines' doors

def items(value):
    """b"port:proto,..." (the generator's) as ((port, proto), ...)."""
    return tuple((int(port), proto) for port, proto in
                 (item.split(":") for item in value.decode().split(",")))


def tcp_ports(value):
    found = items(value)
    if any(proto != "tcp" for _, proto in found):
        sys.exit("error: the raw-SYN knocks here take TCP sequences only")
    return [str(port) for port, _ in found]


def windows(settings, starts, use=None):
    """The engine's windows of the door SETTINGS for the period STARTS, as a
    server makes them: valid from LEAD before the start to GRACE after the end."""
    return tuple(engine.Window(start, start - settings.lead,
                               start + settings.period + settings.grace,
                               settings.knocks_at(start, use or 0), use)
                 for start in starts)


def nft_door(settings, number, port, starts, use=None):
    return engine.Door(settings.door, number, (port,), OPEN_SECONDS, SEQ_TIMEOUT,
                       settings.period, "inet", windows(settings, starts, use))


def held(settings, now, ahead):
    """The period starts a server holds at NOW: the previous one (its grace),
    the current one and AHEAD more."""
    current = generator.period_start(now, settings.period)
    return [current + k * settings.period for k in range(-1, ahead + 1)]


def filler_plan(settings_of, numbers, port, now):
    """The engine's doors door<N>_ROTATOR for NUMBERS, guarding PORT, with
    the windows a server holds at NOW."""
    return [nft_door(settings_of("door%d_ROTATOR" % n), n, port,
                     held(settings_of("door%d_ROTATOR" % n), now, 1)) for n in numbers]


def filler_sequences(settings_of, numbers, start):
    """[(name, sequence)] of the doors door<N>_ROTATOR for NUMBERS at START."""
    return [("door%d_ROTATOR" % n, settings_of("door%d_ROTATOR" % n).sequence_at(start))
            for n in numbers]


def nft(*args):
    return subprocess.run(["nft"] + list(args), capture_output=True, text=True,
                          check=True).stdout


def allowed():
    """[(source, mark)] of the table's allow4 set: who may connect now."""
    data = json.loads(nft("-j", "list", "set", "inet", engine.TABLE, "allow4"))
    return [tuple(element["elem"]["val"]["concat"]) for item in data["nftables"]
            for element in item.get("set", {}).get("elem", [])]


def close_nft(number, knockers):
    """knockers_bench.knocker's CLOSE for the nftables engine: delete
    knocker NUMBER's openings from allow4; how many there were."""
    mine = [(address, mark) for address, mark in allowed()
            if address == knockers_bench.source(number)]
    for address, mark in mine:
        nft("delete", "element", "inet", engine.TABLE, "allow4",
            "{ %s . %d }" % (address, mark))
    return len(mine)


class NftServer(threading.Thread):
    """What the server will do for the nftables engine: a full load now,
    then a top-up LEAD before each boundary B holding, for each door, the
    periods of `held` then: the current one (B's previous) and AHEAD more,
    so B's window is there from its valid_from on (DOORS: [(settings,
    number, port, ahead)])."""

    def __init__(self, doors):
        super().__init__(daemon=True)
        self.doors, self.stop = doors, threading.Event()
        self.lead, self.period = doors[0][0].lead, doors[0][0].period
        self.topups = []
        self.loaded = None
        self.load()

    def load(self):
        now = time.time()
        plan = [nft_door(settings, number, port, held(settings, now, ahead))
                for settings, number, port, ahead in self.doors]
        load, loaded = engine.render(plan, now, self.loaded)
        started = time.monotonic()
        engine.apply(load)
        self.topups.append(time.monotonic() - started)
        self.loaded = loaded

    def run(self):
        while True:
            boundary = generator.period_start(time.time() + self.lead, self.period, 1)
            if self.stop.wait(max(0.0, boundary - self.lead - time.time())):
                return
            self.load()


# ---------------------------------------------------------------- probes and raw knocks

class Sources:
    """Fresh loopback source addresses, 127.FIRST.x.y on."""

    def __init__(self, first):
        self.count, self.first = 0, first

    def __call__(self):
        self.count += 1
        n = self.count
        return "127.%d.%d.%d" % (self.first + n // 62500, n // 250 % 250 + 1, n % 250 + 1)


def send(sources, ports):
    """SEND (bench/single_use.py): raw SYNs from each of SOURCES in turn."""
    subprocess.run([sys.executable, "-c", SEND, ",".join(sources)] + list(ports), check=True)


def knock_from(source, sequence):
    """A knock of SEQUENCE ((port, proto), ...) from SOURCE, bound on loopback."""
    for port, proto in sequence:
        sock = socket.socket(socket.AF_INET,
                             socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        sock.bind((source, 0))
        if proto == "tcp":
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        else:
            sock.sendto(b"\0", ("127.0.0.1", port))
        sock.close()


class Probe(threading.Thread):
    """Every PROBE_EVERY s, from a new source: a knock of SEQUENCE, then
    (with PORT) a non-blocking connect to PORT from that source."""

    def __init__(self, sequence, port, sources):
        super().__init__(daemon=True)
        self.sequence, self.port, self.sources = sequence, port, sources
        self.stop = threading.Event()
        self.sent = []          # (time, source, the connecting socket or None)

    def run(self):
        moment = time.monotonic()
        while not self.stop.is_set():
            source = self.sources()
            knock_from(source, self.sequence)
            check = None
            if self.port:
                check = socket.socket()
                check.bind((source, 0))
                check.setblocking(False)
                check.connect_ex(("127.0.0.1", self.port))
            self.sent.append((time.monotonic(), source, check))
            moment += PROBE_EVERY
            time.sleep(max(0.0, moment - time.monotonic()))

    def connected(self):
        """{source: whether its connect went through}, 0.3 s after the last."""
        self.join()
        time.sleep(0.3)
        poller = select.poll()
        for _, _, check in self.sent:
            poller.register(check, select.POLLOUT)
        ready = {fd for fd, _ in poller.poll(0)}
        found = {source: check.fileno() in ready and check.getsockopt(
            socket.SOL_SOCKET, socket.SO_ERROR) == 0 for _, source, check in self.sent}
        for _, _, check in self.sent:
            check.close()
        return found


def during(probe, opened, started, ended):
    """(opened, sent) of PROBE's probes sent from STARTED until ENDED, or one
    second after STARTED if that is later; and of all its probes."""
    until = max(ended, started + 1.0)
    inside = [source for moment, source, _ in probe.sent if started <= moment <= until]
    return (sum(1 for s in inside if opened(s)), len(inside),
            sum(1 for _, s, _ in probe.sent if opened(s)), len(probe.sent))


def knockd_conf(sequences):
    """knockd.conf text (`{log}` left for knock_latency.start_knockd): a door
    for each (name, b"port:proto,...") that opens nothing (start_command true)."""
    return "[options]\n\tlogfile = {log}\n" + "".join(
        "[%s]\n\tsequence = %s\n\tseq_timeout = %d\n\ttcpflags = syn\n\tstart_command = true\n"
        % (name, value.decode(), SEQ_TIMEOUT) for name, value in sequences)


def opened_in(log, door):
    """The sources knockd's LOG says opened DOOR (or its grace sibling)."""
    return set(re.findall(r"\] (\S+): %s\S*: OPEN SESAME" % re.escape(door),
                          log.read_text(errors="replace")))


def fresh_env(**settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    env["KNOCKD_ROTATOR_SECRET"] = "bench-engines-" + "s" * 40
    env.update(("KNOCKD_ROTATOR_" + k, str(v)) for k, v in settings.items())
    return env


# ---------------------------------------------------------------- the parts

def part_latency(folder, args):
    ports = [latency_bench.KNOCKD_PORT] + [latency_bench.FWKNOP_PORT] * args.fwknop
    for port in ports:
        latency_bench.iptables("-A", "INPUT", "-p", "tcp", "--dport", port, "-j", "DROP")
    for port in ports + [NFT_PORT]:
        latency_bench.listen(port)
    knockd, config, _ = latency_bench.start_knockd(
        folder, latency_bench.door(latency_bench.KNOCKD_PORT, latency_bench.CMD_TIMEOUT))
    env = latency_bench.rotator_env(folder, knockd)
    settings = core_settings.settings_reader(env)("nft_ROTATOR")
    engine.apply(engine.render([nft_door(settings, 0, NFT_PORT, held(settings, time.time(), 1))],
                               time.time())[0])
    processes = [knockd]
    try:
        rc_file = None
        if args.fwknop:
            fwknopd, rc_file = latency_bench.start_fwknopd(folder)
            processes.append(fwknopd)
        methods = latency_bench.methods_for(env, config, rc_file)
        if not args.fwknop:
            del methods["fwknop"]

        def shut_nft():
            nft("flush", "set", "inet", engine.TABLE, "allow4")
            return True
        methods["nftables"] = (lambda: latency_bench.client_knock(env, "nft", NFT_PORT),
                               NFT_PORT, shut_nft)
        methods["nftables-c"] = (lambda: latency_bench.c_knock(env, "nft", NFT_PORT),
                                 NFT_PORT, shut_nft)
        times, failures, _ = latency_bench.rounds_of(methods, env, config, args.rounds)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return {"times": times, "failures": failures}


def crossing_knocks(settings, boundaries, opened, results):
    """Knock SETTINGS' door across each of BOUNDARIES from an address of
    its own: the first port CROSS_BEFORE s before it, the rest CROSS_AFTER s
    after; append (whether the first went before the boundary, OPENED(source)
    within a second) to RESULTS."""
    sources = Sources(1)
    for boundary in boundaries:
        source = sources()
        ports = tcp_ports(settings.sequence_at(boundary - settings.period))
        time.sleep(max(0.0, boundary - CROSS_BEFORE - time.time()))
        send([source], ports[:1])
        before = time.time() < boundary
        time.sleep(max(0.0, boundary + CROSS_AFTER - time.time()))
        send([source], ports[1:])
        results.append((before, wait(lambda: opened(source), 1.0)))


def part_concurrent(folder, args, which):
    count = args.knockers
    files = knockers_bench.layout(count, count)
    knocked = knockers_bench.knocked_doors(files, count)
    accepted = collections.Counter()
    knockers_bench.listen(count, accepted)
    knockers_bench.distinct_sources(count)
    env = knockers_bench.rotator_env(folder, count, count, None)
    settings_of = core_settings.settings_reader(env)
    names = {n: knockers_bench.door_name(knocked[n]) + "_ROTATOR" for n in knocked}
    period = settings_of(names[0]).period
    server = None
    try:
        if which == "knockd":
            knockers_bench.iptables("-A", "INPUT", "-p", "tcp", "--dport",
                                    knockers_bench.ports(count), "-j", "DROP")
            knockds = knockers_bench.start_knockds(folder, files, knocked)
            server = subprocess.Popen([sys.executable, str(latency_bench.SERVER), "--watch",
                                       "--config", str(knockds[0].config)], env=env,
                                      stderr=open(folder / "server.log", "wb"))
            if not wait(lambda: "re-reading config file" in knockds[0].log.read_text(), 60):
                sys.exit("error: the server did not rotate knockd.conf")
            close = knockers_bench.close_iptables

            def opened(source):
                return source in opened_in(knockds[0].log, names[0])

            def stop_server():
                server.terminate()
                server.wait()
        else:
            server = NftServer([(settings_of(names[n]), n, knockers_bench.PORT + n,
                                 1 if n < count // 2 else args.ahead) for n in knocked])
            server.start()
            close = close_nft

            def opened(source):
                return any(address == source for address, _ in allowed())

            def stop_server():
                server.stop.set()
                server.join()
        first = generator.period_start(time.time(), period, 2)
        end = first + args.rotations * period
        crossings = []
        crossing = threading.Thread(target=crossing_knocks, daemon=True, args=(
            settings_of(names[0]), range(first + period, end + period, period), opened,
            crossings))
        crossing.start()
        outcomes = knockers_bench.run_knockers(knocked, env, first, end, close)
        crossing.join()
        stop_server()
        stopped = time.time()
        # Two periods after the server stopped, one knock each.
        again = generator.period_start(stopped, period, 2) + 1
        after = knockers_bench.run_knockers(knocked, env, again, again + 1, close)
    finally:
        if which == "knockd":
            if server is not None and server.poll() is None:
                server.kill()
                server.wait()
            subprocess.run("kill -KILL $(cat %s/knockd*.pid)" % folder, shell=True,
                           stderr=subprocess.DEVNULL)
        elif server is not None:
            server.stop.set()

    def tally(entries):
        first_try = sum(1 for _, code, errors, _ in entries
                        if code == 0 and not knockers_bench.RETRY.search(errors))
        return [first_try, sum(1 for _, code, _, _ in entries if code == 0), len(entries)]
    half = count // 2
    return {"engine": which, "period": period, "lead": settings_of(names[0]).lead,
            "grace": settings_of(names[0]).grace,
            "knocks": tally([entry for entries in outcomes for entry in entries]),
            "crossings": crossings,
            "stopped_for": again - stopped,
            "after": tally([entry for entries in after for entry in entries]),
            "after_short": tally([entry for entries in after[:half] for entry in entries]),
            "after_long": tally([entry for entries in after[half:] for entry in entries]),
            "retried": [(started % period, knockers_bench.RETRY.findall(errors))
                        for entries in outcomes for started, _, errors, _ in entries
                        if knockers_bench.RETRY.search(errors)],
            "strays": sum(n for (port, address), n in accepted.items()
                          if address != knockers_bench.source(port - knockers_bench.PORT)),
            "topups": getattr(server, "topups", [])}


def part_probe(folder, args):
    env = fresh_env()
    settings_of = core_settings.settings_reader(env)
    probe_settings = settings_of("probe_ROTATOR")
    latency_bench.listen(PROBE_PORT)
    sources = Sources(20)
    rows = []
    for doors in args.probe_doors:
        now = time.time()
        plan = filler_plan(settings_of, range(doors), PROBE_PORT + 1, now)
        probe_door = nft_door(probe_settings, doors, PROBE_PORT, held(probe_settings, now, 1))
        load, loaded = engine.render(plan + [probe_door], now)
        engine.apply(load)
        # A top-up a period on: each door gains the window after next.
        moved = [door._replace(windows=door.windows + windows(
            settings_of(door.name), [door.windows[-1].start + door.period]))
            for door in plan]
        started = time.monotonic()
        load, _ = engine.render(moved + [probe_door], time.time(), loaded)
        rendered = time.monotonic() - started
        probe = Probe(probe_door.windows[1].sequence, PROBE_PORT, sources)
        probe.start()
        time.sleep(0.3)
        started = time.monotonic()
        engine.apply(load)
        ended = time.monotonic()
        time.sleep(max(0.3, started + 1.1 - ended))
        probe.stop.set()
        found = probe.connected()
        rows.append({"what": "nftables top-up", "doors": doors, "changes": changes(load),
                     "render": rendered, "seconds": ended - started,
                     "probes": during(probe, found.get, started, ended)})
        nft("delete", "table", "inet", engine.TABLE)
    # knockd: the probe's door and 9 others, as the server lays doors out.
    start = generator.period_start(time.time(), probe_settings.period)
    sequences = [("probe_ROTATOR", probe_settings.sequence_at(start))] + filler_sequences(
        settings_of, range(9), start)
    knockd, _, log = latency_bench.start_knockd(folder, knockd_conf(sequences))
    try:
        probe = Probe(items(sequences[0][1]), None, sources)
        probe.start()
        time.sleep(0.3)
        started = time.monotonic()
        knockd.send_signal(signal.SIGHUP)          # knockd re-reads its file
        time.sleep(1.1)
        probe.stop.set()
        probe.join()
        time.sleep(0.3)
        opened = opened_in(log, "probe_ROTATOR")
        if "re-reading config file" not in log.read_text():
            sys.exit("error: knockd did not reload")
        rows.append({"what": "knockd reload (SIGHUP)", "doors": len(sequences),
                     "probes": during(probe, opened.__contains__, started, started)})
    finally:
        knockd.kill()
        knockd.wait()
    return {"rows": rows}


def part_replay(folder, args):
    delays = (0.0, 0.010, 0.100)
    env = fresh_env(SINGLE_USE=1)
    settings = core_settings.settings_reader(env)("once_ROTATOR")
    start = generator.period_start(time.time(), settings.period)
    held_uses = len(delays) * args.replays
    door = engine.Door(settings.door, 0, (PROBE_PORT,), OPEN_SECONDS, SEQ_TIMEOUT,
                       settings.period, "inet", tuple(
                           w for use in range(held_uses) for w in windows(settings, [start], use)))
    load, loaded = engine.render([door], time.time())
    engine.apply(load)
    knockers, replayers = Sources(30), Sources(40)
    rows = []
    use = 0
    for delay in delays:
        knocks = replays = 0
        for _ in range(args.replays):
            knocker, replayer = knockers(), replayers()
            send([knocker, "+%g" % delay, replayer] if delay else [knocker, replayer],
                 tcp_ports(settings.sequence_at(start, use)))
            time.sleep(0.05)
            sources = {address for address, _ in allowed()}
            knocks += knocker in sources
            replays += replayer in sources
            use += 1
        rows.append({"engine": "nftables", "delay": delay, "knocks": knocks,
                     "replays": replays, "of": args.replays})
    burned = len(engine.spent_uses(engine.read_spent(), loaded))
    nft("delete", "table", "inet", engine.TABLE)
    # knockd with the server's burn (bench/single_use.py).
    namespace = subprocess.run(["ip", "netns", "identify", str(os.getpid())],
                               capture_output=True, text=True, check=True).stdout.strip()
    door, log = single_use_knockd(folder, namespace)

    def count(pattern):
        return len(re.findall(pattern, log.read_text(errors="replace")))

    def counter():
        """The server's use counter: each opening burns one, a replay's too."""
        return sum(uses.read_uses(str(folder / "state")).get("ssh_ROTATOR", {})
                   .get("counts", {}).values())
    for delay in delays:
        knocks = replays = 0
        for _ in range(args.replays):
            knocker, replayer = knockers(), replayers()
            start = generator.period_start(time.time(), door.period)
            reloads = count("re-reading config file")
            send([knocker, "+%g" % delay, replayer] if delay else [knocker, replayer],
                 tcp_ports(door.sequence_at(start, counter())))
            knocks += wait(lambda: count(r"%s: ssh_ROTATOR: OPEN" % re.escape(knocker)), 2)
            # Until knockd has re-read the file after every burn (a replay
            # that opened burned one more use).
            wait(lambda: count("re-reading config file") > reloads, 10)
            time.sleep(1.0)
            replays += count(r"%s: ssh_ROTATOR: OPEN" % re.escape(replayer)) > 0
        rows.append({"engine": "knockd", "delay": delay, "knocks": knocks, "replays": replays,
                     "of": args.replays})
    return {"rows": rows, "burned": burned}


def process_cpu(pids):
    """User + system seconds of PIDS so far."""
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def part_flood(folder, args):
    """Each setting FLOOD_REPEATS times, in turn (the machine is shared)."""
    env = fresh_env()
    settings_of = core_settings.settings_reader(env)
    count = int(args.flood_rate * args.flood_seconds)
    now = time.time()
    tables = {doors: engine.render(filler_plan(settings_of, range(doors), PROBE_PORT, now),
                                   now)[0] for doors in (10, 10000)}
    start = generator.period_start(now, settings_of("door0_ROTATOR").period)

    def knockds(doors, instances, run):
        started = []
        try:
            for index in range(instances):
                place = folder / ("flood-%d-%d-%d" % (doors, index, run))
                place.mkdir()
                per = doors // instances
                started.append(latency_bench.start_knockd(place, knockd_conf(filler_sequences(
                    settings_of, range(index * per, (index + 1) * per), start)))[0])
            return measure([process.pid for process in started])
        finally:
            for process in started:
                process.kill()
                process.wait()

    def table(doors):
        engine.apply(tables[doors])
        try:
            return measure()
        finally:
            nft("delete", "table", "inet", engine.TABLE)

    def measure(pids=()):
        before = process_cpu(pids)
        sent, user, system = flood(None, count, args.flood_seconds * 3, args.flood_rate,
                                   split=True)
        return {"sent": sent, "user": user, "system": system,
                "daemon": process_cpu(pids) - before}
    settings = [("no firewall", measure)] + [
        ("nftables, {:,} doors".format(doors), lambda doors=doors: table(doors))
        for doors in tables] + [
        ("knockd, %d doors in %d knockd" % layout,
         lambda layout=layout, run=[0]: knockds(*layout, run.append(0) or len(run)))
        for layout in args.knockd_flood]
    runs = collections.defaultdict(list)
    for _ in range(args.flood_repeats):
        for what, run in settings:
            runs[what].append(run())
    return {"runs": runs, "order": [what for what, _ in settings],
            "seconds": args.flood_seconds, "rate": args.flood_rate}


# ---------------------------------------------------------------- the tables

def ms(seconds):
    return "%.0f ms" % (seconds * 1000)


def report_latency(result, args):
    times = result["times"]
    labels = [("nftables", "nftables engine, `knock --check` (Python client)"),
              ("nftables-c", "nftables engine, C `knock` + polling connect (reference)"),
              ("knock", "knockd, C `knock` + polling connect"),
              ("ours", "knockd, `knock --check` (Python client)"),
              ("fwknop", "fwknop SPA + polling connect")]
    print("\n### Knock to open (%d rounds, shuffled)\n" % args.rounds)
    print("| engine and client | median | p90 | min | max | knocks |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for name, label in labels:
        values = times.get(name)
        if not values:
            print("| %s | %s | | | | |" % (label, "not installed: apt-get install -y "
                                          "fwknop-server fwknop-client" if name == "fwknop"
                                          else "no complete round"))
            continue
        medians[name] = statistics.median(values)
        p90 = statistics.quantiles(values, n=10, method="inclusive")[8] \
            if len(values) > 1 else values[0]
        print("| %s | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %d |"
              % (label, medians[name] * 1000, p90 * 1000, min(values) * 1000,
                 max(values) * 1000, len(values)))
    for failure in result["failures"]:
        print("\nFAILED: " + failure)
    if "nftables" in medians and "knock" in medians:
        print("\nGoal nftables <= C knock through knockd: %.1f vs %.1f ms: %s"
              % (medians["nftables"] * 1000, medians["knock"] * 1000,
                 "met" if medians["nftables"] <= medians["knock"] else "NOT MET"))
    if "nftables" in medians and "fwknop" in medians:
        ratio = medians["nftables"] / medians["fwknop"]
        print("Goal nftables <= 0.5 x fwknop: %.2f x: %s"
              % (ratio, "met" if ratio <= 0.5 else "NOT MET"))


def share(counts):
    good, total = counts[0], counts[-1]
    return "%d/%d (%.0f %%)" % (good, total, 100.0 * good / total) if total else "-"


def report_concurrent(results, args):
    if not results:
        return
    one = results[0]
    print("\n### %d concurrent knockers, %d s period, %d s grace, %d s lead, %d boundaries\n"
          % (args.knockers, one["period"], one["grace"], one["lead"], args.rotations))
    print("| engine | opened at the first try | opened (with the client's retries) | "
          "across a boundary (first port %.1f s before, the rest %.1f s after) |"
          % (CROSS_BEFORE, CROSS_AFTER))
    print("|---|---|---|---|")
    for result in results:
        crossings = result["crossings"]
        late = sum(1 for before, _ in crossings if not before)
        print("| %s | %s | %s | %s%s |"
              % (result["engine"], share(result["knocks"]),
                 share(result["knocks"][1:]), share([sum(o for _, o in crossings),
                                                    len(crossings)]),
                 "; %d first ports sent late" % late if late else ""))
    print("\n### Server stopped for two periods (a knock each, %.0f s after it stopped)\n"
          % statistics.median(r["stopped_for"] for r in results))
    print("| engine | knockers | opened at the first try | opened at all |")
    print("|---|---|---|---|")
    half = args.knockers // 2
    for result in results:
        if result["engine"] == "knockd":
            print("| knockd | all %d | %s | %s |" % (args.knockers, share(result["after"]),
                                                    share(result["after"][1:])))
        else:
            print("| nftables, the next period held | 0-%d | %s | %s |"
                  % (half - 1, share(result["after_short"]), share(result["after_short"][1:])))
            print("| nftables, %d periods ahead held | %d-%d | %s | %s |"
                  % (args.ahead, half, args.knockers - 1, share(result["after_long"]),
                     share(result["after_long"][1:])))
    for result in results:
        kinds = collections.Counter(kind[5:] for _, found in result["retried"] for kind in found)
        print("\n%s: %d knocks retried, started at %s s into the period; retries by kind: %s"
              % (result["engine"], len(result["retried"]),
                 ", ".join("%.2f" % second for second, _ in sorted(result["retried"])) or "-",
                 ", ".join("%s %d" % item for item in sorted(kinds.items())) or "-"))
        if result["strays"]:
            print("\nWARNING (%s): %d connections from an address not the knocker's"
                  % (result["engine"], result["strays"]))
        if result["topups"]:
            print("\nnftables top-ups (%d doors): %d, median %s"
                  % (args.knockers, len(result["topups"]),
                     ms(statistics.median(result["topups"]))))


def report_probe(result):
    print("\n### A probe every %.0f ms through a top-up or a reload\n" % (PROBE_EVERY * 1000))
    print("| what | doors | element changes | applied: netlink + nft -f (render) | probes "
          "opened in the second from its start (or until its end) | all probes opened |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        good, sent, all_good, all_sent = row["probes"]
        print("| %s | %s | %s | %s | %s | %s |"
              % (row["what"], "{:,}".format(row["doors"]),
                 "{:,}".format(row["changes"]) if "changes" in row else "",
                 "%s (%s)" % (ms(row["seconds"]), ms(row["render"])) if "seconds" in row
                 else "", share([good, sent]), share([all_good, all_sent])))


def report_replay(result):
    print("\n### Single use: a replay from another address after the knock\n")
    print("| engine | replay after | knocks opened | replays opened |")
    print("|---|---|---|---|")
    for row in result["rows"]:
        print("| %s | %s | %d/%d | %d/%d |"
              % (row["engine"], ms(row["delay"]), row["knocks"], row["of"], row["replays"],
                 row["of"]))
    print("\n`spent_uses` read back %d burned uses from the kernel." % result["burned"])


def report_flood(result):
    def per_packet(what, key):
        """The median over the runs of KEY a packet."""
        return statistics.median(run[key] / run["sent"] for run in result["runs"][what])
    base = per_packet("no firewall", "system")
    repeats = len(result["runs"]["no firewall"])
    print("\n### {:,} SYN/s to ports of no door for {:g} s, each setting {} times\n"
          .format(int(result["rate"]), result["seconds"], repeats))
    print("| what | sender system CPU a packet (median) | kernel path over no firewall | "
          "daemon CPU a packet | the firewall's share of one CPU at this rate |")
    print("|---|---|---|---|---|")
    for what in result["order"]:
        system, daemon = per_packet(what, "system"), per_packet(what, "daemon")
        extra = system - base
        print("| %s | %.2f µs | %s | %s | %.1f %% |"
              % (what, system * 1e6, "%+.2f µs" % (extra * 1e6) if what != "no firewall"
                 else "", "%.2f µs" % (daemon * 1e6) if what.startswith("knockd") else "",
                 100.0 * (extra + daemon) * result["rate"]))


# ---------------------------------------------------------------- running it

def inside(args):
    folder = Path(args.folder) / args.part
    folder.mkdir(mode=0o700)
    part, _, which = args.part.partition("-")
    if part == "concurrent":
        result = part_concurrent(folder, args, which)
    else:
        result = globals()["part_" + part](folder, args)
    with open(args.results, "a") as handle:
        handle.write(json.dumps({"part": part, "result": result}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=15, help="latency: knocks a method")
    parser.add_argument("--rotations", type=int, default=6)
    parser.add_argument("--knockers", type=int, choices=range(2, 11), default=10,
                        metavar="2-10")
    parser.add_argument("--ahead", type=int, default=3,
                        help="periods the nftables server holds ahead for knockers 5-9")
    parser.add_argument("--probe-doors", default="500,10000",
                        type=lambda text: [int(n) for n in text.split(",")])
    parser.add_argument("--replays", type=int, default=3, help="replays at each delay")
    parser.add_argument("--flood-seconds", type=float, default=5)
    parser.add_argument("--flood-rate", type=float, default=10000)
    parser.add_argument("--flood-repeats", type=int, default=3)
    parser.add_argument("--knockd-flood", default="10/1,100/10,1000/100",
                        metavar="DOORS/KNOCKD,...",
                        type=lambda text: [tuple(int(n) for n in item.split("/"))
                                           for item in text.split(",")],
                        help="the knockd layouts of the flood part (default %(default)s)")
    parser.add_argument("--only", default=",".join(PARTS),
                        type=lambda text: text.split(","))
    parser.add_argument("--install-fwknop", action="store_true",
                        help="apt-get install fwknop-server fwknop-client when missing")
    for hidden in (latency_bench.INSIDE, "--part", "--folder", "--results", "--fwknop"):
        parser.add_argument(hidden, help=argparse.SUPPRESS,
                            **({"action": "store_true"} if hidden in (latency_bench.INSIDE,
                                                                      "--fwknop") else {}))
    args = parser.parse_args()
    if args.inside_namespace:
        inside(args)
        return 0
    latency_bench.need_root_and("ip", "nft", "knockd", "knock", "iptables")
    if "concurrent" in args.only and subprocess.run(
            [sys.executable, "-c", ""], user=knockers_bench.UID_BASE,
            stderr=subprocess.DEVNULL).returncode:
        sys.exit("error: the knockers run as uid %d, which cannot run %s: run it with "
                 "/usr/bin/python3" % (knockers_bench.UID_BASE, sys.executable))
    if args.install_fwknop:
        latency_bench.ensure_fwknop()
    fwknop = bool(shutil.which("fwknop") and shutil.which("fwknopd"))
    if not fwknop and "latency" in args.only:
        print("fwknop is not installed: its row stays empty (apt-get install -y fwknop-server "
              "fwknop-client, or --install-fwknop)", file=sys.stderr)
    parts = [p for p in PARTS if p in args.only]
    folder = tempfile.mkdtemp(prefix="krengines-")
    results = Path(folder) / "results.jsonl"
    load = os.getloadavg()
    started = time.monotonic()
    try:
        for part in parts:
            for name in (["concurrent-knockd", "concurrent-nftables"] if part == "concurrent"
                         else [part]):
                print("running %s ..." % name, file=sys.stderr)
                code = latency_bench.in_own_namespace(
                    "krengines", sys.argv[1:] + ["--part", name, "--folder", folder,
                                                 "--results", str(results)]
                    + ["--fwknop"] * fwknop)
                if code:
                    print("error: %s exited %d" % (name, code), file=sys.stderr)
        found = collections.defaultdict(list)
        if results.exists():
            for line in results.read_text().splitlines():
                entry = json.loads(line)
                found[entry["part"]].append(entry["result"])
        print("## Engines side by side\n")
        print("command: nice %s %s; %d CPUs (shared), load average %.1f at the start, %.1f "
              "at the end; %.0f s in all"
              % (sys.executable, " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                 os.cpu_count(), load[0], os.getloadavg()[0], time.monotonic() - started))
        for result in found["latency"]:
            report_latency(result, args)
        report_concurrent(found["concurrent"], args)
        for name in ("probe", "replay", "flood"):
            for result in found[name]:
                globals()["report_" + name](result)
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
