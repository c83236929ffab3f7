"""Single-use knocks: a sequence that opened the door never opens it again (issue 15).

Real knockd in a network namespace; the door's start_command runs `burn` in
the background and then opens the port.  Knocks and replays are raw TCP SYNs
from chosen 127.x source addresses, so that knockd's log tells them apart."""

import re
import subprocess
import sys
import time

import pytest

from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.core import uses as core_uses
from knockd_rotator.engines.knockd import burns as knockd_burns
from conftest import (GUARDED_PORT, SECRET, SEND_SYNS, SERVER, alive_command, run_server,
                      daemon_start_command, need_root_and, rotator_env, run_client, wait_until)


class SingleUseDoor:
    """knockd with one single-use door whose start_command burns it."""

    def __init__(self, netns, tmp_path, period=3600, grace=0, cmd_timeout=5, gated=False):
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
        self.burns_log = tmp_path / "burns.log"
        burn = "KNOCKD_ROTATOR_ENV_FILE=%s %s %s --config %s burn ssh_ROTATOR >>%s 2>&1 &" % (
            self.env_file, sys.executable, SERVER, self.config, self.burns_log)
        if gated:
            # As add-client writes it, the burn's output kept for the test.
            burn = knockd_burns.burn_command(self.config, "ssh_ROTATOR", {
                "KNOCKD_ROTATOR_ENV_FILE": str(self.env_file)}).replace(
                    " & ", " >>%s 2>&1 &" % self.burns_log)
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
        settings = core_settings.with_sequences(generator.read_settings(
            core_settings.env_values(self.env_file.read_bytes()), "ssh_ROTATOR"))
        start = generator.period_start(time.time(), self.period) - periods_back * self.period
        return [int(item.split(b":")[0]) for item in settings.sequence_at(start, use).split(b",")]

    def send(self, source, ports):
        self.netns.run(sys.executable, "-c", SEND_SYNS, source, *ports)

    def opened(self, source):
        return len(re.findall(r"%s: ssh_ROTATOR(_GRACE)?: OPEN SESAME" % re.escape(source),
                              self.log.read_text(errors="replace")))

    def counts(self):
        """The server's use counters of the door, {period start: counter}."""
        return core_uses.read_uses(str(self.tmp / "state")).get("ssh_ROTATOR", {}).get("counts", {})

    def burns_running(self):
        """The burn processes in the namespace."""
        pids = subprocess.run(["ip", "netns", "pids", self.netns.name], capture_output=True,
                              text=True).stdout.split()
        found = []
        for pid in pids:
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if b"burn" in argv and str(SERVER).encode() in argv:
                found.append(pid)
        return found

    def reloads(self):
        return self.log.read_text(errors="replace").count("re-reading config file")

    def knock(self, source, use, periods_back=0):
        """Knock with the USE-th sequence from SOURCE; wait until it opened
        and knockd holds the next sequence (the burn's reload, which its
        burn saw knockd finish: a knock sent while knockd still compiles
        its filter would be lost)."""
        opened, reloads = self.opened(source), self.reloads()
        self.send(source, self.sequence(use, periods_back))
        wait_until(lambda: self.opened(source) > opened, 10, "%s to open" % source)
        wait_until(lambda: self.reloads() > reloads, 10, "the burn's reload")
        wait_until(lambda: not self.burns_running(), 10, "the burn to end")


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
    start = generator.period_start(time.time(), 10)
    assert b"burn ssh_ROTATOR_GRACE --use %d:0 >>" % (start - 10) in door.config.read_bytes()
    previous = door.sequence(0, periods_back=1)
    door.knock("127.0.0.2", 0, periods_back=1)       # a client a little behind
    # The sibling burnt the previous period's use 0, and names its use 1 now.
    assert door.counts() == {str(start - 10): 1}
    assert b"burn ssh_ROTATOR_GRACE --use %d:1 >>" % (start - 10) in door.config.read_bytes()
    for host in range(10):
        door.send("127.0.1.%d" % (host + 1), previous)
    door.knock("127.0.0.3", 0)
    assert door.counts() == {str(start - 10): 1, str(start): 1}
    assert time.time() % 10 < 5, "all of it within the grace"
    assert [door.opened("127.0.1.%d" % (host + 1)) for host in range(10)] == [0] * 10
    assert "127.0.0.2: ssh_ROTATOR_GRACE: OPEN SESAME" in door.log.read_text()


