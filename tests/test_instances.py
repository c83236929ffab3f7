"""Several knockd (issue 16): add-client fills knockd.conf up to
KNOCKD_ROTATOR_DOORS_PER_KNOCKD doors, then files of their own in
knockd_rotator.d/, each read by a knockd of its own.

The tests with knockd run one knockd per file in a network namespace; the
instance commands point at their pid files, as the template unit's do at
systemd's.  All knockd share one log (an instance's [options] is
knockd.conf's): its re-read lines name the file."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from knockd_rotator import scheduling
from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.engines.knockd import config as knockd_config
from knockd_rotator.engines.knockd import grace as knockd_grace
from knockd_rotator.engines.knockd import instances as knockd_instances
from knockd_rotator.engines.knockd import processes
from conftest import (GUARDED_PORT, SECRET, SEND_SYNS, SERVER, Watch, alive_command,
                      daemon_start_command, need_root_and, rotator_env, run_client, run_server,
                      wait_until)


def test_an_instance_file_gets_the_instance_s_commands_and_state():
    settings = core_settings.server_settings({"KNOCKD_ROTATOR_STATE_DIR": "/s",
                                       "KNOCKD_ROTATOR_ENV_FILE": "/nonexistent"})
    assert knockd_instances.settings_for("/etc/knockd.conf", settings) is settings
    assert knockd_instances.settings_for("/etc/knockd_rotator.d/notes.conf", settings) is settings
    seven = knockd_instances.settings_for("/etc/knockd_rotator.d/7.conf", settings)
    assert (seven["INSTANCE"], seven["UNIT"], seven["STATE_DIR"]) == (
        "7", "knockd_rotator-knockd@7", "/s/knockd@7")
    assert seven["RELOAD_COMMAND"] == "systemctl reload knockd_rotator-knockd@7"
    assert seven["RECOVER_COMMAND"] == ("systemctl enable --quiet knockd_rotator-knockd@7 && "
                                        "systemctl reload-or-restart knockd_rotator-knockd@7")


def test_instance_files_in_number_order_and_options_without_pid_file_or_mark(tmp_path):
    config = tmp_path / "knockd.conf"
    # The client's mark is in [options] for knockd: it belongs to the door below.
    config.write_bytes(b"[options]\n\tUseSyslog\n\tPidFile = /run/knockd.pid\n\tinterface = eth0"
                       b"\n\n# knockd_rotator client alice: added\n[alice_ssh_ROTATOR]\n"
                       b"\tcommand = true\n")
    folder = tmp_path / "knockd_rotator.d"
    folder.mkdir()
    for name in ("10.conf", "9.conf", "2.conf", "0.conf", "x.conf", "3.conf.bak"):
        (folder / name).write_bytes(b"")
    assert knockd_instances.knockd_files(config) == [str(config)] + [
        str(folder / name) for name in ("2.conf", "9.conf", "10.conf")]
    assert knockd_instances.instance_options(knockd_config.parse_config(config.read_bytes())) == \
        b"[options]\n\tUseSyslog\n\tinterface = eth0\n"


def test_a_bad_instance_command_is_refused_before_anything_runs(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tcommand = true\n")
    result = run_server("--config", config, env=server_env(
        INSTANCE_RELOAD_COMMAND="systemctl reload knockd_rotator-knockd@1"))
    assert result.returncode == 3
    assert result.stderr.startswith("error: KNOCKD_ROTATOR_INSTANCE_RELOAD_COMMAND has no %i")
    assert config.read_bytes() == b"[ssh_ROTATOR]\n\tcommand = true\n"


class Cluster:
    """knockd.conf with one door, and the environment of a server whose
    knockd (main and instances) run in NETNS, DOORS doors per knockd."""

    def __init__(self, netns, tmp_path, doors=2, **settings):
        self.netns, self.tmp = netns, tmp_path
        self.config = tmp_path / "knockd.conf"
        self.folder = tmp_path / "knockd_rotator.d"
        self.log = tmp_path / "knockd.log"
        self.env_file = tmp_path / "rotator.env"
        self.config.write_text("[options]\n\tlogfile = %s\n\n[ssh_ROTATOR]\n\tcommand = true\n"
                               % self.log)
        self.log.write_text("")
        main_pid = tmp_path / "knockd.pid"
        instance_pid = "%s/knockd-%%i.pid" % tmp_path
        values = dict(SECRET=SECRET, STATE_DIR=tmp_path / "state", CHECK_SECONDS=1,
                      PERIOD_MODULO=31622400, DOORS_PER_KNOCKD=doors,
                      RELOAD_COMMAND="kill -HUP $(cat %s)" % main_pid,
                      CHECK_COMMAND=alive_command("$(cat %s)" % main_pid),
                      RECOVER_COMMAND=daemon_start_command(netns.name, self.config, main_pid),
                      KILL_COMMAND="kill -KILL $(cat %s)" % main_pid,
                      INSTANCE_RELOAD_COMMAND="kill -HUP $(cat %s)" % instance_pid,
                      INSTANCE_CHECK_COMMAND=alive_command("$(cat %s)" % instance_pid),
                      INSTANCE_RECOVER_COMMAND=daemon_start_command(
                          netns.name, "%s/%%i.conf" % self.folder, instance_pid),
                      INSTANCE_KILL_COMMAND="kill -KILL $(cat %s)" % instance_pid)
        values.update(settings)
        self.env_file.write_text("".join("KNOCKD_ROTATOR_%s=%s\n" % item
                                         for item in values.items()))
        self.env_file.chmod(0o600)
        self.env = rotator_env(SECRET=None, ENV_FILE=self.env_file)

    def run(self, *args, **kwargs):
        return run_server("--config", self.config, *args, env=self.env, **kwargs)

    def instance(self, number):
        return self.folder / ("%d.conf" % number)

    def pid(self, number=None):
        """knockd.conf's knockd, or instance NUMBER's."""
        name = "knockd.pid" if number is None else "knockd-%d.pid" % number
        return int((self.tmp / name).read_text())

    def pids(self):
        """The pid of each knockd that has written its pid file."""
        return [int(path.read_text()) for path in sorted(self.tmp.glob("knockd*.pid"))
                if path.read_text().strip()]

    def stop(self):
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def log_text(self):
        return self.log.read_text(errors="replace")

    def rereads(self, path):
        return self.log_text().count("re-reading config file: %s\n" % path)

    def all_rereads(self):
        return [self.rereads(path) for path in knockd_instances.knockd_files(self.config)]

    def opened(self, door, source=""):
        return len(re.findall(r"%s: %s(?:_GRACE)?: OPEN SESAME"
                              % (re.escape(source) or ".*", door),
                              self.log_text()))

    def sequence(self, door):
        """The ports of DOOR's current sequence, as its file holds them."""
        for path in knockd_instances.knockd_files(self.config):
            held = knockd_config.door_sequences(knockd_config.parse_config(open(path, "rb").read()))
            if door in held:
                return [int(item.split(b":")[0]) for item in held[door].split(b",")]
        raise AssertionError("no door %s" % door)

    def send(self, source, ports):
        self.netns.run(sys.executable, "-c", SEND_SYNS, source, *ports)


