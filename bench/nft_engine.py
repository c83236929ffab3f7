#!/usr/bin/env python3
"""Benchmark: the nftables engine's table at 500 and 10,000 doors, in a
network namespace of its own that it removes (as root; loopback only).

Each door holds three windows of 10 knocks (the previous period's, in its
grace; the current one; the next one, for the lead), as the server keeps
them.  Measured:
  - a full load (render + `nft -f`), and the table's size (elements, text);
  - a top-up: the window moves one period (each door loses one window and
    gains one: ~24 element changes a door), render and `nft -f` timed
    apart, ROUNDS times;
  - the kernel memory the table takes: the change of this process tree's
    memory cgroup (v1 memory.kmem.usage_in_bytes: nf_tables charges its
    allocations to the loader's cgroup) across loading the table, and of
    /proc/meminfo's Slab + VmallocUsed (machine-wide, so noisier);
  - optionally (--flood N) the CPU a flood of N SYNs to ports of no door
    costs (the sender's user + system time: on loopback the receive path
    runs in the sender's context), with no table, 10 doors and the largest
    plan.

    nice python3 bench/nft_engine.py [--doors 500,10000] [--rounds 3] [--flood 100000]
                                     [--split 2]
"""

import argparse
import os
import resource
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from knockd_rotator.engines import nftables as engine  # noqa: E402

PERIOD = 21600
GRACE = 30
LEAD = 10
LENGTH = 10

# python3 -c FLOOD COUNT SECONDS [RATE]: COUNT SYNs (at most for SECONDS),
# at RATE a second (0 or none: as fast as it goes), to ports below 2000 (of
# no door), from 256 sources; prints the packets sent and its user and
# system CPU seconds.
FLOOD = r"""
import socket, struct, sys, time, resource
count, started = int(sys.argv[1]), time.monotonic()
deadline, rate = started + float(sys.argv[2]), float(sys.argv[3]) if sys.argv[3:] else 0
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
packets = []
for i in range(256):
    tcp = struct.pack("!HHIIBBHHH", 40000 + i, 1000 + (i * 7) % 900, 0, 0, 5 << 4, 0x02, 1024, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
                     bytes([127, 0, 1 + i % 50, 1 + i % 250]), bytes([127, 0, 0, 1]))
    packets.append(ip + tcp)
sent = 0
while sent < count and time.monotonic() < deadline:
    for p in packets:
        raw.sendto(p, ("127.0.0.1", 0))
    sent += len(packets)
    if rate:
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
u = resource.getrusage(resource.RUSAGE_SELF)
print(sent, u.ru_utime, u.ru_stime)
"""


def sequence(rng):
    while True:
        ports = rng.sample(range(2000, 65536), LENGTH)
        if ports != sorted(ports) and ports != sorted(ports, reverse=True):
            return tuple((p, "udp" if p % 3 == 0 else "tcp") for p in ports)


def plan(doors, first_period, seed=1):
    out = []
    for number in range(doors):
        windows = []
        for k in range(first_period, first_period + 3):
            rng = random.Random("%d/%d/%d" % (seed, number, k))
            start = k * PERIOD
            windows.append(engine.Window(start, start - LEAD, start + PERIOD + GRACE,
                                         sequence(rng), None))
        out.append(engine.Door("door%d_ROTATOR" % number, number, (22,), 30, 25, PERIOD,
                               "inet", tuple(windows)))
    return out


def changes(text):
    return sum(line.count(",") + 1 for line in text.splitlines()
               if line.startswith(("add element", "delete element")))


def kmem():
    for line in open("/proc/self/cgroup"):
        parts = line.strip().split(":")
        if "memory" in parts[1].split(","):
            path = Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/") / \
                "memory.kmem.usage_in_bytes"
            if path.exists():
                return int(path.read_text())
    return None


def meminfo():
    values = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M))
    return (int(values["Slab"]) + int(values.get("VmallocUsed", 0))) * 1024


def nft(ns, *args, text=None):
    result = subprocess.run(["ip", "netns", "exec", ns, "nft"] + list(args),
                            input=text, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[:2000])
    return result.stdout


