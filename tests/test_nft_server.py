"""The server under KNOCKD_ROTATOR_ENGINE=nftables (issue 25), as an admin
runs it: the doors file, the environment file, the commands; real `nft` and
the real client in a network namespace of the test's own, loopback only.

Each check that a door is open or shut connects from a source address of
its own, so that one check's opening cannot make another pass."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import CLIENT, need_root_and, rotator_env, run_server, wait_until

GUARDED = 2222
SOURCES = iter("127.%d.%d.%d" % (a, b, c) for a in range(20, 250)
               for b in range(1, 250) for c in range(1, 250))

# Knock with the real client from SOURCE (its sockets bound there), then
# connect from SOURCE to the guarded port: prints open or shut.
#   python3 -c KNOCK_FROM SOURCE CLIENT ARGS...
KNOCK_FROM = r"""
import _socket, runpy, socket, sys, types
source = sys.argv[1]
real_socket = socket.socket
def bound(base):
    class Bound(base):
        def __init__(self, family=socket.AF_INET, *args, **kwargs):
            super().__init__(family, *args, **kwargs)
            if family == socket.AF_INET:
                self.bind((source, 0))
    return Bound
# The client sends its knocks through _socket (imported in its functions),
# and checks through socket.
fast = types.ModuleType("_socket")
fast.__dict__.update(_socket.__dict__)
fast.socket = bound(_socket.socket)
sys.modules["_socket"] = fast
socket.socket = bound(socket.socket)
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
s = real_socket()
s.bind((source, 0))
s.settimeout(0.3)
print("open" if s.connect_ex(("127.0.0.1", %d)) == 0 else "shut", code)
""" % GUARDED


class Door:
    """The server's files for the nftables engine, in TMP_PATH, and NETNS."""

    def __init__(self, netns, tmp_path, doors="ssh_ROTATOR guard=%d\n" % GUARDED, **env):
        need_root_and("nft", "ip")
        self.ns, self.tmp = netns, tmp_path
        self.doors = tmp_path / "knockd_rotator.doors"
        self.doors.write_text(doors)
        self.env_file = tmp_path / "knockd_rotator.env"
        settings = {"ENGINE": "nftables", "SECRET": "test-secret-for-the-nft-engine-0123456789"}
        settings.update(env)
        self.env_file.write_text("".join("KNOCKD_ROTATOR_%s=%s\n" % item
                                         for item in settings.items()))
        os.chmod(self.env_file, 0o600)
        self.env = rotator_env(SECRET=None, ENV_FILE=self.env_file,
                               STATE_DIR=tmp_path / "state", SERVER_INTERVAL=60)
        self.listener = netns.listen(GUARDED)

    def server(self, *args, stdin=None, env=None):
        return run_server("--config", self.doors, *args, env=env or self.env,
                          netns=self.ns.name, input=stdin)

    def client_env(self, lines=None):
        """The client's environment: the env file's settings, or LINES (KEY=VALUE)."""
        text = lines if lines is not None else self.env_file.read_text()
        pairs = dict(line.split("=", 1) for line in text.splitlines()
                     if line.startswith("KNOCKD_ROTATOR_") and "=" in line)
        pairs.pop("KNOCKD_ROTATOR_ENGINE", None)
        return dict(rotator_env(SECRET=None, ENV_FILE=self.tmp / "absent"), **pairs)

    def knock(self, service="ssh", env=None, source=None, check=True):
        """(open or shut, the client's exit code) of a knock from SOURCE."""
        args = ["knock", "127.0.0.1", service] + (["--check", str(GUARDED)] if check else [])
        out = self.ns.run(sys.executable, "-c", KNOCK_FROM, source or next(SOURCES),
                          CLIENT, *args, env=env or self.client_env(), check=False)
        state, code = out.stdout.split()[-2:]
        return state, int(code)

    def knock_with_input(self, service, env, *options, text):
        """open or shut, after a knock that reads TEXT (a PIN, a code) from stdin."""
        source = next(SOURCES)
        out = self.ns.run(sys.executable, "-c", KNOCK_FROM, source, CLIENT, "knock",
                          "127.0.0.1", service, *options, env=env, check=False, input=text)
        return out.stdout.split()[-2]

    def knock_nothing(self):
        out = self.ns.run(sys.executable, "-c", "import socket,sys\ns=socket.socket()\n"
                          "s.bind((sys.argv[1], 0))\ns.settimeout(0.3)\n"
                          "print('open' if s.connect_ex(('127.0.0.1', %d)) == 0 else 'shut')"
                          % GUARDED, next(SOURCES))
        return out.stdout.strip()

    def table(self):
        out = self.ns.run("nft", "-j", "list", "table", "inet", "knockd_rotator", check=False)
        return out.returncode == 0

    def stop(self):
        self.listener.kill()
        self.listener.wait()


