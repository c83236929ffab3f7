"""Single-use knocks: a sequence that opened the door never opens it again (issue 15).

Real knockd in a network namespace; the door's start_command runs `burn` in
the background and then opens the port.  Knocks and replays are raw TCP SYNs
from chosen 127.x source addresses, so that knockd's log tells them apart."""

import re
import subprocess
import sys
import time

import pytest

import knockd_rotator_server as server
from conftest import (GUARDED_PORT, SECRET, SEND_SYNS, SERVER, alive_command,
                      daemon_start_command, need_root_and, rotator_env, run_client, wait_until)


class SingleUseDoor:
    """knockd with one single-use door whose start_command burns it."""

    def __init__(self, netns, tmp_path, period=3600, grace=0, cmd_timeout=5):
        self.netns, self.tmp = netns, tmp_path
        self.config = tmp_path / "knockd.conf"
        self.log = tmp_path / "knockd.log"
        self.pidfile = tmp_path / "knockd.pid"
        self.env_file = tmp_path / "rotator.env"
        start = daemon_start_command(netns.name, self.config, self.pidfile)
        self.period = period
        settings = dict(SECRET=SECRET, SINGLE_USE=1, PERIOD_MODULO=period, GRACE=grace,
                        STATE_DIR=tmp_path / "state", CHECK_SECONDS=1,
                        RELOAD_COMMAND="kill -HUP $(cat %s)" % self.pidfile,
                        CHECK_COMMAND=alive_command("$(cat %s)" % self.pidfile),
                        RECOVER_COMMAND=start, KILL_COMMAND="kill -KILL $(cat %s)" % self.pidfile)
        self.env_file.write_text("".join("KNOCKD_ROTATOR_%s=%s\n" % item
                                         for item in settings.items()))
        self.env_file.chmod(0o600)
        burn = "KNOCKD_ROTATOR_ENV_FILE=%s %s %s --config %s burn ssh_ROTATOR >>%s 2>&1 &" % (
            self.env_file, sys.executable, SERVER, self.config, tmp_path / "burns.log")
        self.config.write_text(
            "[options]\n\tlogfile = %s\n\n[ssh_ROTATOR]\n\tseq_timeout = 10\n\ttcpflags = syn\n"
            "\tstart_command = %s /usr/sbin/iptables -I INPUT -s %%IP%% -p tcp --dport %d -j "
            "ACCEPT\n\tcmd_timeout = %d\n\tstop_command = /usr/sbin/iptables -D INPUT -s %%IP%% "
            "-p tcp --dport %d -j ACCEPT\n" % (self.log, burn, GUARDED_PORT, cmd_timeout,
                                              GUARDED_PORT))
        self.env = {"KNOCKD_ROTATOR_ENV_FILE": str(self.env_file), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def rotate(self, *args):
        result = subprocess.run([sys.executable, str(SERVER), "--config", str(self.config)]
                                + list(args), env=self.env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return result

    def sequence(self, use, periods_back=0):
        settings = server.with_sequences(server.read_settings(
            server.env_values(self.env_file.read_bytes()), "ssh_ROTATOR"))
        start = server.period_start(time.time(), self.period) - periods_back * self.period
        return [int(item.split(b":")[0]) for item in settings.sequence_at(start, use).split(b",")]

    def send(self, source, ports):
        self.netns.run(sys.executable, "-c", SEND_SYNS, source, *ports)

    def opened(self, source):
        return len(re.findall(r"%s: ssh_ROTATOR(_GRACE)?: OPEN SESAME" % re.escape(source),
                              self.log.read_text(errors="replace")))

    def reloads(self):
        return self.log.read_text(errors="replace").count("re-reading config file")

    def knock(self, source, use, periods_back=0):
        """Knock with the USE-th sequence from SOURCE; wait until it opened
        and knockd holds the next sequence (the burn's reload)."""
        opened, reloads = self.opened(source), self.reloads()
        self.send(source, self.sequence(use, periods_back))
        wait_until(lambda: self.opened(source) > opened, 10, "%s to open" % source)
        wait_until(lambda: self.reloads() > reloads, 10, "the burn's reload")


@pytest.fixture
def door(guarded, tmp_path):
    need_root_and("knockd")
    made = SingleUseDoor(guarded, tmp_path)
    made.rotate()           # the first rotation starts knockd (recover command)
    wait_until(lambda: "listening on lo" in made.log.read_text(errors="replace"), 10,
               "knockd to listen")
    return made


def test_a_replayed_knock_opens_nothing(door):
    """The legitimate knock opens and burns its sequence; the same packets
    from 10 other addresses afterwards open nothing (a later knock with the
    next sequence, which does open, shows knockd saw everything before it)."""
    first = door.sequence(0)
    started = time.monotonic()
    door.knock("127.0.0.2", 0)
    print("knock to reload of the next sequence: %.3f s" % (time.monotonic() - started))
    for host in range(10):
        door.send("127.0.1.%d" % (host + 1), first)
    door.knock("127.0.0.3", 1)
    assert [door.opened("127.0.1.%d" % (host + 1)) for host in range(10)] == [0] * 10
    assert door.opened("127.0.0.2") == 1 and door.opened("127.0.0.3") == 1
    status = subprocess.run([sys.executable, str(SERVER), "--config", str(door.config),
                             "status", "--json"], env=door.env, capture_output=True, text=True)
    assert '"uses": 2' in status.stdout, status.stdout


def test_50_knocks_in_a_row_all_open(door):
    for use in range(50):
        door.knock("127.0.0.2", use)
    assert door.opened("127.0.0.2") == 50


def test_a_replay_within_the_grace_opens_nothing(guarded, tmp_path):
    """The grace sibling of the previous period burns itself the same way."""
    need_root_and("knockd")
    door = SingleUseDoor(guarded, tmp_path, period=10, grace=5)
    door.rotate()
    wait_until(lambda: "listening on lo" in door.log.read_text(errors="replace"), 10,
               "knockd to listen")
    wait_until(lambda: time.time() % 10 < 0.5, 11, "a period boundary")
    door.rotate()           # the boundary's rotation: the grace sibling appears
    assert b"[ssh_ROTATOR_GRACE]" in door.config.read_bytes()
    start = server.period_start(time.time(), 10)
    assert b"burn ssh_ROTATOR_GRACE --use %d:0 >>" % (start - 10) in door.config.read_bytes()
    previous = door.sequence(0, periods_back=1)
    door.knock("127.0.0.2", 0, periods_back=1)       # a client a little behind
    for host in range(10):
        door.send("127.0.1.%d" % (host + 1), previous)
    door.knock("127.0.0.3", 0)
    assert time.time() % 10 < 5, "all of it within the grace"
    assert [door.opened("127.0.1.%d" % (host + 1)) for host in range(10)] == [0] * 10
    assert "127.0.0.2: ssh_ROTATOR_GRACE: OPEN SESAME" in door.log.read_text()


def client_knock(door, uses_file):
    """Our client, with the door's settings and a use counter file of its own."""
    env = rotator_env(SECRET=None)
    env.update(server.env_values(door.env_file.read_bytes()))
    env["KNOCKD_ROTATOR_USES_FILE"] = str(uses_file)
    return run_client("knock", "127.0.0.1", "ssh", "--check", GUARDED_PORT, "--check-timeout",
                      "10", env=env, netns=door.netns.name)


@pytest.fixture
def short_door(guarded, tmp_path):
    """A single-use door that closes 1 s after it opened."""
    need_root_and("knockd")
    made = SingleUseDoor(guarded, tmp_path, cmd_timeout=1)
    made.rotate()
    wait_until(lambda: "listening on lo" in made.log.read_text(errors="replace"), 10,
               "knockd to listen")
    return made


def knock_when_shut(door, uses_file):
    wait_until(lambda: not door.netns.tcp_open(GUARDED_PORT, timeout=0.1), 10,
               "the port to close again")
    knocked = client_knock(door, uses_file)
    assert knocked.returncode == 0, knocked.stderr
    return knocked


def test_two_clients_share_a_door_without_knowing_each_other_s_counter(short_door, tmp_path):
    files = [tmp_path / "laptop-uses.json", tmp_path / "phone-uses.json"]
    looked_ahead = 0
    for turn in range(6):
        knocked = knock_when_shut(short_door, files[turn % 2])
        looked_ahead += knocked.stderr.count("another device may have used the door")
    assert short_door.opened("127.0.0.1") >= 6
    print("6 knocks by two devices in turn: %d needed the look-ahead" % looked_ahead)
    assert looked_ahead == 5, "all but the first find the other's use burned"
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"


def test_a_client_that_lost_its_counter_still_gets_in(short_door, tmp_path):
    uses = tmp_path / "uses.json"
    for _ in range(3):
        knock_when_shut(short_door, uses)
    assert "another device" not in knock_when_shut(short_door, uses).stderr
    uses.unlink()
    knocked = knock_when_shut(short_door, uses)
    assert knocked.stderr.count("another device may have used the door") == 4
    assert '"next": 5' in uses.read_text()