@pytest.fixture
def cluster(guarded, tmp_path):
    need_root_and("knockd", "iptables")
    made = Cluster(guarded, tmp_path)
    first = made.run()
    assert first.returncode == 0, first.stderr
    wait_until(lambda: "listening on lo" in made.log_text(), 10, "knockd to listen")
    yield made
    made.stop()


def client_lines(output):
    return dict(line.split("=", 1) for line in output.splitlines()
                if re.match(r"KNOCKD_ROTATOR_[A-Z0-9_]+=", line))


def enrol(cluster, name, *options):
    added = cluster.run("add-client", name, "--firewall", "iptables", "--port", GUARDED_PORT,
                        *options)
    assert added.returncode == 0, added.stderr
    return dict(rotator_env(SECRET=None), **client_lines(added.stdout))


def test_clients_fill_further_knockd_each_reloaded_alone(cluster):
    alice, bob, carol, dave = (enrol(cluster, name) for name in ("alice", "bob", "carol", "dave"))
    # knockd.conf had one door: alice fills it; bob starts knockd 1, carol
    # joins him there, dave starts knockd 2.
    placed = {name: [path for path in knockd_instances.knockd_files(cluster.config)
                     if b"[%s_ssh_ROTATOR]" % name.encode() in open(path, "rb").read()]
              for name in ("alice", "bob", "carol", "dave")}
    assert placed == {"alice": [str(cluster.config)], "bob": [str(cluster.instance(1))],
                      "carol": [str(cluster.instance(1))], "dave": [str(cluster.instance(2))]}
    assert len(cluster.pids()) == 3 and all(os.path.exists("/proc/%d" % pid)
                                            for pid in cluster.pids())
    assert oct(cluster.instance(1).stat().st_mode & 0o777) == "0o600"
    assert oct(cluster.folder.stat().st_mode & 0o777) == "0o700"
    listed = cluster.run("list-clients").stdout
    assert re.search(r"\ncarol +carol_ssh_ROTATOR .* knockd_rotator-knockd@1\n", listed)
    assert re.search(r"\nalice +alice_ssh_ROTATOR .* knockd\n", listed)

    report = json.loads(cluster.run("status", "--json").stdout)
    assert report["state"] == "OK", report["reasons"]
    counts = [(each["knockd"], each["door_count"], each["doors_in_grace"])
              for each in [report["report"]] + report["report"]["instances"]]
    assert counts == [("knockd", 2, 4), ("knockd_rotator-knockd@1", 2, 4),
                      ("knockd_rotator-knockd@2", 1, 2)]
    checked = cluster.run("check")
    assert checked.returncode == 0, checked.stderr
    assert "%s: knockd_rotator-knockd@2 compiles 1 doors, 2 during a grace window " \
           "(add-client gives it 2 at most" % cluster.instance(2) in checked.stdout

    # Bob's door is single-use: the burn reloads his knockd, and no other.
    before = cluster.all_rereads()
    knocked = run_client("knock", "127.0.0.1", "bob_ssh", "--check", GUARDED_PORT,
                         "--check-timeout", "2", env=bob, netns=cluster.netns.name)
    assert knocked.returncode == 0, knocked.stderr
    wait_until(lambda: cluster.all_rereads() != before, 10, "the burn's reload")
    assert cluster.all_rereads() == [before[0], before[1] + 1, before[2]]
    before = cluster.all_rereads()
    for name, env in (("alice", alice), ("carol", carol), ("dave", dave)):
        knocked = run_client("knock", "127.0.0.1", name + "_ssh", env=env,
                             netns=cluster.netns.name)
        assert knocked.returncode == 0, knocked.stderr
        wait_until(lambda: cluster.opened(name + "_ssh_ROTATOR") == 1, 10, name + "'s door")
    wait_until(lambda: cluster.all_rereads() == [count + 1 for count in before], 10,
               "one burn's reload per knockd")

    # remove-client finds carol in knockd 1's file and reloads that one only.
    before = cluster.all_rereads()
    removed = cluster.run("remove-client", "carol")
    assert removed.returncode == 0, removed.stderr
    assert b"carol" not in cluster.instance(1).read_bytes()
    assert cluster.all_rereads() == [before[0], before[1] + 1, before[2]]
    # The next client takes carol's place: the knockd with the fewest doors.
    enrol(cluster, "erin")
    assert b"[erin_ssh_ROTATOR]" in cluster.instance(1).read_bytes()