def client_knock(door, uses_file):
    """Our client, with the door's settings and a use counter file of its own."""
    env = rotator_env(SECRET=None)
    env.update(core_settings.env_values(door.env_file.read_bytes()))
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
    # All six knocks in one period: a boundary between them starts the uses
    # again, and the first knock after it needs no look-ahead.
    period = short_door.period
    wait_until(lambda: time.time() % period < period - 180, 200, "a period with 3 min left")
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


@pytest.fixture
def gated_door(guarded, tmp_path):
    """A single-use door whose burn add-client's shell gate starts."""
    need_root_and("knockd")
    made = SingleUseDoor(guarded, tmp_path, gated=True)
    made.rotate()
    wait_until(lambda: "listening on lo" in made.log.read_text(errors="replace"), 10,
               "knockd to listen")
    return made


def test_replays_within_the_burn_window_burn_one_use_once(gated_door):
    """The client's knock and 30 replays of it from 30 addresses, all at once,
    so that knockd opens for the replays too (it holds the sequence until the
    burn's reload): the counter moves by 1, one burn process runs, knockd
    reloads once, and the client's next knock, with counter 1, opens."""
    door = gated_door
    start = generator.period_start(time.time(), door.period)
    replayers = ["127.0.2.%d" % (host + 1) for host in range(30)]
    reloads = door.reloads()
    door.netns.run(sys.executable, "-c", SEND_SYNS, ",".join(["127.0.0.1"] + replayers),
                   *door.sequence(0), timeout=10)
    wait_until(lambda: door.opened("127.0.0.1"), 10, "the client's knock to open")
    wait_until(lambda: door.reloads() > reloads, 10, "the burn's reload")
    wait_until(lambda: not door.burns_running(), 60, "every burn to end")
    replays_opened = sum(door.opened(source) for source in replayers)
    print("%d of 30 replays opened" % replays_opened)
    assert replays_opened >= 2, "the replays came within the burn window"
    assert door.counts() == {str(start): 1}
    burns = door.burns_log.read_text()
    assert burns.count("rotated to the period") == 1 and "burnt already" not in burns, burns
    assert door.reloads() == reloads + 1

    import knockd_rotator_client as client
    uses_file = door.tmp / "client-uses.json"
    client.remember_use(str(uses_file), "ssh_ROTATOR", start, 1)
    knocked = client_knock(door, uses_file)
    assert knocked.returncode == 0, knocked.stderr
    assert "another device" not in knocked.stderr
    wait_until(lambda: door.counts() == {str(start): 2}, 10, "the next knock's burn")

    status = subprocess.run([sys.executable, str(SERVER), "--config", str(door.config),
                             "status"], env=door.env, capture_output=True, text=True)
    assert "%d openings of 2 uses this period" % (replays_opened + 2) in status.stdout \
        + status.stderr, status.stdout + status.stderr


def test_a_burn_of_a_use_burnt_already_changes_nothing(door):
    """The burn that a late replay starts (its use's record gone, or a door
    without the gate) neither writes nor reloads."""
    start = generator.period_start(time.time(), door.period)
    door.knock("127.0.0.2", 0)
    wait_until(lambda: not door.burns_running(), 30, "the burn to end")
    files = door.config.read_bytes(), (door.tmp / "state" / "uses").read_bytes()
    reloads = door.reloads()
    burnt = subprocess.run([sys.executable, str(SERVER), "--config", str(door.config), "burn",
                            "ssh_ROTATOR", "--use", "%d:0" % start], env=door.env,
                           capture_output=True, text=True, timeout=60)
    assert burnt.returncode == 0, burnt.stderr
    assert "use %d:0 is burnt already" % start in burnt.stderr
    assert (door.config.read_bytes(), (door.tmp / "state" / "uses").read_bytes()) == files
    assert b"burn ssh_ROTATOR --use %d:1 >>" % start in files[0]
    # A knock with the next sequence opens after a reload: knockd had heard
    # everything before it, no reload among it.
    door.knock("127.0.0.3", 1)
    assert door.reloads() == reloads + 1
    assert door.counts() == {str(start): 2}


def test_a_burn_that_names_no_use_counts_each_opening_until_the_rotation_names_it(
        tmp_path, server_env):
    """A start_command written before burns named their use: each opening
    burns one more use, as it did; the burn's own rotation writes the use in."""
    config = tmp_path / "knockd.conf"
    config.write_text("[ssh_ROTATOR]\n\tsequence = 1\n\tstart_command = %s burn ssh_ROTATOR "
                      "& true\n" % SERVER)
    env = server_env(SECRET=SECRET, SINGLE_USE=1)
    start = generator.period_start(time.time(), 31622400)
    for _ in range(2):
        burnt = run_server("--config", config, "burn", "ssh_ROTATOR", env=env)
        assert burnt.returncode == 0, burnt.stderr
    assert core_uses.read_uses(str(tmp_path / "state"))["ssh_ROTATOR"]["counts"] == {str(start): 2}
    assert "burn ssh_ROTATOR --use %d:2 & true\n" % start in config.read_text()