def flood(ns, count, seconds=30, rate=0, split=False):
    """FLOOD in namespace NS (None: this one): (packets sent, the sender's
    CPU seconds; SPLIT: user and system apart)."""
    command = [sys.executable, "-c", FLOOD, str(count), str(seconds), str(rate)]
    result = subprocess.run((["ip", "netns", "exec", ns] if ns else []) + command,
                            capture_output=True, text=True, check=True)
    sent, user, system = result.stdout.split()
    return (int(sent), float(user), float(system)) if split else \
        (int(sent), float(user) + float(system))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doors", default="500,10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", type=int, default=0, metavar="N")
    parser.add_argument("--split", type=int, default=1, metavar="K",
                        help="also time the top-up as K transactions of doors/K doors")
    args = parser.parse_args()
    if os.geteuid():
        sys.exit("needs root (network namespaces)")
    ns = "nftbench-%s" % uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        now = int(time.time())
        k = now // PERIOD
        floods = {}
        if args.flood:
            floods["no table"] = flood(ns, args.flood)
            text, _ = engine.render(plan(10, k - 1), now)
            engine.apply(text, ns)
            floods["10 doors"] = flood(ns, args.flood)
            nft(ns, "delete", "table", "inet", engine.TABLE)
        for doors in [int(d) for d in args.doors.split(",")]:
            print("== %d doors" % doors)
            kmem0, mem0 = kmem(), meminfo()
            started = time.monotonic()
            text, loaded = engine.render(plan(doors, k - 1), now)
            rendered = time.monotonic()
            engine.apply(text, ns)
            applied = time.monotonic()
            kmem1, mem1 = kmem(), meminfo()
            elements = sum(len(v) for v in loaded.elements.values())
            rules = text.count("\nadd rule ")
            print("full load: render %.3f s, nft -f %.3f s; %d elements (trans %d), %d rules, "
                  "%.1f MB of nft text" % (rendered - started, applied - rendered, elements,
                                           len(loaded.elements["trans"]), rules, len(text) / 1e6))
            if kmem0 is not None:
                print("kernel memory (memory cgroup kmem): %.1f MB, %.0f bytes an element"
                      % ((kmem1 - kmem0) / 1e6, (kmem1 - kmem0) / elements))
            print("kernel memory (/proc/meminfo Slab + VmallocUsed, machine-wide): %.1f MB"
                  % ((mem1 - mem0) / 1e6))
            listed = nft(ns, "list", "table", "inet", engine.TABLE)
            print("`nft list table`: %.1f MB of text" % (len(listed) / 1e6))
            renders, applies, cpus = [], [], []
            for r in range(1, args.rounds + 1):
                t0 = time.monotonic()
                # A period later: the window of two periods ago has expired.
                text, new = engine.render(plan(doors, k - 1 + r), now + r * PERIOD, loaded)
                t1 = time.monotonic()
                cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                engine.apply(text, ns)
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t2 = time.monotonic()
                renders.append(t1 - t0)
                applies.append(t2 - t1)
                cpus.append(cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime)
                loaded = new
            if args.split > 1:
                # The same move in SPLIT transactions, a slice of the doors each.
                base = k - 1 + args.rounds
                moved = plan(doors, base + 1)
                current = plan(doors, base)
                times, cpus_split = [], []
                size = -(-doors // args.split)
                for part in range(args.split):
                    step = moved[:size * (part + 1)] + current[size * (part + 1):]
                    t0 = time.monotonic()
                    text_part, new = engine.render(step, now + (args.rounds + 1) * PERIOD, loaded)
                    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    t1 = time.monotonic()
                    engine.apply(text_part, ns)
                    times.append(time.monotonic() - t1)
                    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpus_split.append(cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime)
                    loaded = new
                print("top-up in %d transactions of %d doors: nft -f %s s wall, %s s CPU"
                      % (args.split, size, " ".join("%.3f" % t for t in times),
                         " ".join("%.3f" % c for c in cpus_split)))
            print("top-up (one period ahead, %d rounds): render median %.3f s, nft -f median "
                  "%.3f s wall (max %.3f s), %.3f s CPU (user + system); %d element changes"
                  % (args.rounds, statistics.median(renders), statistics.median(applies),
                     max(applies), statistics.median(cpus), changes(text)))
            if args.flood and doors == max(int(d) for d in args.doors.split(",")):
                floods["%d doors" % doors] = flood(ns, args.flood)
            kmem2 = kmem()
            nft(ns, "delete", "table", "inet", engine.TABLE)
            kmem3 = kmem()
            if kmem0 is not None:
                print("deleting the table gave back %.1f MB (kmem)" % ((kmem2 - kmem3) / 1e6))
        for what, (sent, cpu) in floods.items():
            print("SYN flood to ports of no door, %s: %d packets, %.2f s CPU, %.2f us a packet"
                  % (what, sent, cpu, cpu / sent * 1e6))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