def test_a_knock_in_progress_survives_another_knockd_s_reload(cluster):
    """knockd drops the attempts in progress when it reloads: a reload of its
    own knockd cuts bob's knock in two, one of another knockd does not."""
    for name in ("alice", "bob"):
        enrol(cluster, name, "--no-single-use")     # an opening reloads nothing
    ports = cluster.sequence("bob_ssh_ROTATOR")
    half = len(ports) // 2
    rounds = (("127.0.0.7", cluster.config, cluster.pid(), "127.0.0.17"),
              ("127.0.0.8", cluster.instance(1), cluster.pid(1), "127.0.0.18"))
    for source, reloaded, pid, sentinel in rounds:
        cluster.send(source, ports[:half])
        wait_until(lambda: "%s: bob_ssh_ROTATOR: Stage %d\n" % (source, half)
                   in cluster.log_text(), 10, "the first half of the knock")
        rereads = cluster.rereads(reloaded)
        os.kill(pid, 1)
        wait_until(lambda: cluster.rereads(reloaded) > rereads, 10,
                   "the reload of %s" % reloaded)
        # knockd reads packets in order: once it logs the sentinel's first
        # stage, it has heard the second half.
        cluster.send(source, ports[half:])
        cluster.send(sentinel, ports[:1])
        wait_until(lambda: "%s: bob_ssh_ROTATOR: Stage 1\n" % sentinel in cluster.log_text(),
                   10, "knockd to hear the second half")
    assert cluster.opened("bob_ssh_ROTATOR", "127.0.0.7") == 1, \
        "the reload of knockd.conf's knockd cut bob's knock on knockd 1"
    assert cluster.opened("bob_ssh_ROTATOR", "127.0.0.8") == 0, \
        "a reload of bob's own knockd drops his knock in progress (the control)"


