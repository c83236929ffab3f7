"""No input makes either script print a traceback (issue 26).

Hypothesis draws command lines (every option of both scripts, the server's
subcommands), KNOCKD_ROTATOR_* variables (each setting, general and per door,
malformed, huge, empty) and the state files the scripts read (the client's
use counters, the server's uses), one at a time and together.  Each run
either succeeds or ends in one RotatorError: one line, `error: WHAT (FIX)`,
with an exit code the scripts document.  Runs are in-process for breadth;
the network, reloads and boundary runs are stubbed, and the server works in
a temporary folder with harmless commands.  A bounded sample is spawned as
real processes, where a traceback would show on stderr.
"""

import contextlib
import errno
import io
import json
import os
import sys
import tempfile

import pytest

import knockd_rotator_client as client
from knockd_rotator import cli
from knockd_rotator import scheduling
from knockd_rotator.core import generator
from knockd_rotator.engines.knockd import reload
from knockd_rotator.engines.nftables import kernel, netlink
from conftest import CLIENT, in_fast_tier, SERVER, need, rotator_env, run_script

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:          # tests/run installs python3-hypothesis
    given = None

NOW = 1700000000
CLIENT_EXITS = {1, 2, 3, 5}
SERVER_EXITS = {1, 2, 3, 4, 6, 7}
SECRET = "abcdefghijklmnopqrstuvwxyz012345"
TOTP_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
CONFIG = (b"[options]\n\tlogfile = /dev/null\n"
          b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n"
          b"[alice_ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")