def test_the_rotation_gates_a_burn_that_add_client_wrote_ungated(tmp_path, server_env):
    """A door from an add-client before the gate: each opening would start a
    burn process.  The rotation puts the gate in front of the burn, and only
    there: a hand-written command line is left as it is."""
    config = tmp_path / "knockd.conf"
    old_burn = "KNOCKD_ROTATOR_ENV_FILE='%s' %s --config %s burn alice_ssh_ROTATOR & " % (
        tmp_path / "rotator env", SERVER, config)
    config.write_text("[alice_ssh_ROTATOR]\n\tsequence = 1\n\tstart_command = %strue\n"
                      "\tstart_command_6 = %strue\n[bob_ROTATOR]\n\tsequence = 1\n"
                      "\tstart_command = true; %s burn bob_ROTATOR & true\n"
                      % (old_burn, old_burn, SERVER))
    config.chmod(0o600)
    rotated = run_server("--config", config, env=server_env(SECRET=SECRET, SINGLE_USE=1))
    assert rotated.returncode == 0, rotated.stderr
    start = generator.period_start(time.time(), 31622400)
    record = tmp_path / "state" / "burning" / ("alice_ssh_ROTATOR.%d.0" % start)
    gated = ("{ echo 2>/dev/null >>%s; mkdir %s.burn 2>/dev/null || [ ! -d %s ]; } && %s"
             % (record, record, record.parent,
                old_burn.replace(" & ", " --use %d:0 & " % start)))
    text = config.read_text()
    assert text.count("start_command = %strue\n" % gated) == 1, text
    assert text.count("_command_6 = %strue\n" % gated) == 1, text
    assert "\tstart_command = true; %s burn bob_ROTATOR --use %d:0 & true\n" % (SERVER, start) \
        in text
    assert record.parent.is_dir()


def test_a_burn_moves_the_counter_past_the_use_it_names_and_only_then():
    """Pure: with_burn with the use an opening matched."""
    settings_of = core_settings.settings_reader({"KNOCKD_ROTATOR_SECRET": SECRET,
                                          "KNOCKD_ROTATOR_SINGLE_USE": "1",
                                          "KNOCKD_ROTATOR_PERIOD_MODULO": "3600"})
    start = 1800000000 // 3600 * 3600
    now = start + 60
    uses = core_uses.with_burn({}, "ssh_ROTATOR", now, settings_of, (start, 0))
    assert uses["ssh_ROTATOR"]["counts"] == {str(start): 1}
    for burnt in [(start, 0), (start - 7200, 5), (start + 3600, 0)]:
        assert core_uses.with_burn(uses, "ssh_ROTATOR", now, settings_of, burnt) is uses, burnt
    # The door held use 3 (the counters were lost, say): its burn moves past it.
    uses = core_uses.with_burn(uses, "ssh_ROTATOR", now, settings_of, (start, 3))
    assert uses["ssh_ROTATOR"]["counts"] == {str(start): 4}
    uses = core_uses.with_burn(uses, "ssh_ROTATOR_GRACE", now, settings_of, (start - 3600, 0))
    assert uses["ssh_ROTATOR"]["counts"] == {str(start): 4, str(start - 3600): 1}


def test_a_burn_that_fails_lets_the_next_opening_of_its_use_burn(tmp_path, server_env):
    """The gate lets one opening of a use through; if its burn fails, the
    next opening must try again, or the use would stay open all period."""
    config = tmp_path / "knockd.conf"
    config.write_text("[ssh_ROTATOR]\n\tsequence = 1\n\tstart_command = %s burn ssh_ROTATOR "
                      "& true\n" % SERVER)
    start = generator.period_start(time.time(), 31622400)
    gate = tmp_path / "state" / "burning" / ("ssh_ROTATOR.%d.0.burn" % start)
    gate.mkdir(parents=True)
    # The door is not single-use: the burn fails.
    failed = run_server("--config", config, "burn", "ssh_ROTATOR", "--use", "%d:0" % start,
                        env=server_env(SECRET=SECRET))
    assert failed.returncode != 0 and "is not single-use" in failed.stderr
    assert not gate.exists()
