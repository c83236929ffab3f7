#!/usr/bin/env python3
"""Benchmark: single-use knocks with real knockd, in a network namespace.

KNOCKS times: a knock with the door's current sequence (raw SYNs from
127.0.0.2), then the same packets replayed from 127.0.0.3.  Measures the
replay window (from the knock's last packet until knockd has re-read the
file that holds the next sequence), whether each knock opened the door,
whether any replay did, and knockd's reloads per knock.  Loopback only, in
a namespace of its own that it removes; as root, with Debian's knockd.

    python3 bench/single_use.py [--knocks 100]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from knockd_rotator.core import generator  # noqa: E402
from knockd_rotator.core import settings as core_settings  # noqa: E402

# Each source (argv 1, comma-separated) sends the whole sequence (argv 2...)
# in turn, as a raw SYN per port (bench/replay_flood.py sends many at once);
# an item +S between two sources waits S seconds (bench/engines.py's replays).
SEND = r"""
import socket, struct, sys, time
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for text in sys.argv[1].split(","):
    if text.startswith("+"):
        time.sleep(float(text[1:]))
        continue
    source = bytes(int(part) for part in text.split("."))
    for port in sys.argv[2:]:
        tcp = struct.pack("!HHIIBBHHH", 40000, int(port), 0, 0, 5 << 4, 0x02, 1024, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
                         source, bytes([127, 0, 0, 1]))
        raw.sendto(ip + tcp, ("127.0.0.1", 0))
"""


def wait(predicate, seconds):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def knockd_env_file(folder, namespace, **settings):
    """A knockd's files in FOLDER (knockd.conf, its log and pid file) and an
    environment file (0600) with SETTINGS, a secret, the state folder and
    the commands for a `knockd -d` in NAMESPACE: (config, log, pidfile, the
    command that starts knockd, the environment file, the environment of a
    server run that reads it)."""
    config, log, pidfile = folder / "knockd.conf", folder / "knockd.log", folder / "knockd.pid"
    env_file = folder / "rotator.env"
    start = "ip netns exec %s knockd -d -i lo -c %s -p %s" % (namespace, config, pidfile)
    settings = dict(dict(SECRET="bench-" + "s" * 40, STATE_DIR=folder / "state",
                         CHECK_SECONDS=1, RELOAD_COMMAND="kill -HUP $(cat %s)" % pidfile,
                         CHECK_COMMAND="kill -0 $(cat %s)" % pidfile, RECOVER_COMMAND=start,
                         KILL_COMMAND="kill -KILL $(cat %s)" % pidfile), **settings)
    descriptor = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("".join("KNOCKD_ROTATOR_%s=%s\n" % item for item in settings.items()))
    environ = {"PATH": os.environ.get("PATH", os.defpath),
               "KNOCKD_ROTATOR_ENV_FILE": str(env_file)}
    return config, log, pidfile, start, env_file, environ


def single_use_knockd(folder, namespace):
    """Debian's knockd in NAMESPACE (files in FOLDER) with one single-use
    door, ssh_ROTATOR, whose start_command burns the use as the server's
    door does (the server rewrites the file and reloads knockd); once knockd
    listens: (the door's settings, with .sequence_at(start, use); knockd's log)."""
    config, log, _, _, env_file, environ = knockd_env_file(
        folder, namespace, SINGLE_USE=1, PERIOD_MODULO=86400, GRACE=0)
    burn = "KNOCKD_ROTATOR_ENV_FILE=%s %s %s --config %s burn ssh_ROTATOR >/dev/null 2>&1 &" \
        % (env_file, sys.executable, ROOT / "knockd_rotator_server.py", config)
    config.write_text("[options]\n\tlogfile = %s\n[ssh_ROTATOR]\n\tseq_timeout = 10\n"
                      "\ttcpflags = syn\n\tstart_command = %s true\n" % (log, burn))
    config.chmod(0o600)
    subprocess.run([sys.executable, str(ROOT / "knockd_rotator_server.py"), "--config",
                    str(config)], env=environ, check=True, stderr=subprocess.DEVNULL)
    wait(lambda: log.exists() and "listening" in log.read_text(), 10)
    return core_settings.with_sequences(generator.read_settings(core_settings.env_values(
        env_file.read_bytes()), "ssh_ROTATOR")), log


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--knocks", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("knockd"):
        sys.exit("error: needs root and knockd (apt install knockd)")
    folder = Path(tempfile.mkdtemp(prefix="kr-bench-"))
    os.chmod(folder, 0o700)
    namespace = "krbench-%s" % uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        door, log = single_use_knockd(folder, namespace)

        def text():
            return log.read_text(errors="replace")

        def count(pattern):
            return len(re.findall(pattern, text()))
        uses, windows, opened = 0, [], 0
        reloads_before = count("re-reading config file")
        for _ in range(args.knocks):
            start_time = generator.period_start(time.time(), 86400)
            ports = [item.split(b":")[0].decode()
                     for item in door.sequence_at(start_time, uses).split(b",")]
            reloads, opens = count("re-reading config file"), count(r"127\.0\.0\.2: ssh_ROTATOR: OPEN")
            subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SEND,
                            "127.0.0.2"] + ports, check=True)
            sent = time.monotonic()
            if wait(lambda: count("re-reading config file") > reloads, 10):
                windows.append(time.monotonic() - sent)
            opened += wait(lambda: count(r"127\.0\.0\.2: ssh_ROTATOR: OPEN") > opens, 2)
            subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SEND,
                            "127.0.0.3"] + ports, check=True)
            uses += 1
        # A last knock from the replayer's address with the current sequence
        # shows knockd saw its earlier packets too.
        ports = [item.split(b":")[0].decode() for item in door.sequence_at(
            generator.period_start(time.time(), 86400), uses).split(b",")]
        subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SEND,
                        "127.0.0.3"] + ports, check=True)
        wait(lambda: count(r"127\.0\.0\.3: ssh_ROTATOR: OPEN") >= 1, 5)
        replays_opened = count(r"127\.0\.0\.3: ssh_ROTATOR: OPEN") - 1
        reloads = count("re-reading config file") - reloads_before
        print("%d single-use knocks on %s: %d opened (%.0f %%), %d replays opened; replay "
              "window (knock to knockd holding the next sequence): median %.3f s, max %.3f s; "
              "%.2f reloads per knock" % (
                  args.knocks, sys.executable, opened, 100.0 * opened / args.knocks,
                  replays_opened, statistics.median(windows), max(windows),
                  (reloads - 1) / args.knocks))
    finally:
        subprocess.run("ip netns pids %s | xargs -r kill -KILL" % namespace, shell=True)
        subprocess.run(["ip", "netns", "del", namespace])
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