if given:
    ODD_NUMBERS = ["0", "-0", "1", "-1", "007", "+5", " 10", "10 ", "1_0", "\u0661\u0660",
                   "", "-", "--1", "1e3", "inf", "nan", "0x10", "1.5", "30", "31", "15", "16",
                   "9", "10", "32", "33", "2", "65535", "65536", "21600", "31622400",
                   "31622401", "4294967295", "4294967296", "9223372036854775807",
                   "9223372036854775808", "-9223372036854775809", "9" * 20, "9" * 21,
                   "1" * 5000, "\udc80"]
    env_text = st.text(alphabet=st.characters(blacklist_characters="\x00",
                                              blacklist_categories=("Cs",)), max_size=12)
    numbers = st.one_of(st.sampled_from(ODD_NUMBERS),
                        st.integers(-2 ** 70, 2 ** 70).map(str), env_text)
    doors = st.one_of(st.sampled_from(["ssh", "ssh_ROTATOR", "alice_ssh", "", "a]b", "a[b",
                                       "d\u00e9j\u00e0", "x\x01", "x\x85", "x\u2028",
                                       "\udcff", "x" * 119, "x" * 120, "-", "-1", "--pin"]),
                      env_text)
    # (variable without KNOCKD_ROTATOR_, its values)
    SETTINGS = {
        "SECRET": st.one_of(st.sampled_from([SECRET, TOTP_SECRET, "", "short", "legacy-secret",
                                             "\udc80" * 30, "a" * 5000]), env_text),
        "PIN": st.one_of(st.sampled_from(["", "1234", "\udc80"]), env_text),
        "MODE": st.one_of(st.sampled_from(["secret", "totp", "", "TOTP"]), env_text),
        "ALGORITHM": st.one_of(st.sampled_from(["knockd-rotator/1", "legacy-v1", "legacy-v3",
                                                ""]), env_text),
        "PORTS": st.one_of(st.sampled_from(["2000-65536", "1-2", "2000", "5,6", " 1 , 2 ",
                                            "2000-3000,2500-4000", "1-" + "9" * 30, ",", "",
                                            "0-5", "1-65537", "3-1,7"]), env_text),
        "SALT": st.sampled_from(["legacy-salt-0123", "", "x"]),
    }
    for name in ("LENGTH", "PORT_MODULO", "PERIOD_MODULO", "GRACE", "SINGLE_USE",
                 "PROTO_MODULO", "LEAD", "CHECK_SECONDS", "SERVER_INTERVAL",
                 "DOORS_PER_KNOCKD"):
        SETTINGS[name] = numbers
    suffixes = st.sampled_from(["", "", "_SSH", "_ALICE_SSH", "_TYPO"])
    environments = st.dictionaries(
        st.tuples(st.sampled_from(sorted(SETTINGS)), suffixes).map(lambda p: p[0] + p[1]),
        st.just(None), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries(
            {key: SETTINGS[key.split("_SSH")[0].split("_ALICE")[0].split("_TYPO")[0]]
             for key in keys}))
    counters = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.sampled_from(
        [0, 1, -1, 2 ** 32 - 1, 2 ** 32, 10 ** 8, True, None, "3", 1.5, [], {}]))
    starts = st.sampled_from([1699984800, 1699999980, "1699984800", None, 0, -1, 2 ** 64])
    client_uses = st.one_of(
        st.sampled_from([b"", b"{", b"[]", b"null", b"1" * 5000, b"[" * 5000, b"\xff\xfe",
                         b'{"ssh_ROTATOR": 1}', b'{"ssh_ROTATOR": {}}', None]),
        st.fixed_dictionaries({"ssh_ROTATOR": st.fixed_dictionaries(
            {"start": starts, "next": counters})}).map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=20))
    server_uses = st.one_of(
        st.sampled_from([b"", b"{", b"[]", b"null", b"[" * 5000, b'{"1": 2}',
                         b'{"ssh_ROTATOR": []}', b'{"ssh_ROTATOR": {"counts": [], "burns": {}}}',
                         b'{"ssh_ROTATOR": {"counts": {"x": 1, "-": 2}, "burns": ["a", null]}}',
                         None]),
        st.fixed_dictionaries({"ssh_ROTATOR": st.fixed_dictionaries({
            "counts": st.dictionaries(
                st.one_of(st.sampled_from(["1672531200", "0", "-5", "a", "9" * 30]), env_text),
                counters, max_size=3),
            "burns": st.lists(counters, max_size=3),
            "openings": st.one_of(counters, st.dictionaries(
                st.one_of(st.sampled_from(["1672531200:0", "0:0", "a", "1:x"]), env_text),
                counters, max_size=3))})}).map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=20))

    def option(name, values):
        return st.tuples(st.just(name), values).map(list)

    flag = st.sampled_from(["--pin", "-4", "-6", "--frobnicate", "--", "-", "--code"]).map(
        lambda word: [word])
    codes = st.one_of(st.sampled_from(["-", "", "123456", "123 456", "12345", "1234567",
                                       "\u0661" * 6]), env_text)
    client_options = st.lists(st.one_of(
        option("--offset", numbers), option("--use", numbers), option("--code", codes),
        option("--format", st.sampled_from(["knockd", "knock", "json", "xml", ""])),
        option("--delay", numbers), option("--check", numbers),
        option("--check-timeout", st.one_of(numbers, st.sampled_from(
            ["0.5", "1.", ".5", "1.0000001", "86400.0", "86400.1", "1e1", "inf"]))),
        flag, env_text.map(lambda word: [word])), max_size=4).map(
        lambda groups: [word for group in groups for word in group])
    client_argv = st.tuples(
        st.sampled_from(["generate", "gen", "g", "knock", "kn", "x", ""]),
        st.sampled_from([[], ["127.0.0.1"], ["::1"], ["host.invalid"]]), doors,
        client_options).map(
        lambda p: [p[0]] + (p[1] if p[0].startswith("k") else []) + [p[2]] + p[3])
    typed = st.one_of(st.sampled_from(["", "\n", "1234\n", "1234\r\n", "1234\r\r\n",
                                       "123456\n", "123456\r\n", "123 456\r\n"]), env_text)


class Stubbed:
    """The client's network calls stubbed: nothing leaves the test."""

    def __init__(self, opens):
        self.opens = opens

    def __enter__(self):
        self.saved = client.resolve_host, client.send_knocks, client.wait_for_port
        client.resolve_host = lambda host, family: (2, ("127.0.0.1", 0))
        client.send_knocks = lambda *args: None
        client.wait_for_port = lambda *args: 0.01 if self.opens else None
        return self

    def __exit__(self, *exc):
        client.resolve_host, client.send_knocks, client.wait_for_port = self.saved


