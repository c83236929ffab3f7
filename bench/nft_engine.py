#!/usr/bin/env python3
"""Benchmark: the nftables engine's table at 500 and 10,000 doors, in a
network namespace of its own that it removes (as root; loopback only).

Each door holds three windows of 10 knocks (the previous period's, in its
grace; the current one; the next one, for the lead), as the server keeps
them.  Measured:
  - a full load (render + `nft -f`), and the table's size (elements, text);
  - what `status` reads of the table (table_state, over netlink), against
    `nft list table`;
  - a top-up: the window moves one period (each door gains a window: ~11
    new elements a door, most staged; the oldest window expires in the
    kernel by itself), the render, the netlink batch and `nft -f` timed
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
"""

import argparse
import os
import resource
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from knockd_rotator.engines import nftables as engine  # noqa: E402
from knockd_rotator.engines.nftables import netlink  # noqa: E402

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


def changes(load):
    """The element changes of a Load: its text's and those it stages."""
    return sum(line.count(",") + 1 for line in load.text.splitlines()
               if line.startswith(("add element", "delete element"))) + \
        sum(len(items) for items in load.staged.values())


def cpu_seconds():
    """User + system CPU of this process and its waited-for children: the
    staged elements are written from this process, the text by nft."""
    return sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


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
            load, _ = engine.render(plan(10, k - 1), now)
            engine.apply(load, ns)
            floods["10 doors"] = flood(ns, args.flood)
            nft(ns, "delete", "table", "inet", engine.TABLE)
        for doors in [int(d) for d in args.doors.split(",")]:
            print("== %d doors" % doors)
            kmem0, mem0 = kmem(), meminfo()
            started = time.monotonic()
            load, loaded = engine.render(plan(doors, k - 1), now)
            rendered = time.monotonic()
            engine.apply(load, ns)
            applied = time.monotonic()
            kmem1, mem1 = kmem(), meminfo()
            elements = sum(len(v) for v in loaded.elements.values())
            rules = load.text.count("\nadd rule ")
            print("full load: render %.3f s, nft -f %.3f s; %d elements (trans %d), %d rules, "
                  "%.1f MB of nft text" % (rendered - started, applied - rendered, elements,
                                           len(loaded.elements["trans"]), rules,
                                           len(load.text) / 1e6))
            if kmem0 is not None:
                print("kernel memory (memory cgroup kmem): %.1f MB, %.0f bytes an element"
                      % ((kmem1 - kmem0) / 1e6, (kmem1 - kmem0) / elements))
            print("kernel memory (/proc/meminfo Slab + VmallocUsed, machine-wide): %.1f MB"
                  % ((mem1 - mem0) / 1e6))
            started = time.monotonic()
            listed = nft(ns, "list", "table", "inet", engine.TABLE)
            listing = time.monotonic() - started
            started = time.monotonic()
            state = engine.table_state(ns)
            print("`nft list table`: %.1f MB of text, %.2f s; status's read of the table "
                  "(netlink): %.3f s, %d cohorts, %d doors' counters"
                  % (len(listed) / 1e6, listing, time.monotonic() - started,
                     len(state.cohorts), len(state.opens)))
            renders, applies, cpus, parts = [], [], [], []
            for r in range(1, args.rounds + 1):
                t0 = time.monotonic()
                # A period later: the window of two periods ago has expired.
                load, new = engine.render(plan(doors, k - 1 + r), now + r * PERIOD, loaded)
                t1 = time.monotonic()
                cpu0 = cpu_seconds()
                # kernel.apply's two steps, timed apart.
                netlink.add_elements(engine.TABLE, load.staged, ns)
                t2 = time.monotonic()
                engine.apply(load._replace(staged={}), ns)
                t3 = time.monotonic()
                cpus.append(cpu_seconds() - cpu0)
                renders.append(t1 - t0)
                applies.append(t3 - t1)
                parts.append((t2 - t1, t3 - t2))
                loaded = new
            staged = sum(len(items) for items in load.staged.values())
            print("top-up (one period ahead, %d rounds): render median %.3f s; applied in "
                  "median %.3f s wall (max %.3f s), %.3f s CPU (user + system, netlink and "
                  "nft); %d element changes, %d of them staged; netlink %s s, then nft -f "
                  "%s s" % (args.rounds, statistics.median(renders), statistics.median(applies),
                            max(applies), statistics.median(cpus), changes(load), staged,
                            "/".join("%.3f" % n for n, _ in parts),
                            "/".join("%.3f" % t for _, t in parts)))
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