@pytest.fixture
def door(netns, tmp_path):
    made = []

    def make(**kwargs):
        made.append(Door(netns, tmp_path, **kwargs))
        return made[-1]
    yield make
    for each in made:
        each.stop()


def test_a_run_loads_the_table_and_the_client_opens(door):
    d = door()
    assert d.knock_nothing() == "shut" or not d.table()
    out = d.server()
    assert out.returncode == 0, out.stderr
    assert "loaded the table inet knockd_rotator: 1 doors" in out.stderr
    assert d.knock_nothing() == "shut"
    assert d.knock() == ("open", 0)
    # A second run finds it all as loaded: nothing to do, nothing said.
    again = d.server()
    assert again.returncode == 0 and "loaded" not in again.stderr, again.stderr
    assert d.knock() == ("open", 0)
    status = d.server("status", "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0, status.stdout
    assert report["state"] == "OK" and report["report"]["table_present"]
    assert report["report"]["doors"][0]["holds_now"]
    # Two knocks, two openings counted by the kernel, read without the secret.
    assert report["report"]["doors"][0]["opens"] == 2
    text = d.server("status", env=dict(d.env, KNOCKD_ROTATOR_ENV_FILE=str(d.tmp / "absent"),
                                       KNOCKD_ROTATOR_ENGINE="nftables"))
    assert text.returncode == 0 and "opened 2 times" in text.stdout, text.stdout


def test_a_wrong_secret_opens_nothing(door):
    d = door()
    assert d.server().returncode == 0
    env = dict(d.client_env(), KNOCKD_ROTATOR_SECRET="another-secret-0123456789abcdefghij")
    assert d.knock(env=env)[0] == "shut"


def test_the_kernel_switches_periods_with_the_server_stopped(door):
    """Period 10 s: the run loads the periods ahead; two boundaries later,
    with no server run in between, the client's sequence of the moment opens."""
    d = door(PERIOD_MODULO=10, GRACE=2)
    assert d.server().returncode == 0
    start = time.time()
    boundary = (int(start) // 10 + 2) * 10
    wait_until(lambda: time.time() > boundary + 3, 30, "two boundaries")
    assert d.knock() == ("open", 0)
    record = json.loads((d.tmp / "state" / "nftables.json").read_text())
    held = max(w[3] for w in record["doors"]["ssh_ROTATOR"]["windows"])
    # SERVER_INTERVAL 60: two runs of the timer ahead, at 10 s periods.
    assert held >= start + 120


def test_add_client_list_and_remove(door):
    d = door()
    assert d.server().returncode == 0
    before_doors, before_env = d.doors.read_bytes(), d.env_file.read_bytes()
    out = d.server("add-client", "alice", "--port", str(GUARDED), "--no-single-use",
                   "--host", "127.0.0.1")
    assert out.returncode == 0, out.stderr
    assert "iptables" not in out.stdout and "nft add" not in out.stdout
    assert d.doors.read_text().endswith("alice_ssh_ROTATOR guard=%d client=alice\n" % GUARDED)
    lines = re.findall(r"^KNOCKD_ROTATOR_\w+=\S+$", out.stdout, re.M)
    client = d.client_env("\n".join(lines))
    assert d.knock("alice_ssh", env=client) == ("open", 0)
    listed = d.server("list-clients")
    assert listed.returncode == 0
    assert re.search(r"^alice +alice_ssh_ROTATOR +secret +no +own .* tcp %d$" % GUARDED,
                     listed.stdout, re.M), listed.stdout
    assert "KNOCKD_ROTATOR_SECRET" not in listed.stdout
    again = d.server("add-client", "alice", "--port", str(GUARDED))
    assert again.returncode == 2 and "enrolled already" in again.stderr
    removed = d.server("remove-client", "alice")
    assert removed.returncode == 0, removed.stderr
    assert d.doors.read_bytes() == before_doors and d.env_file.read_bytes() == before_env
    assert d.knock("alice_ssh", env=client)[0] == "shut"
    assert d.knock() == ("open", 0)


def test_a_load_that_fails_changes_no_file(door, tmp_path):
    """add-client whose load nft refuses: exit 1, the files as they were."""
    d = door()
    assert d.server().returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nft").write_text("#!/bin/sh\n[ \"$1\" = -j ] && exec /usr/sbin/nft \"$@\"\n"
                              "echo 'Error: refused by the test' >&2; exit 1\n")
    os.chmod(fake / "nft", 0o755)
    before_doors, before_env = d.doors.read_bytes(), d.env_file.read_bytes()
    d.env["PATH"] = "%s:%s" % (fake, d.env["PATH"])
    out = d.server("add-client", "bob", "--port", str(GUARDED))
    assert out.returncode == 1, out.stderr
    assert "error: the kernel refused the table: nft -f" in out.stderr
    assert "Traceback" not in out.stderr
    assert d.doors.read_bytes() == before_doors and d.env_file.read_bytes() == before_env
    assert d.knock() == ("open", 0)


def test_single_use_burns_in_the_kernel_and_the_server_follows(door):
    d = door(SINGLE_USE=1)
    assert d.server().returncode == 0
    assert d.knock() == ("open", 0)
    # Use 0 again (a client that remembers no use), from another address:
    # the kernel burned it as the first knock completed.
    replay = dict(d.client_env(), KNOCKD_ROTATOR_USES_FILE=str(d.tmp / "replay-uses.json"))
    assert d.knock(env=replay, check=False) == ("shut", 0)
    out = d.server()
    assert out.returncode == 0 and "loaded the table" in out.stderr, out.stderr
    counts = json.loads((d.tmp / "state" / "uses").read_text())["ssh_ROTATOR"]["counts"]
    assert list(counts.values()) == [1]
    # The client's next uses open, with no server run in between.
    for _ in range(3):
        assert d.knock() == ("open", 0)


def test_the_watch_puts_a_removed_table_back(door):
    d = door()
    watch = d.ns.popen(sys.executable, str(CLIENT.parent / "knockd_rotator_server.py"),
                       "--config", d.doors, "--watch", env=d.env)
    try:
        wait_until(d.table, 20, "the watch's first load")
        d.ns.run("nft", "delete", "table", "inet", "knockd_rotator")
        wait_until(d.table, 10, "the table back")
        assert d.knock() == ("open", 0)
    finally:
        watch.terminate()
        watch.wait(20)


def test_the_watch_tops_up_a_new_door(door):
    """The watch loads once, then tops up: a door added to the doors file,
    with a period of its own (so new cohorts too), gets its windows over
    netlink and what leads to them with nft, with no fall back to a full
    load; both doors open."""
    d = door(PERIOD_MODULO=10, GRACE=2)
    log = d.tmp / "watch.log"
    with open(log, "wb") as output:
        watch = d.ns.popen(sys.executable, str(CLIENT.parent / "knockd_rotator_server.py"),
                           "--config", d.doors, "--watch", stderr=output, env=d.env)
    try:
        wait_until(lambda: "loaded the table" in log.read_text(), 20, "the watch's first load")
        with open(d.env_file, "a") as env_file:
            env_file.write("KNOCKD_ROTATOR_PERIOD_MODULO_WEB=20\n")
        with open(d.doors, "a") as doors:
            doors.write("web_ROTATOR guard=%d\n" % GUARDED)
        wait_until(lambda: "2 doors" in log.read_text(), 20, "the top-up for the new door")
        assert d.knock("web") == ("open", 0) and d.knock() == ("open", 0)
    finally:
        watch.terminate()
        watch.wait(20)
    assert "refused" not in log.read_text() and "Traceback" not in log.read_text(), \
        log.read_text()


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def test_the_watch_follows_a_clock_set_right(door):
    """A clock a day ahead (a wrong clock at boot) set right while the watch
    runs: the watch plans again for the time now at once, not when the wall
    clock has caught up with its next event a day later, and the client
    (with the right time) opens.  libfaketime moves the watch's wall clock
    only, as an NTP step would; the kernel's `meta time` is the real one."""
    need_root_and("faketime")
    assert os.path.exists(LIBFAKETIME), LIBFAKETIME
    d = door()
    clock, log = d.tmp / "faketime", d.tmp / "watch.log"
    clock.write_text("+1d\n")
    env = dict(d.env, LD_PRELOAD=LIBFAKETIME, FAKETIME_TIMESTAMP_FILE=str(clock),
               FAKETIME_NO_CACHE="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
    loads = (lambda: log.read_text().count("loaded the table"))
    with open(log, "wb") as output:
        watch = d.ns.popen(sys.executable, str(CLIENT.parent / "knockd_rotator_server.py"),
                           "--config", d.doors, "--watch", stderr=output, env=env)
    try:
        wait_until(lambda: loads() >= 1, 20, "the watch's first load")
        assert d.knock()[0] == "shut", "the table holds tomorrow's sequences"
        clock.write_text("+0\n")
        wait_until(lambda: loads() >= 2, 10, "the watch to plan again for the time now")
        assert d.knock() == ("open", 0)
    finally:
        watch.terminate()
        watch.wait(20)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_door_numbers():
    """A door keeps its number; a new one takes the lowest that no door of
    the last load held while there is one; damaged numbers are dropped; more
    doors than numbers is an error (exit 4), not a traceback."""
    sys.path.insert(0, str(CLIENT.parent))
    from knockd_rotator.core.generator import RotatorError
    from knockd_rotator.engines.nftables.load import door_numbers
    assert door_numbers({"ssh": 0, "web": 1}, ["web", "mail"]) == {"web": 1, "mail": 2}
    assert door_numbers({"a": 0, "b": [], "c": 16384}, ["c", "d"]) == {"c": 1, "d": 2}
    held = {"d%d" % n: n for n in range(16383)}
    assert door_numbers(held, ["new", "d0"]) == {"d0": 0, "new": 16383}
    assert door_numbers(held, ["new", "other"]) == {"new": 16383, "other": 0}
    with pytest.raises(RotatorError) as raised:
        door_numbers({}, ["d%d" % n for n in range(16385)])
    assert raised.value.code == 4 and "at most 16384" in raised.value.what


def test_a_new_door_counts_its_own_openings(door):
    """A door never inherits a removed door's count: not in the load that
    removes it (the new door takes another number), nor later, when its
    number, whose counter a full load keeps, is free again."""
    d = door()
    assert d.server().returncode == 0
    assert d.knock() == ("open", 0)
    d.doors.write_text("web_ROTATOR guard=%d\n" % GUARDED)
    assert d.server().returncode == 0
    d.doors.write_text("web_ROTATOR guard=%d\nmail_ROTATOR guard=%d\n" % (GUARDED, GUARDED))
    assert d.server().returncode == 0
    numbers = json.loads((d.tmp / "state" / "nftables.json").read_text())["numbers"]
    assert numbers == {"web_ROTATOR": 1, "mail_ROTATOR": 0}
    assert d.knock("mail") == ("open", 0)

    def opens():
        report = json.loads(d.server("status", "--json").stdout)["report"]
        return {entry["door"]: entry["opens"] for entry in report["doors"]}
    assert opens() == {"web_ROTATOR": 0, "mail_ROTATOR": 1}


def test_burn_and_firewall_are_refused(door):
    d = door()
    out = d.server("burn", "ssh_ROTATOR")
    assert out.returncode == 2 and out.stderr.startswith("error: burn is for knockd")
    out = d.server("add-client", "carol", "--firewall", "iptables")
    assert out.returncode == 2 and "leave out --firewall" in out.stderr
    assert "carol" not in d.doors.read_text()


@pytest.mark.parametrize("line, says", [
    ("ssh guard=22", "ends with _ROTATOR"),
    ("ssh_ROTATOR", "guards nothing"),
    ("ssh_ROTATOR guard=0", "from 1 to 65535"),
    ("ssh_ROTATOR guard=22,22", "different ports"),
    ("ssh_ROTATOR guard=22 open=0", "open must be"),
    ("ssh_ROTATOR guard=22 colour=red", "is not KEY=VALUE"),
    ("ssh_ROTATOR guard=22 guard=23", "each once"),
    ("ssh_ROTATOR guard=22 family=ipx", "family is one of"),
    ("ssh_ROTATOR guard=22\nssh_ROTATOR guard=23", "on line 2 already"),
])
def test_a_bad_doors_file_is_refused_with_its_line(door, line, says):
    d = door(doors="# doors\n" + line + "\n")
    for command in ((), ("check",), ("list-clients",)):
        out = d.server(*command)
        assert out.returncode == 4, (command, out.stderr)
        assert out.stderr.startswith("error: %s:" % d.doors) and says in out.stderr
        assert "Traceback" not in out.stderr
    assert not d.table()


def test_check_and_dry_run_load_nothing(door):
    d = door()
    out = d.server("check")
    assert out.returncode == 0 and "nft -c accepts" in out.stdout, out.stderr
    out = d.server("--dry-run")
    assert out.returncode == 0 and out.stdout.startswith("ssh_ROTATOR: guards tcp %d"
                                                         % GUARDED)
    assert not re.search(r"\d+:(tcp|udp)", out.stdout)
    assert not d.table()


def test_status_without_a_table_is_critical(door):
    d = door()
    out = d.server("status")
    assert out.returncode == 2 and "NOT loaded" in out.stdout, out.stdout


@pytest.mark.parametrize("single_use, period, windows", [(1, 10, 5 * 8), (0, 30, 120),
                                                         (0, 21600, 5)])
def test_held_windows_fit_the_ruleset(single_use, period, windows):
    """In a grace, the most windows a door holds: the ruleset takes them all
    (pure: no kernel)."""
    sys.path.insert(0, str(CLIENT.parent))
    from knockd_rotator.core.settings import settings_reader
    from knockd_rotator.engines.nftables import load, ruleset
    from knockd_rotator.engines.nftables.doors import parse_doors
    env = rotator_env(SINGLE_USE=single_use, PERIOD_MODULO=period, GRACE=min(5, period // 2))
    now = 1796601600 + 1           # a second after a day's start: every grace is on
    doors = parse_doors(b"ssh_ROTATOR guard=22\n", "doors")
    planned = load.kernel_doors(doors, settings_reader(env), {}, {"ssh_ROTATOR": 0}, now,
                                2 * 3600)
    assert len(planned[0].windows) == windows
    _, loaded = ruleset.render(planned, now)
    assert len(loaded.elements["rtrans"]) == windows


def test_an_unknown_engine_is_refused(tmp_path):
    env = rotator_env(ENGINE="iptables", ENV_FILE=tmp_path / "absent", STATE_DIR=tmp_path)
    for command in ((), ("status",), ("check",), ("list-clients",)):
        out = run_server(*command, env=env)
        assert out.returncode == 3, out.stderr
        assert out.stderr == ("error: KNOCKD_ROTATOR_ENGINE=iptables is no engine (use knockd "
                              "(the default) or nftables)\n")


def independent_totp(secret, moment):
    """RFC 6238 written here, apart from the server's code."""
    import base64
    import hashlib
    import hmac
    import struct
    digest = hmac.new(base64.b32decode(secret), struct.pack(">Q", int(moment) // 30),
                      hashlib.sha1).digest()
    offset = digest[-1] & 15
    return "%06d" % ((struct.unpack(">L", digest[offset:offset + 4])[0] & 0x7FFFFFFF) % 1000000)


def enrolled(d, name, *options, pin=None):
    """add-client NAME: the client's environment, from what it printed."""
    out = d.server("add-client", name, "--port", str(GUARDED), "--no-single-use", *options,
                   stdin=pin and (pin + "\n").encode())
    assert out.returncode == 0, out.stderr
    return d.client_env("\n".join(re.findall(r"^KNOCKD_ROTATOR_\w+=\S+$", out.stdout, re.M)))


def test_pin_and_totp_doors(door):
    d = door()
    dave = enrolled(d, "dave", "--pin", pin="2580-river-9")
    carol = enrolled(d, "carol", "--totp", "--pin", pin="1357-ocean-2")
    assert "KNOCKD_ROTATOR_SECRET_CAROL_SSH" not in carol, "the phone holds no secret"
    assert d.knock("dave_ssh", env=dave) == ("shut", 1), "no PIN: the client's check fails"
    assert d.knock_with_input("dave_ssh", dave, "--pin", text="2580-river-9\n") == "open"
    # A code 3 s or more before its period ends, so that the knock comes in the same period.
    wait_until(lambda: time.time() % 30 < 27, 5, "a code with time left")
    secret = dict(line.split("=", 1) for line in d.env_file.read_text().splitlines())[
        "KNOCKD_ROTATOR_SECRET_CAROL_SSH"]
    code = independent_totp(secret, time.time())
    wrong = "%06d" % ((int(code) + 1) % 1000000)
    assert d.knock_with_input("carol_ssh", carol, "--pin", "--code", wrong,
                              text="1357-ocean-2\n") == "shut"
    assert d.knock_with_input("carol_ssh", carol, "--pin", "--code", code,
                              text="1357-ocean-2\n") == "open"


def test_an_ipv6_knock_opens_for_its_address_only(door):
    d = door()
    assert d.server().returncode == 0
    listener = d.ns.popen(sys.executable, "-c", "import socket\ns = socket.socket(socket.AF_INET6)\n"
                          "s.bind(('::1', %d))\ns.listen(16)\n"
                          "while True: s.accept()[0].close()\n" % GUARDED)
    try:
        wait_until(lambda: d.ns.run("ss", "-ltn").stdout.count(":%d " % GUARDED) >= 2, 10,
                   "the IPv6 listener")
        assert not d.ns.tcp_open(GUARDED, host="::1")
        out = d.ns.run(sys.executable, str(CLIENT), "knock", "::1", "ssh", "-6", "--check",
                       str(GUARDED), env=d.client_env(), check=False)
        assert out.returncode == 0, out.stderr
        assert d.ns.tcp_open(GUARDED, host="::1")
        assert d.knock_nothing() == "shut", "an IPv6 knock opened IPv4"
    finally:
        listener.kill()
        listener.wait()


@contextlib.contextmanager
def a_knockd(tmp_path, *prefix):
    """A process named knockd (a sleep) for the test's length, started
    through PREFIX (a command that execs its arguments)."""
    fake = tmp_path / "knockd"
    fake.write_bytes(open("/bin/sleep", "rb").read())
    os.chmod(fake, 0o755)
    knockd = subprocess.Popen(list(prefix) + [str(fake), "60"])
    try:
        # The prefix execs the program: the same pid, its name once it runs.
        comm = "/proc/%d/comm" % knockd.pid
        wait_until(lambda: open(comm).read().strip() == "knockd", 10, "the knockd")
        yield
    finally:
        knockd.kill()
        knockd.wait()


def test_check_warns_of_a_knockd_beside_the_table(door, tmp_path):
    d = door()
    with a_knockd(tmp_path, "ip", "netns", "exec", d.ns.name):
        out = d.server("check")
    assert out.returncode == 0, out.stderr
    assert "warning: knockd runs, but KNOCKD_ROTATOR_ENGINE=nftables" in out.stderr


def test_check_ignores_a_knockd_of_another_namespace(door, tmp_path):
    d = door()
    with a_knockd(tmp_path, "unshare", "--net"):
        out = d.server("check")
    assert out.returncode == 0 and "knockd runs" not in out.stderr, out.stderr