def test_one_knockd_refusing_its_file_leaves_the_others_rotating(cluster):
    for name in ("alice", "bob"):
        enrol(cluster, name)
    # A door added by hand to knockd.conf (no sequence yet), and a key knockd
    # refuses in knockd 1's file.
    with open(cluster.config, "a") as handle:
        handle.write("[web_ROTATOR]\n\tcommand = true\n")
    broken = cluster.instance(1).read_bytes().replace(b"    seq_timeout", b"    bogus = 1\n"
                                                      b"    seq_timeout")
    cluster.instance(1).write_bytes(broken)
    rereads = cluster.rereads(cluster.config)
    result = cluster.run()
    assert result.returncode == 4
    assert "%s line" % cluster.instance(1) in result.stderr and "bogus" in result.stderr
    assert cluster.instance(1).read_bytes() == broken
    assert "web_ROTATOR" in knockd_config.door_sequences(knockd_config.parse_config(
        cluster.config.read_bytes())), "knockd.conf's new door rotated all the same"
    assert cluster.rereads(cluster.config) == rereads + 1
    assert all(os.path.exists("/proc/%d" % pid) for pid in cluster.pids())


def test_the_watch_rotates_every_knockd_at_each_event(guarded, tmp_path):
    """A 10 s period with a 3 s grace and a 2 s lead: 2 s before the boundary
    both files get the new sequences and a grace block, and lose the block at
    the grace end; each knockd reloads at both events, and every door opens
    in its period."""
    need_root_and("knockd", "iptables")
    cluster = Cluster(guarded, tmp_path, PERIOD_MODULO=10, GRACE=3, LEAD=2)
    watch = None
    try:
        assert cluster.run().returncode == 0
        wait_until(lambda: "listening on lo" in cluster.log_text(), 10, "knockd to listen")
        clients = {name: enrol(cluster, name, "--no-single-use") for name in ("alice", "bob")}
        files = knockd_instances.knockd_files(cluster.config)
        assert len(files) == 2
        # Start after a grace end and well before the boundary, with the
        # files current: the watch's first rotation changes nothing.
        start = generator.period_start(time.time(), 10)
        scheduling.sleep_until(start + 3.5 if time.time() < start + 6 else start + 13.5)
        assert cluster.run().returncode == 0
        before = cluster.all_rereads()
        watch = Watch(cluster.config, cluster.env, tmp_path)
        boundary = generator.period_start(time.time(), 10) + 10
        wait_until(lambda: cluster.all_rereads() == [count + 2 for count in before], 20,
                   "the reloads of the boundary and the grace end:\n" + watch.text())
        assert time.time() >= boundary + 3
        for path in files:
            data = open(path, "rb").read()
            assert knockd_grace.GRACE_BEGIN not in data, "the grace block is gone"
        for name, env in clients.items():
            knocked = run_client("knock", "127.0.0.1", name + "_ssh", "--check", GUARDED_PORT,
                                 "--check-timeout", "2", env=env, netns=cluster.netns.name)
            assert knocked.returncode == 0, knocked.stderr
        assert watch.stop() == 0, watch.text()
        assert "error" not in watch.text(), watch.text()
    finally:
        if watch:
            watch.stop()
        cluster.stop()


