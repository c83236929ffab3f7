#!/usr/bin/env python3
"""Benchmark: a single-use knock replayed at once from many addresses (issue 23).

Real knockd in a network namespace of its own, with two doors: the client's
single-use door (its burn gated as add-client writes it) and another
client's door.  The client knocks from 127.0.0.2 and, in the same burst,
REPLAYS copies of its packets come from as many other addresses, so that
knockd opens for them too (it holds the sequence until the burn's reload).
Meanwhile the other client knocks 12 times.  Prints how far the use counter
moved, whether the client's next knock (counter + 1) opened, the other
client's openings out of 12, the burn processes (how many, the peak of the
sum of their RSS, sampled every 10 ms), knockd's reloads, and its crashes:
knockd 0.8 can crash at a reload under a flood (docs/DESIGN.md), and a
supervisor restarts it 1 s later, as systemd does with knockd.service.d.
Loopback only; as root, with Debian's knockd.

    python3 bench/replay_flood.py [--replays 1000] [--ungated] [--script PATH]

--ungated writes the burn as doors written before the gate had it (one
burn process per opening; the rotation still names the use); --script runs
another server script (e.g. an older version, with --ungated) in the door.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from knockd_rotator.core import commands  # noqa: E402
from knockd_rotator.core import generator  # noqa: E402
from knockd_rotator.core import settings as core_settings  # noqa: E402
from knockd_rotator.core import uses  # noqa: E402
from knockd_rotator.engines.knockd import burns as knockd_burns  # noqa: E402
from single_use import SEND, knockd_env_file, wait  # noqa: E402

PERIOD = 86400
OTHER_KNOCKS = 12


class BurnSampler(threading.Thread):
    """Samples the burn processes in NAMESPACE until stopped."""

    def __init__(self, namespace, script):
        super().__init__(daemon=True)
        self.namespace, self.script = namespace, script.encode()
        self.seen, self.peak_rss_kb, self.peak_count = set(), 0, 0
        self.running = True

    def burns(self):
        pids = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True,
                              text=True).stdout.split()
        found = {}
        for pid in pids:
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as handle:
                    argv = handle.read().split(b"\0")
                with open("/proc/%s/status" % pid) as handle:
                    rss = re.search(r"VmRSS:\s+(\d+)", handle.read())
            except OSError:
                continue
            if b"burn" in argv and self.script in argv:
                found[pid] = int(rss.group(1)) if rss else 0
        return found

    def run(self):
        while self.running:
            found = self.burns()
            self.seen.update(found)
            self.peak_count = max(self.peak_count, len(found))
            self.peak_rss_kb = max(self.peak_rss_kb, sum(found.values()))
            time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--replays", type=int, default=1000)
    parser.add_argument("--ungated", action="store_true")
    parser.add_argument("--script", default=str(ROOT / "knockd_rotator_server.py"))
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("knockd"):
        sys.exit("error: needs root and knockd (apt install knockd)")
    if not 1 <= args.replays <= 60000:
        sys.exit("error: --replays takes 1 to 60000 (one 127.x address each)")
    script = os.path.realpath(args.script)
    folder = Path(tempfile.mkdtemp(prefix="kr-bench-"))
    os.chmod(folder, 0o700)
    namespace = "krbench-%s" % uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    sampler = None
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        config, log, pidfile, start, env_file, environ = knockd_env_file(
            folder, namespace, SINGLE_USE_SSH=1, PERIOD_MODULO=PERIOD, GRACE=0)
        state = folder / "state"
        if args.ungated:
            burn = "KNOCKD_ROTATOR_ENV_FILE=%s %s --config %s burn ssh_ROTATOR & " % (
                env_file, script, config)
        else:
            burn = knockd_burns.burn_command(config, "ssh_ROTATOR", environ).replace(
                str(commands.SCRIPT), script)
        config.write_text("[options]\n\tlogfile = %s\n[ssh_ROTATOR]\n\tseq_timeout = 10\n"
                          "\ttcpflags = syn\n\tstart_command = %s true\n"
                          "[other_ROTATOR]\n\tseq_timeout = 10\n\ttcpflags = syn\n"
                          "\tstart_command = true\n" % (log, burn))
        config.chmod(0o600)
        subprocess.run([sys.executable, script, "--config", str(config)], env=environ,
                       check=True, stderr=subprocess.DEVNULL)
        wait(lambda: log.exists() and "listening" in log.read_text(), 10)
        # As systemd's Restart=on-failure, RestartSec=1 (knockd.service.d) does:
        # knockd 0.8 can crash at a reload under a flood (docs/DESIGN.md).
        restarts = folder / "restarts"
        supervisor = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "sh", "-c",
             "while sleep 1; do kill -0 $(cat %s) 2>/dev/null || { echo >>%s; %s; }; done"
             % (pidfile, restarts, start)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def count(pattern):
            return len(re.findall(pattern, log.read_text(errors="replace")))

        def ports(door, use):
            found = core_settings.with_sequences(generator.read_settings(core_settings.env_values(
                env_file.read_bytes()), door))
            return [item.split(b":")[0].decode() for item in found.sequence_at(
                generator.period_start(time.time(), PERIOD), use).split(b",")]

        def send(sources, sequence):
            subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SEND,
                            ",".join(sources)] + sequence, check=True)

        def counter():
            return sum(uses.read_uses(str(state)).get("ssh_ROTATOR", {})
                       .get("counts", {}).values())

        replayers = ["127.1.%d.%d" % (index // 250, index % 250 + 1)
                     for index in range(args.replays)]
        other_sequence = ports("other_ROTATOR", 0)
        reloads_before, counter_before = count("re-reading config file"), counter()
        sampler = BurnSampler(namespace, script)
        sampler.start()
        flood_started = time.monotonic()
        send(["127.0.0.2"] + replayers, ports("ssh_ROTATOR", counter_before))
        flood_sent = time.monotonic() - flood_started
        other_opened = 0
        for _ in range(OTHER_KNOCKS):
            opens = count(r"127\.0\.0\.9: other_ROTATOR: OPEN SESAME")
            send(["127.0.0.9"], other_sequence)
            other_opened += wait(
                lambda: count(r"127\.0\.0\.9: other_ROTATOR: OPEN SESAME") > opens, 2)
            time.sleep(0.25)
        settled = wait(lambda: not sampler.burns(), 300)
        sampler.running = False
        sampler.join()
        settle_seconds = time.monotonic() - flood_started
        replays_opened = sum(count(r"%s: ssh_ROTATOR: OPEN SESAME" % re.escape(source))
                             for source in replayers)
        moved = counter() - counter_before
        reloads = count("re-reading config file") - reloads_before
        opens = count(r"127\.0\.0\.2: ssh_ROTATOR: OPEN SESAME")
        send(["127.0.0.2"], ports("ssh_ROTATOR", counter_before + 1))
        next_opened = wait(lambda: count(r"127\.0\.0\.2: ssh_ROTATOR: OPEN SESAME") > opens, 5)
        crashes = restarts.read_text().count("\n") if restarts.exists() else 0
        supervisor.kill()
        print("%d replays (%s, %s; sent in %.3f s): %d opened; counter moved by %d; the "
              "client's next knock (counter + 1) %s; other client %d/%d; burn processes: %d "
              "(at most %d at once, peak RSS sum %.1f MB); %d reloads; knockd crashed %d "
              "times (restarted 1 s later); burns %s, %.1f s after the flood"
              % (args.replays, "ungated" if args.ungated else "gated",
                 os.path.relpath(script, ROOT) if script.startswith(str(ROOT)) else script,
                 flood_sent, replays_opened, moved, "opened" if next_opened else "did NOT open",
                 other_opened, OTHER_KNOCKS, len(sampler.seen), sampler.peak_count,
                 sampler.peak_rss_kb / 1024.0, reloads, crashes,
                 "ended" if settled else "STILL RUNNING", settle_seconds))
    finally:
        if sampler:
            sampler.running = False
        subprocess.run("ip netns pids %s | xargs -r kill -KILL" % namespace, shell=True)
        subprocess.run(["ip", "netns", "del", namespace])
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