def outcome(function, exits, *args):
    """The exit code of FUNCTION(*ARGS), checked: a RotatorError is one line
    and a documented exit code; anything else fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = function(*args)
        except (client.RotatorError, generator.RotatorError) as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith("error: "), message
            assert message.endswith(")"), message
            assert exc.code in exits, (exc.code, message)
            code = exc.code
    assert "Traceback" not in err.getvalue()
    return code


def client_run(argv, environ, uses, stdin, opens, folder, path_kind="file"):
    path = {"file": os.path.join(folder, "uses.json"), "folder": folder, "empty": "",
            "nowhere": os.path.join(folder, "absent", "deeper", "uses.json")}[path_kind]
    if uses is not None and path_kind == "file":
        with open(path, "wb") as handle:
            handle.write(uses)
    environ = {"KNOCKD_ROTATOR_" + key: value
               for key, value in dict({"SECRET": SECRET}, **environ).items()}
    environ["KNOCKD_ROTATOR_USES_FILE"] = path
    environ["XDG_STATE_HOME"] = folder        # where an empty USES_FILE leads
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with Stubbed(opens):
            code = outcome(client.run, CLIENT_EXITS, argv, environ, NOW)
    finally:
        sys.stdin = saved
    assert code in {0} | CLIENT_EXITS


def test_client_never_raises_anything_else():
    need(given, "needs hypothesis (Debian package python3-hypothesis; tests/run installs it)")

    @settings(max_examples=1500, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(client_argv, environments, client_uses, typed, st.booleans(),
           st.sampled_from(["file", "file", "folder", "empty", "nowhere"]))
    def run(argv, environ, uses, stdin, opens, path_kind):
        with tempfile.TemporaryDirectory() as folder:
            client_run(argv, environ, uses, stdin, opens, folder, path_kind)

    run()


@pytest.mark.parametrize("argv, environ, uses", [
    (["gen", "ssh"], {"LENGTH": "1"}, None),
    (["gen", "ssh"], {"LENGTH": "1" * 5000}, None),
    (["gen", "ssh", "--offset", "1" * 5000], {}, None),
    (["gen", "ssh"], {"SINGLE_USE": "1"}, b'{"ssh_ROTATOR": {"start": 1699984800, "next": -1}}'),
    (["gen", "ssh"], {"SINGLE_USE": "1"},
     b'{"ssh_ROTATOR": {"start": 1699984800, "next": 4294967296}}'),
    (["kn", "127.0.0.1", "ssh", "--check", "22"], {"SINGLE_USE": "1"},
     b'{"ssh_ROTATOR": {"start": 1699984800, "next": 100000000}}'),
    (["kn", "127.0.0.1", "ssh", "--check", "22"], {"SINGLE_USE": "1"},
     b'{"ssh_ROTATOR": {"start": 1699984800, "next": 4294967295}}'),
    (["gen", "ssh"], {"SINGLE_USE": "1"}, b"[" * 5000),
    (["gen", "ssh", "--offset=-999999999999999999"], {"ALGORITHM": "legacy-v1",
                                                     "SECRET": "legacy-secret"}, None),
    (["gen", "ssh"], {"ALGORITHM": "legacy-v3", "PORTS": "1-" + "9" * 5000}, None),
])
def test_client_crashes_found_before(tmp_path, argv, environ, uses):
    """Tracebacks of issue 26: ZeroDivisionError, the int() digit limit,
    OverflowError and MemoryError from the use counter file."""
    client_run(argv, dict({"SECRET": SECRET}, **environ), uses, "", False, str(tmp_path))


# The nftables engine's `nft`, in-process runs: never the host's, a script
# that answers a read with an empty set and a load as NFT_LOADS says; its
# netlink, never the host's either: no table to read, a batch taken as
# NFT_LOADS says.
FAKE_NFT = """#!/bin/sh
case "$*" in *-j*) echo '{"nftables": [{"set": {"elem": []}}]}'; exit 0 ;; esac
cat > /dev/null
[ "$NFT_LOADS" = yes ] && exit 0
echo "Error: the test's nft refuses it" >&2
exit 1
"""


def no_table(*args, **kwargs):
    raise FileNotFoundError(errno.ENOENT, "No such file or directory")


def refused(*args, **kwargs):
    raise RuntimeError("netlink: the kernel refused the elements: the test's")


def server_run(argv, environ, uses, stdin, folder, state_files=(), nft_loads=None):
    if nft_loads is not None:
        fake = os.path.join(folder, "nft")
        with open(fake, "w") as handle:
            handle.write(FAKE_NFT)
        os.chmod(fake, 0o755)
        os.environ["NFT_LOADS"] = "yes" if nft_loads else "no"
        saved = kernel.nft_command, netlink.request, netlink.add_elements
        kernel.nft_command = lambda netns=None: [fake]
        netlink.request = no_table
        netlink.add_elements = (lambda *args, **kwargs: None) if nft_loads else refused
        try:
            return server_run(argv, dict(environ, ENGINE="nftables"), uses, stdin, folder,
                              state_files)
        finally:
            kernel.nft_command, netlink.request, netlink.add_elements = saved
    config = os.path.join(folder, "knockd.conf")
    state = os.path.join(folder, "state")
    os.makedirs(state, mode=0o700, exist_ok=True)
    if not os.path.exists(config):
        with open(config, "wb") as handle:
            handle.write(CONFIG)
    for name, data in [("state/uses", uses)] + list(state_files):
        if data is not None:
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(data)
    base = {"STATE_DIR": state, "ENV_FILE": os.path.join(folder, "env"),
            "RELOAD_COMMAND": "true", "CHECK_COMMAND": "true", "RECOVER_COMMAND": "true",
            "KILL_COMMAND": "true", "INSTANCE_RELOAD_COMMAND": "true %i",
            "INSTANCE_CHECK_COMMAND": "true %i", "INSTANCE_RECOVER_COMMAND": "true %i",
            "INSTANCE_KILL_COMMAND": "true %i", "TRIAL_KNOCKD": "", "SECRET": SECRET,
            "PERIOD_MODULO": "31622400"}
    base.update(environ)
    environ = {"KNOCKD_ROTATOR_" + key: value for key, value in base.items()}
    environ["PATH"] = os.environ.get("PATH", os.defpath)
    saved = (sys.stdin, reload.knockd_stays_up, scheduling.schedule_boundary_run,
             scheduling.schedule_retry, scheduling.sleep_until)
    sys.stdin = io.StringIO(stdin)
    # A rotation's check would take CHECK_SECONDS; a boundary run would outlive the test.
    reload.knockd_stays_up = lambda *args, **kwargs: (True, "")
    scheduling.schedule_boundary_run = scheduling.schedule_retry = lambda *args, **kwargs: None
    scheduling.sleep_until = lambda moment: None
    try:
        code = outcome(cli.run, SERVER_EXITS, ["--config", config] + argv, environ)
    finally:
        (sys.stdin, reload.knockd_stays_up, scheduling.schedule_boundary_run,
         scheduling.schedule_retry, scheduling.sleep_until) = saved
    assert isinstance(code, int)


if given:
    names = st.one_of(st.sampled_from(["alice", "bob", "a-b"]), st.sampled_from(
        ["-a", "", "x" * 33, "\u00e9", "carol\n"]), env_text)
    server_argv = st.one_of(
        st.tuples(st.sampled_from([[], ["--dry-run"], ["--verbose"], ["--schedule"],
                                   ["--dry-run", "--schedule"]]),
                  st.one_of(st.just([]), option("--at", numbers))).map(lambda p: p[0] + p[1]),
        st.just(["check"]),
        st.sampled_from([["status"], ["status", "--json"], ["status", "--show-sequences"]]),
        st.just(["list-clients"]),
        st.tuples(st.just("burn"), st.one_of(st.sampled_from(
            ["ssh_ROTATOR", "ssh_ROTATOR_GRACE", "alice_ssh_ROTATOR", "nothing", ""]),
            env_text), st.one_of(st.just([]), option("--use", st.one_of(st.sampled_from(
                ["0:0", "1672531200:1", "1672531200:4294967295", "1672531200:-1", ":", "1:",
                 ":1", "1:2:3", "9" * 30 + ":1", "x:y"]), env_text)))).map(
            lambda p: [p[0], p[1]] + p[2]),
        st.tuples(st.just("remove-client"), names).map(list),
        st.tuples(st.just("add-client"), names, st.lists(st.one_of(
            st.just(["--firewall", "iptables"]), st.just(["--firewall", "iptables"]),
            option("--service", names), option("--port", numbers),
            option("--firewall", st.sampled_from(["iptables", "nftables", "ufw", "pf"])),
            option("--host", st.sampled_from(["server.example", "", "a b"])),
            flag.filter(lambda f: f[0] in ("--pin", "--")),
            st.sampled_from([["--totp"], ["--no-single-use"]])), max_size=4)).map(
            lambda p: [p[0], p[1]] + [word for group in p[2] for word in group]))
    # Mostly settings a rotation takes, so that most runs get past them.
    damaged = st.one_of(st.sampled_from([b"", b"{", b"[]", b"null", b"[" * 5000, b"1" * 5000,
                                         b"\xff", b'{"ssh_ROTATOR": []}',
                                         b'{"ssh_ROTATOR": {"period": "x", "start": []}}',
                                         b'{"salt": 5, "from": [], "starts": 7}',
                                         b'{"ssh_ROTATOR": {"period": 60, "grace": 0, '
                                         b'"mode": "secret", "fingerprint": null}}',
                                         b'{"ssh_ROTATOR": {"period": 0, "grace": 0, '
                                         b'"mode": "secret", "start": 5}}']),
                        st.binary(max_size=20))
    # The other files the server reads, damaged: its state (but the pending
    # boundary run's pid: the server signals the process it names) and the
    # environment file.
    env_file = st.one_of(st.sampled_from([b"KNOCKD_ROTATOR_LENGTH=+5\n",
                                          b"KNOCKD_ROTATOR_SINGLE_USE_SSH='1'\n",
                                          b"=\n'\n\"x\nKNOCKD_ROTATOR_GRACE=\xff\n"]),
                         st.binary(max_size=40))
    state_files = st.lists(st.one_of(
        st.tuples(st.sampled_from(["state/fingerprints", "state/planned",
                                   "state/last-rotation", "state/last-good"]), damaged),
        st.tuples(st.just("env"), env_file)), max_size=3)
    server_environments = st.one_of(
        st.sampled_from([{}, {"SINGLE_USE": "1"}, {"SINGLE_USE_SSH": "1", "PIN": "1234"}]),
        environments.map(lambda env: {key: value for key, value in env.items()
                                      if key != "SALT"}))


def test_server_never_raises_anything_else():
    need(given, "needs hypothesis (Debian package python3-hypothesis; tests/run installs it)")
    need(os.geteuid() == 0, "needs root (the server's state folder, add-client)")

    @settings(max_examples=600, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(server_argv, server_environments, server_uses, typed, state_files)
    def run(argv, environ, uses, stdin, files):
        with tempfile.TemporaryDirectory() as folder:
            server_run(argv, environ, uses, stdin, folder, files)

    run()


def test_nftables_engine_never_raises_anything_else():
    """The same under KNOCKD_ROTATOR_ENGINE=nftables: a doors file (the
    --config, here knockd.conf's path) and its record damaged too, with an
    nft that loads or refuses."""
    need(given, "needs hypothesis (Debian package python3-hypothesis; tests/run installs it)")
    need(os.geteuid() == 0, "needs root (the server's state folder, add-client)")
    doors_files = st.one_of(st.sampled_from([
        b"ssh_ROTATOR guard=22\nalice_ssh_ROTATOR guard=22 client=alice\n",
        b"ssh_ROTATOR guard=22,23 open=5 seq_timeout=3 family=ip6\n", b"", b"\xff\n",
        b"ssh_ROTATOR guard=99999\n", b"x_ROTATOR guard=1 family=\n"]), st.binary(max_size=40))
    records = st.tuples(st.just("state/nftables.json"), st.one_of(damaged, st.sampled_from([
        b'{"numbers": {"ssh_ROTATOR": 99999}, "finals": [[1, "tcp", 2, "ssh_ROTATOR", 3, 4]]}',
        b'{"finals": [[1, "tcp"]], "doors": {"ssh_ROTATOR": {"windows": [[1]]}}}',
        b'{"finals": 5, "numbers": [], "doors": []}',
        b'{"doors": {"ssh_ROTATOR": {"number": [], "period": 5, "guard": [22], '
        b'"windows": []}}}'])))

    @settings(max_examples=in_fast_tier(300, 60), deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(server_argv, server_environments, server_uses, typed, st.lists(records, max_size=1),
           doors_files, st.booleans())
    def run(argv, environ, uses, stdin, files, doors, loads):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "knockd.conf"), "wb") as handle:
                handle.write(doors)
            server_run(argv, environ, uses, stdin, folder, files, nft_loads=loads)

    run()


# (argv, environment, uses file, other state files if any)
@pytest.mark.parametrize("case", [
    (["burn", "ssh_ROTATOR"], {"SINGLE_USE": "1"}, b'{"ssh_ROTATOR": {"counts": []}}'),
    (["burn", "ssh_ROTATOR"], {"SINGLE_USE": "1"},
     b'{"ssh_ROTATOR": {"counts": {"x": 1}, "burns": "no"}}'),
    (["burn", "ssh_ROTATOR"], {"SINGLE_USE": "1"},
     b'{"ssh_ROTATOR": {"counts": {"1672531200": 4294967295}}}'),
    (["status"], {"SINGLE_USE": "1"}, b'{"ssh_ROTATOR": {"burns": [null, "x", 1e400]}}'),
    (["status"], {"SINGLE_USE": "1"}, b'{"ssh_ROTATOR": 5}'),
    (["--dry-run"], {"SINGLE_USE": "1"}, b'{"ssh_ROTATOR": {"counts": {"1672531200": "2"}}}'),
    (["--at", "1" * 5000], {}, None),
    (["--dry-run"], {"LENGTH": "1"}, None),
    (["--dry-run"], {"LEAD": "9" * 5000}, None),
    (["--dry-run"], {}, None, [("state/planned", b"[" * 5000)]),
    (["status"], {"SECRET": ""}, None, [("state/fingerprints", b"[]")]),
    (["status"], {"SECRET": ""}, None, [("state/fingerprints", b"[" * 5000)]),
    (["status"], {"SECRET": ""}, None,
     [("state/fingerprints", b'{"ssh_ROTATOR": {"period": "60", "grace": null, "start": []}}')]),
])
def test_server_crashes_found_before(tmp_path, case):
    """Tracebacks of damaged state files: the uses (burn, status, rotations),
    the planned record and the fingerprints; and numbers out of the grammar."""
    need(os.geteuid() == 0, "needs root (the server's state folder)")
    argv, environ, uses, *files = case
    server_run(argv, environ, uses, "", str(tmp_path), files[0] if files else ())


SPAWNED = [
    (CLIENT, ["gen", "ssh"], {"LENGTH": "1"}),
    (CLIENT, ["gen", "ssh", "--offset", "9" * 5000], {}),
    (CLIENT, ["gen", "x\x85"], {}),
    (CLIENT, ["gen", "ssh", "--use", "-0"], {"SINGLE_USE": "1"}),
    (CLIENT, ["gen", "ssh", "--code="], {}),
    (CLIENT, ["gen", "ssh"], {"PERIOD_MODULO": "\u0661\u0660"}),
    (SERVER, ["--dry-run"], {"LENGTH": "1"}),
    (SERVER, ["--dry-run"], {"GRACE": "1" * 5000}),
    (SERVER, ["--at", "+5"], {}),
    (SERVER, ["burn", "ssh_ROTATOR"], {"SINGLE_USE": "1", "USES": b'{"ssh_ROTATOR": []}'}),
    (SERVER, ["status"], {"SINGLE_USE": "1", "USES": b'{"ssh_ROTATOR": {"burns": {}}}'}),
]


@pytest.mark.parametrize("script, argv, overrides", SPAWNED,
                         ids=["%s %s" % (s.name[15:21], " ".join(a)[:30]) for s, a, _ in SPAWNED])
def test_real_processes_print_no_traceback(tmp_path, server_env, script, argv, overrides):
    overrides = dict(overrides)
    uses = overrides.pop("USES", None)
    env = server_env(TRIAL_KNOCKD="", **overrides) if script == SERVER else rotator_env(
        **overrides)
    if script == SERVER:
        (tmp_path / "knockd.conf").write_bytes(CONFIG)
        argv = ["--config", tmp_path / "knockd.conf"] + argv
        if uses is not None:
            (tmp_path / "state").mkdir(mode=0o700)
            (tmp_path / "state" / "uses").write_bytes(uses)
    result = run_script(script, *argv, env=env, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == (result.returncode != 0) or script == SERVER and argv[2] == "status"
    assert result.returncode in {0} | (CLIENT_EXITS if script == CLIENT else SERVER_EXITS) | (
        {0, 1, 2, 3} if "status" in argv else set())