def test_a_new_knockd_that_does_not_start_leaves_nothing_behind(guarded, tmp_path):
    need_root_and("knockd", "iptables")
    cluster = Cluster(guarded, tmp_path, doors=1, INSTANCE_RECOVER_COMMAND="false %i")
    try:
        assert cluster.run().returncode == 0
        env_before = cluster.env_file.read_bytes()
        added = cluster.run("add-client", "alice", "--firewall", "iptables")
        assert added.returncode == 7, added.stderr
        assert "knockd_rotator-knockd@1" in added.stderr
        assert not cluster.instance(1).exists()
        assert cluster.env_file.read_bytes() == env_before
        assert b"alice" not in cluster.config.read_bytes()
    finally:
        cluster.stop()


def test_a_new_knockd_counts_as_started_once_it_listens(guarded, tmp_path):
    """A client that starts a new knockd: add-client returns once that
    knockd has its capture open and its filter compiled, and lived 0.2 s on,
    not after the whole CHECK_SECONDS (here 10 s)."""
    need_root_and("knockd", "iptables")
    cluster = Cluster(guarded, tmp_path, doors=1, CHECK_SECONDS=10)
    try:
        assert cluster.run().returncode == 0
        wait_until(lambda: "listening on lo" in cluster.log_text(), 10, "knockd to listen")
        started = time.monotonic()
        bob = enrol(cluster, "bob", "--no-single-use")
        took = time.monotonic() - started
        assert took < 5, "add-client took %.1f s: it waited for the whole check" % took
        assert processes.knockd_listening(cluster.instance(1)) == (True, "")
        knocked = run_client("knock", "127.0.0.1", "bob_ssh", "--check", GUARDED_PORT,
                             "--check-timeout", "2", env=bob, netns=cluster.netns.name)
        assert knocked.returncode == 0, knocked.stderr
        print("add-client with a new knockd: %.2f s (CHECK_SECONDS 10)" % took)
    finally:
        cluster.stop()


@pytest.mark.parametrize("reads", [False, True], ids=["silent", "reads its file"])
def test_a_new_knockd_that_never_listens_is_checked_to_the_end(guarded, tmp_path, reads):
    """The control: a "knockd" that runs for 3 s and never listens, whether
    or not it reads its file, gives no evidence, so the check goes on until
    it fails (exit 7), and the enrolment leaves nothing behind."""
    need_root_and("knockd", "iptables")
    pidfile = "%s/knockd-%%i.pid" % tmp_path
    reading = "cat %s/knockd_rotator.d/%%i.conf >/dev/null; " % tmp_path if reads else ""
    cluster = Cluster(guarded, tmp_path, doors=1, CHECK_SECONDS=10,
                      INSTANCE_RECOVER_COMMAND="%ssleep 3 >/dev/null 2>&1 & echo $! > %s"
                      % (reading, pidfile))
    try:
        assert cluster.run().returncode == 0
        env_before = cluster.env_file.read_bytes()
        started = time.monotonic()
        added = cluster.run("add-client", "carol", "--firewall", "iptables")
        assert added.returncode == 7, added.stderr
        assert time.monotonic() - started > 3, "it took the live process for a started knockd"
        assert not cluster.instance(1).exists()
        assert cluster.env_file.read_bytes() == env_before
    finally:
        cluster.stop()


def test_concurrent_enrolments_each_get_a_place(cluster):
    """Four add-clients at once: the clients lock keeps their places and the
    environment file's lines apart."""
    runs = [subprocess.Popen([sys.executable, str(SERVER), "--config", str(cluster.config),
                              "add-client", name, "--firewall", "iptables"],
                             env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for name in ("p", "q", "r", "s")]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    env = cluster.env_file.read_text()
    for name in "PQRS":
        assert "KNOCKD_ROTATOR_SECRET_%s_SSH=" % name in env
    counts = [knockd_instances.door_load(knockd_config.parse_config(open(path, "rb").read()))[0]
              for path in knockd_instances.knockd_files(cluster.config)]
    assert counts == [2, 2, 1]
