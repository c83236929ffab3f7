"""Per-door settings, PINs, TOTP mode, and enrolling clients (issue 5).

The tests with knockd run it in a network namespace; a door's start_command
inserts an iptables ACCEPT in front of the DROP that guards port 2222."""

import base64
import hashlib
import hmac
import os
import re
import shutil
import struct
import subprocess
import time

import pytest

import knockd_rotator_client as client
from knockd_rotator import scheduling
from knockd_rotator.core import errors as core_errors
from knockd_rotator.core import files as core_files
from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.engines.knockd import config as knockd_config
from knockd_rotator.engines.knockd import render as knockd_render
from conftest import (GUARDED_PORT, ROOT, SECRET, SERVER, Watch, alive_command, need,
                      need_root_and, rotator_env, run_client, run_server, wait_until)

BASE_CONFIG = b"[options]\n\tlogfile = /dev/null\n\n[ssh_ROTATOR]\n\tsequence = 1\n" \
              b"\tstart_command = true\n\tcmd_timeout = 5\n\tstop_command = true\n"


# ---------------------------------------------------------------- settings, keys, TOTP

@pytest.mark.parametrize("door, name", [
    ("alice_ssh_ROTATOR", "ALICE_SSH"), ("alice-ssh", "ALICE_SSH"), ("ssh_ROTATOR", "SSH"),
    ("déjà-vu_ROTATOR", "D_J__VU"), ("web.2_ROTATOR", "WEB_2"), ("ß_ROTATOR", "_")])
def test_settings_name(door, name):
    assert client.settings_name(door) == name


def test_a_door_s_own_variables_win():
    env = {"KNOCKD_ROTATOR_SECRET": "general-secret-0123-4567", "KNOCKD_ROTATOR_LENGTH": "11",
           "KNOCKD_ROTATOR_SECRET_ALICE_SSH": "alice-secret-0123-45678",
           "KNOCKD_ROTATOR_LENGTH_ALICE_SSH": "12", "KNOCKD_ROTATOR_PERIOD_MODULO_ALICE_SSH": "60",
           "KNOCKD_ROTATOR_PIN_ALICE_SSH": "2468"}
    alice = client.read_settings(env, "alice_ssh_ROTATOR")
    other = client.read_settings(env, "bob_ssh_ROTATOR")
    assert (client.secret_bytes(alice), alice.length, alice.period, alice.grace, alice.pin) == (
        b"alice-secret-0123-45678", 12, 60, 30, b"2468")
    assert (client.secret_bytes(other), other.length, other.period, other.pin) == (
        b"general-secret-0123-4567", 11, 21600, b"")
    # An empty own variable is in force too: no PIN for this door.
    env["KNOCKD_ROTATOR_PIN"] = "1357"
    env["KNOCKD_ROTATOR_PIN_BOB_SSH"] = ""
    assert client.read_settings(env, "bob_ssh_ROTATOR").pin == b""


def test_a_door_without_a_secret_names_both_variables():
    settings = client.read_settings({"KNOCKD_ROTATOR_SECRET_BOB_SSH": "x" * 20},
                                    "alice_ssh_ROTATOR")
    with pytest.raises(client.RotatorError) as caught:
        client.secret_bytes(settings)
    assert "neither KNOCKD_ROTATOR_SECRET_ALICE_SSH nor KNOCKD_ROTATOR_SECRET is set" \
        in str(caught.value)
    assert caught.value.code == client.EXIT_ENVIRONMENT


@pytest.mark.parametrize("env, words", [
    ({"KNOCKD_ROTATOR_MODE_X": "hotp"}, "KNOCKD_ROTATOR_MODE_X is 'hotp'"),
    ({"KNOCKD_ROTATOR_MODE": "totp", "KNOCKD_ROTATOR_PERIOD_MODULO_X": "60"},
     "KNOCKD_ROTATOR_PERIOD_MODULO_X must be a whole number from 30 to 30"),
    ({"KNOCKD_ROTATOR_ALGORITHM": "legacy-v1", "KNOCKD_ROTATOR_PIN_X": "1234"},
     "legacy-v1 has no PIN, no totp mode and no single use"),
    ({"KNOCKD_ROTATOR_GRACE_X": "16", "KNOCKD_ROTATOR_MODE_X": "totp"},
     "KNOCKD_ROTATOR_GRACE_X must be a whole number from 0 to 15")])
def test_bad_door_settings(env, words):
    with pytest.raises(client.RotatorError) as caught:
        client.read_settings(env, "x_ROTATOR")
    assert words in str(caught.value)


def test_a_totp_door_takes_30_s_periods_whatever_the_general_period():
    settings = client.read_settings({"KNOCKD_ROTATOR_MODE_X": "totp",
                                     "KNOCKD_ROTATOR_PERIOD_MODULO": "3600"}, "x_ROTATOR")
    assert (settings.period, settings.grace) == (30, 15)


# RFC 6238 Appendix B, SHA-1 rows: (time, 8-digit code); key "12345678901234567890".
RFC6238_SHA1 = [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
                (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")]


@pytest.mark.parametrize("moment, code", RFC6238_SHA1)
def test_totp_matches_rfc6238_appendix_b(moment, code):
    assert core_settings.hotp(b"12345678901234567890", moment // 30) == code[-6:]


def test_totp_secret_is_base32_of_at_least_128_bits():
    key = base64.b32encode(b"12345678901234567890").decode()
    settings = client.read_settings({"KNOCKD_ROTATOR_SECRET": key.lower()[:8] + " " + key[8:],
                                     "KNOCKD_ROTATOR_MODE": "totp"}, "x_ROTATOR")
    assert core_settings.totp_secret(settings) == b"12345678901234567890"
    for bad in ["not base32!", base64.b32encode(b"15 bytes only..").decode()]:
        settings.secret = bad
        with pytest.raises(generator.RotatorError, match="not a base32 TOTP secret of at least 128"):
            core_settings.totp_secret(settings)


def test_the_pin_changes_every_sequence():
    env = {"KNOCKD_ROTATOR_SECRET": SECRET}
    sequences = set()
    for pin in ["", "1234", "1235", "12345"]:
        settings = core_settings.with_sequences(client.read_settings(
            dict(env, KNOCKD_ROTATOR_PIN=pin), "ssh_ROTATOR"))
        sequences.add(settings.sequence_at(1700000000 // 21600 * 21600))
    assert len(sequences) == 4


def test_client_reads_the_pin_from_stdin_never_from_the_command_line():
    env = rotator_env(PIN="2468")
    from_env = run_client("gen", "ssh", env=env)
    typed = run_client("gen", "ssh", "--pin", env=rotator_env(), input=b"2468\n")
    wrong = run_client("gen", "ssh", "--pin", env=rotator_env(), input=b"2469\n")
    none = run_client("gen", "ssh", env=rotator_env())
    assert from_env.returncode == typed.returncode == 0, typed.stderr
    assert from_env.stdout == typed.stdout != wrong.stdout
    assert none.stdout != typed.stdout
    empty = run_client("gen", "ssh", "--pin", env=rotator_env(), input=b"\n")
    assert empty.returncode == 2 and "error: the PIN is empty" in empty.stderr
    assert run_client("gen", "ssh", "--pin=2468", env=env).returncode == 2


@pytest.mark.parametrize("args, env, words", [
    (["--code", "12345"], {"MODE": "totp"}, "the code must be the 6 digits"),
    (["--code", "123456"], {"MODE": "secret"}, "--code is for doors in totp mode"),
    ([], {"MODE_SSH": "totp"}, "door ssh_ROTATOR is in totp mode"),
])
def test_client_code_errors(args, env, words):
    result = run_client("gen", "ssh", *args, env=rotator_env(**env))
    assert result.returncode == 2 and words in result.stderr and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1


def test_a_code_on_the_command_line_warns_and_one_typed_does_not():
    """A command line is readable by every local user (/proc/PID/cmdline)."""
    env = rotator_env(MODE="totp")
    given = run_client("gen", "ssh", "--code", "123456", env=env)
    typed = run_client("gen", "ssh", "--code", "-", env=env, input=b"123456\n")
    assert given.returncode == typed.returncode == 0, given.stderr + typed.stderr
    assert given.stdout == typed.stdout
    assert given.stderr == ("warning: a code on the command line is visible to every local "
                            "user (ps) for its 30 s; --code - asks for it\n")
    assert typed.stderr == ""
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "CLIENTS.md").read_text()
    assert "--code 1" not in readme.replace("`--code 123456` works too", "")


def test_two_doors_with_the_same_settings_name_are_refused(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    data = (b"[alice-ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n"
            b"[alice.ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    config.write_bytes(data)
    result = run_server("--config", config, env=server_env())
    assert result.returncode == 4, result.stderr
    assert ("line 4: doors [alice-ssh_ROTATOR] and [alice.ssh_ROTATOR] would both take their "
            "settings from KNOCKD_ROTATOR_*_ALICE_SSH") in result.stderr
    assert config.read_bytes() == data
    checked = run_server("check", "--config", config, env=server_env())
    assert checked.returncode == 4 and "KNOCKD_ROTATOR_*_ALICE_SSH" in checked.stderr


def test_doors_with_their_own_periods_have_their_own_grace(tmp_path):
    """A 30 s door and a 6 h door: the block holds only the door in its grace,
    and the next event is the nearer of the two doors' events (the grace end,
    then the next lead's start)."""
    config = BASE_CONFIG + b"[fast_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n"
    env = {"KNOCKD_ROTATOR_SECRET": SECRET, "KNOCKD_ROTATOR_PERIOD_MODULO_FAST": "30",
           "KNOCKD_ROTATOR_GRACE_FAST": "10"}
    start = 1699999980         # a 30 s period start, 15180 s into a 6 h period
    now = start + 3
    plan = knockd_render.plan_rotation("k.conf", config, now, core_settings.settings_reader(env))
    assert plan.graced == ["fast_ROTATOR"] and plan.event == start + 10
    text = b"".join(line.raw for line in plan.new_lines)
    assert b"[fast_ROTATOR_GRACE]" in text and b"[ssh_ROTATOR_GRACE]" not in text
    fast = plan.settings["fast_ROTATOR"]
    assert ("\tsequence = %s\n" % fast.sequence_at(start - 30).decode()).encode() in text
    later = knockd_render.plan_rotation("k.conf", text, now + 10, core_settings.settings_reader(env))
    # The next event: the fast door's lead, 10 s before its next period.
    assert later.graced == [] and later.event == start + 30 - fast.lead == start + 20
    assert b"_GRACE" not in b"".join(line.raw for line in later.new_lines)


def test_watch_takes_a_new_door_at_once(tmp_path, server_env):
    """A door with a 4 s period added (with its settings) while --watch sleeps
    towards the hourly door's next event is rotated from then on."""
    config, env_file = tmp_path / "knockd.conf", tmp_path / "rotator.env"
    config.write_bytes(BASE_CONFIG)
    server = Watch(config, server_env(PERIOD_MODULO=3600, GRACE=0, ENV_FILE=env_file),
                   tmp_path)
    try:
        wait_until(lambda: b"sequence = 1\n" not in config.read_bytes(), 10, "the first rotation")
        env_file.write_text("KNOCKD_ROTATOR_PERIOD_MODULO_FAST=4\n")
        env_file.chmod(0o600)
        with open(config, "ab") as handle:
            handle.write(b"[fast_ROTATOR]\n\tstop_command = true\n")

        def fast_sequence():
            return server_sequences(config).get("fast_ROTATOR")
        first = wait_until(fast_sequence, 3, "the new door's first sequence")
        wait_until(lambda: fast_sequence() not in (None, first), 6, "its next period")
    finally:
        assert server.stop() == 0, server.text()


def server_sequences(config):
    return knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))


def test_every_run_reads_the_environment_file(tmp_path, server_env):
    """So that --watch, started before add-client, knows the new clients."""
    config, env_file = tmp_path / "knockd.conf", tmp_path / "rotator.env"
    config.write_bytes(BASE_CONFIG.replace(b"ssh_ROTATOR", b"alice_ssh_ROTATOR"))
    env = server_env(SECRET=None, ENV_FILE=env_file)
    assert "KNOCKD_ROTATOR_SECRET_ALICE_SSH" in run_server("--config", config, env=env).stderr
    env_file.write_text("# alice\nKNOCKD_ROTATOR_SECRET_ALICE_SSH='%s'\n" % SECRET)
    env_file.chmod(0o600)
    result = run_server("--config", config, env=env)
    assert result.returncode == 0, result.stderr
    held = knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))["alice_ssh_ROTATOR"]
    expected = run_client("gen", "alice_ssh", env=rotator_env(
        SECRET=None, SECRET_ALICE_SSH=SECRET, PERIOD_MODULO=env["KNOCKD_ROTATOR_PERIOD_MODULO"]))
    assert held.decode() + "\n" == expected.stdout


# ---------------------------------------------------------------- add-client and friends

class Enrol:
    """A knockd.conf and an environment file (0600) with one shared door in
    FOLDER; run(*args) runs the server on them, after COMMAND."""

    def __init__(self, folder, server_env, *command):
        self.config, self.env_file = folder / "knockd.conf", folder / "rotator.env"
        self.command = command
        self.config.write_bytes(BASE_CONFIG)
        self.env_file.write_text("KNOCKD_ROTATOR_SECRET=%s\n" % SECRET)
        self.env_file.chmod(0o600)
        self.env = server_env(SECRET=None, ENV_FILE=self.env_file)

    def run(self, *args, **kwargs):
        return run_server("--config", self.config, *self.command, *args,
                          env=kwargs.pop("env", self.env), **kwargs)

    def files(self):
        """Both files, and the names of temporary files left beside them."""
        return self.config.read_bytes(), self.env_file.read_bytes(), sorted(
            p.name for p in self.config.parent.iterdir() if p.name.endswith(core_files.TEMP_SUFFIX))


@pytest.fixture
def enrol(tmp_path, server_env):
    """An Enrol in tmp_path."""
    return Enrol(tmp_path, server_env)


def client_lines(output):
    """The KNOCKD_ROTATOR_* lines that add-client printed for the client."""
    return dict(line.split("=", 1) for line in output.splitlines()
                if re.match(r"KNOCKD_ROTATOR_[A-Z0-9_]+=", line))


def test_add_client_then_remove_client(enrol):
    before = enrol.files()
    added = enrol.run("add-client", "alice", "--firewall", "iptables", "--host", "srv")
    assert added.returncode == 0, added.stderr
    lines = client_lines(added.stdout)
    secret = lines["KNOCKD_ROTATOR_SECRET_ALICE_SSH"]
    assert len(secret) >= 43
    # The server's period is not the client's default: the lines carry it;
    # and the door is single-use, which the client must know.
    assert lines == {"KNOCKD_ROTATOR_SECRET_ALICE_SSH": secret,
                     "KNOCKD_ROTATOR_PERIOD_MODULO_ALICE_SSH": "31622400",
                     "KNOCKD_ROTATOR_SINGLE_USE_ALICE_SSH": "1"}
    assert secret not in added.stderr, "the secret is printed for the client, never logged"
    assert "knockd_rotator_client.py knock srv alice_ssh --check 22" in added.stdout
    assert enrol.env_file.read_bytes() == before[1] + (
        "KNOCKD_ROTATOR_SECRET_ALICE_SSH=%s\nKNOCKD_ROTATOR_SINGLE_USE_ALICE_SSH=1\n"
        % secret).encode()
    assert oct(os.stat(enrol.env_file).st_mode & 0o777) == "0o600"
    text = enrol.config.read_text()
    assert text.startswith(BASE_CONFIG.decode().replace("\tsequence = 1", "\tsequence = "
                                                        + knockd_config.door_sequences(
        knockd_config.parse_config(enrol.config.read_bytes()))["ssh_ROTATOR"].decode()))
    iptables = shutil.which("iptables")
    door = text[text.index("# knockd_rotator client alice:"):]
    # The burn is gated (its first opening of a use only) and names the use
    # whose sequence the door holds: the period's first.
    record = "%s/burning/alice_ssh_ROTATOR.%d.0" % (
        enrol.config.parent / "state", generator.period_start(time.time(), 31622400))
    gate = "{ echo 2>/dev/null >>%s; mkdir %s.burn 2>/dev/null || [ ! -d %s/burning ]; } &&" % (
        record, record, enrol.config.parent / "state")
    assert re.fullmatch(
        r"# knockd_rotator client alice: .*\n\[alice_ssh_ROTATOR\]\n    sequence = [0-9:tcp,]+\n"
        r"    seq_timeout     = 15\n    tcpflags        = syn\n"
        r"    start_command   = {5} {1} {2} --config {3} burn alice_ssh_ROTATOR --use {6} & {0}\n"
        r"    start_command_6 = {5} {1} {2} --config {3} burn alice_ssh_ROTATOR --use {6} & {0}\n"
        r"    cmd_timeout     = 30\n"
        r"    stop_command    = {4}\n"
        r"    stop_command_6  = {4}\n"
        .format(re.escape("echo +%IP% > /proc/net/xt_recent/knockd_rotator_22"),
                "KNOCKD_ROTATOR_[A-Z_]+=('[^']*'|[^ ]+)( KNOCKD_ROTATOR_[A-Z_]+=('[^']*'|[^ ]+))*",
                re.escape(str(SERVER)), re.escape(str(enrol.config)),
                re.escape("echo -%IP% > /proc/net/xt_recent/knockd_rotator_22"),
                re.escape(gate), "%d:0" % generator.period_start(time.time(), 31622400)),
        door), door
    # The printed lines make the client compute the door's sequence.
    held = knockd_config.door_sequences(knockd_config.parse_config(enrol.config.read_bytes()))
    generated = run_client("gen", "alice_ssh", env=client_env(lines))
    assert generated.stdout == held["alice_ssh_ROTATOR"].decode() + "\n"

    listed = enrol.run("list-clients")
    assert listed.returncode == 0
    assert re.search(r"alice +alice_ssh_ROTATOR +secret +no +own +31622400 +0 +knockd\n",
                     listed.stdout)
    assert re.search(r"- +ssh_ROTATOR +secret +no +shared +31622400 +- +knockd\n",
                     listed.stdout)
    assert secret not in listed.stdout + listed.stderr and SECRET not in listed.stdout

    removed = enrol.run("remove-client", "alice")
    assert removed.returncode == 0, removed.stderr
    config, env_data, temporaries = enrol.files()
    assert env_data == before[1] and temporaries == []
    assert b"alice" not in config
    assert knockd_config.rotator_doors(knockd_config.parse_config(config)) == ["ssh_ROTATOR"]
    assert config.replace(held["ssh_ROTATOR"], b"1") == before[0]


def test_add_client_with_a_pin_and_the_qr_code(enrol):
    need(shutil.which("qrencode"), "needs qrencode (run tests/run to install it)")
    added = enrol.run("add-client", "bob", "--service", "web", "--port", "8443", "--firewall",
                      "iptables", "--pin", input=b"ab12-cd-ef-7\n")
    assert added.returncode == 0, added.stderr
    values = core_settings.env_values(enrol.env_file.read_bytes())
    assert values["KNOCKD_ROTATOR_PIN_BOB_WEB"] == "ab12-cd-ef-7"
    lines = client_lines(added.stdout)
    assert "KNOCKD_ROTATOR_SECRET_BOB_WEB" in lines
    assert not [name for name in lines if "PIN" in name], "the PIN is never printed"
    assert "ab12-cd-ef-7" not in added.stdout + added.stderr
    assert added.stdout.rstrip().endswith("--check 8443 --pin")
    # The QR code is qrencode's drawing of exactly the printed lines.
    text = "".join("%s=%s\n" % pair for pair in lines.items())
    drawn = subprocess.run(["qrencode", "-t", "ANSIUTF8", "-m", "4"], input=text.encode(),
                           capture_output=True, check=True).stdout.decode()
    assert drawn.count("\n") > 20 and "█" in drawn
    assert drawn in added.stdout


def test_without_qrencode_it_says_how_to_get_it(enrol, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("iptables") or "/usr/sbin/iptables", bin_dir / "iptables")
    env = dict(enrol.env, PATH=str(bin_dir))
    added = enrol.run("add-client", "carol", "--firewall", "iptables", env=env)
    assert added.returncode == 0, added.stderr
    assert "no QR code: qrencode is not installed; apt install qrencode" in added.stdout
    assert "█" not in added.stdout


def test_add_client_in_totp_mode_prints_the_otpauth_uri(enrol):
    added = enrol.run("add-client", "dave", "--firewall", "iptables", "--totp", "--pin",
                      "--host", "srv", input=b"dave-pin-2468\n")
    assert added.returncode == 0, added.stderr
    uri = re.search(r"otpauth://\S+(?=\))", added.stdout).group(0)
    secret = core_settings.env_values(enrol.env_file.read_bytes())["KNOCKD_ROTATOR_SECRET_DAVE_SSH"]
    assert uri == ("otpauth://totp/knockd-rotator:dave_ssh_ROTATOR%40srv?secret=" + secret +
                   "&issuer=knockd-rotator&algorithm=SHA1&digits=6&period=30")
    assert len(base64.b32decode(secret)) == 20
    assert client_lines(added.stdout) == {"KNOCKD_ROTATOR_MODE_DAVE_SSH": "totp",
                                          "KNOCKD_ROTATOR_SINGLE_USE_DAVE_SSH": "1"}, \
        "a totp door's period is 30 s whatever the server's general period"
    assert "knock srv dave_ssh --code - --check 22" in added.stdout
    listed = enrol.run("list-clients")
    assert re.search(r"dave +dave_ssh_ROTATOR +totp +yes +own +30", listed.stdout)
    assert secret not in listed.stdout


@pytest.mark.parametrize("case", ["twice", "twice, other service", "invalid name",
                                  "invalid service", "missing firewall", "no nft set",
                                  "env readable", "short pin", "totp without a pin",
                                  "reload fails",
                                  "remove, reload fails", "variable taken",
                                  "remove unknown", "config readable", "line break in a setting",
                                  "line break in PATH"])
def test_errors_change_nothing(enrol, tmp_path, case):
    if case.startswith("twice") or case == "remove, reload fails":
        assert enrol.run("add-client", "alice", "--firewall", "iptables").returncode == 0
    if case == "env readable":
        enrol.env_file.chmod(0o644)
    if case == "config readable":
        enrol.config.chmod(0o640)
    if case == "variable taken":
        with open(enrol.env_file, "a") as handle:
            handle.write("KNOCKD_ROTATOR_PIN_ERIN_SSH=1234\n")
    before = enrol.files()
    env = dict(enrol.env)
    args = {"invalid name": ["add-client", "al ice", "--firewall", "iptables"],
            "invalid service": ["add-client", "erin", "--service", "s_sh", "--firewall",
                                "iptables"],
            "twice, other service": ["add-client", "alice", "--service", "web", "--firewall",
                                     "iptables"],
            "missing firewall": ["add-client", "erin", "--firewall", "ufw"],
            "no nft set": ["add-client", "erin", "--firewall", "nftables", "--port", "2"],
            "short pin": ["add-client", "erin", "--firewall", "iptables", "--pin"],
            "totp without a pin": ["add-client", "erin", "--firewall", "iptables", "--totp"],
            "remove unknown": ["remove-client", "zoe"],
            "remove, reload fails": ["remove-client", "alice"]}.get(
        case, ["add-client", "alice" if case == "twice" else "erin", "--firewall", "iptables"])
    if case == "missing firewall":
        env["PATH"] = str(tmp_path)
    if case == "no nft set":
        need(shutil.which("nft"), "needs nft (run tests/run to install it)")
        # An nft that knows no set, as on a host whose ruleset lacks it.
        fake = tmp_path / "nft"
        fake.write_text("#!/bin/sh\necho 'Error: No such file or directory' >&2\nexit 1\n")
        fake.chmod(0o755)
        env["PATH"] = str(tmp_path)
    if "reload fails" in case:
        env.update(KNOCKD_ROTATOR_RELOAD_COMMAND="false")
    # Each would add a start_command of its own to the new door, which knockd
    # runs (as root) at the client's knock, instead of the burn.
    injected = "\n    start_command = touch %s" % (tmp_path / "injected")
    if case == "line break in a setting":
        env["KNOCKD_ROTATOR_CHECK_COMMAND"] = "true" + injected
    if case == "line break in PATH":
        folder = tmp_path / ("bin" + injected.replace("/", "_"))
        folder.mkdir()
        os.symlink(shutil.which("iptables") or "/bin/true", folder / "iptables")
        env["PATH"] = "%s:%s" % (folder, env["PATH"])
    result = enrol.run(*args, env=env, input=b"12\n")
    expected = {"reload fails": 1, "remove, reload fails": 1, "missing firewall": 3,
                "no nft set": 3, "env readable": 3, "config readable": 4,
                "line break in a setting": 3, "line break in PATH": 3}.get(case, 2)
    assert result.returncode == expected, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].endswith(")"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    words = {"twice": "client alice is enrolled already",
             "twice, other service": "client alice is enrolled already",
             "invalid name": "invalid client name 'al ice'",
             "invalid service": "invalid service name 's_sh'",
             "missing firewall": "ufw is not installed (no ufw in PATH) (install it: apt "
                                 "install ufw",
             "no nft set": "the nftables set inet filter knockd_rotator_2 does not exist",
             "env readable": "is readable by others, and would hold a client's secret",
             "short pin": "the PIN must have at least 10 characters",
             "totp without a pin": "a totp door needs a PIN",
             "reload fails": "knockd did not take the new",
             "remove, reload fails": "knockd did not take the new",
             "variable taken": "sets KNOCKD_ROTATOR_PIN_ERIN_SSH already",
             "remove unknown": "no client zoe in",
             "config readable": "is readable by others, and would hold the client's live "
                                "sequences",
             "line break in a setting": "KNOCKD_ROTATOR_CHECK_COMMAND holds a line break",
             "line break in PATH": "holds a line break or another character that is not "
                                   "printable, and would go into knockd.conf"}[case]
    assert words in errors[0], errors[0]
    assert enrol.files() == before


def test_an_acl_on_knockd_conf_is_named_and_so_is_its_fix(enrol):
    """The README's monitoring advice was `setfacl -m u:nagios:r` on
    knockd.conf: every rotation then warned, and add-client refused, both
    saying `chmod 600`, which only masks the entry.  The live sequences open
    the doors: the advice is now a sudo rule for `status`, and the check
    names the ACL's own fix, which it then accepts."""
    need(shutil.which("setfacl"), "needs setfacl (run tests/run to install acl)")
    subprocess.run(["setfacl", "-m", "u:nobody:r", str(enrol.config)], check=True)
    fix = "setfacl -b %s; chmod 600 %s" % (enrol.config, enrol.config)
    before = enrol.files()
    refused = enrol.run("add-client", "erin", "--firewall", "iptables")
    assert refused.returncode == core_errors.EXIT_CONFIG, refused.stderr
    assert "(%s)" % fix in refused.stderr and enrol.files() == before
    rotated = enrol.run()
    assert rotated.returncode == 0, rotated.stderr
    assert "others can read the live sequences (%s)" % fix in rotated.stderr, rotated.stderr
    subprocess.run(fix, shell=True, check=True)
    added = enrol.run("add-client", "erin", "--firewall", "iptables")
    assert added.returncode == 0 and "others can read" not in added.stderr, added.stderr


# ---------------------------------------------------------------- with knockd

def knockd_server_env(enrol, knockd):
    return dict(enrol.env, KNOCKD_ROTATOR_RELOAD_COMMAND="kill -HUP %d" % knockd.pid,
                KNOCKD_ROTATOR_CHECK_COMMAND=alive_command(knockd.pid),
                KNOCKD_ROTATOR_CHECK_SECONDS="1")


def knock(netns, service, env, *args, clock=None, **kwargs):
    prefix = ["faketime", clock] if clock else ()
    return run_client("knock", "127.0.0.1", service, "--check", GUARDED_PORT, "--check-timeout",
                      "2", *args, env=env, netns=netns.name, prefix=prefix, **kwargs)


def client_env(lines):
    """Only what add-client printed: the client's own environment."""
    return dict(rotator_env(SECRET=None), **lines)


def opened(knockd, door):
    """How often DOOR opened, or its grace sibling: within the server's lead
    before a boundary the client's sequence is the sibling's."""
    return len(re.findall(r": %s(?:_GRACE)?: OPEN SESAME" % door, knockd.log_text()))


def test_two_enrolled_clients_each_open_only_their_own_door(enrol, guarded, start_knockd):
    need_root_and("knockd", "iptables")
    knockd = start_knockd(BASE_CONFIG.decode().split("\n", 2)[2])
    enrol.config = knockd.config
    enrol.env = knockd_server_env(enrol, knockd)
    assert enrol.run().returncode == 0
    knockd.wait_log(r"re-reading config file", "the first reload")
    alice = enrol.run("add-client", "alice", "--firewall", "iptables", "--port", GUARDED_PORT,
                      "--pin", input=b"7531-river-9\n")
    bob = enrol.run("add-client", "bob", "--firewall", "iptables", "--port", GUARDED_PORT)
    assert alice.returncode == bob.returncode == 0, alice.stderr + bob.stderr
    knockd.wait_log(r"re-reading config file", "the reloads of add-client", count=3)
    alice_env = client_env(client_lines(alice.stdout))
    bob_env = client_env(client_lines(bob.stdout))

    # Knocks that must open nothing: a wrong PIN, no PIN, and one client's
    # secret on the other's door.
    wrong_pin = knock(guarded, "alice_ssh", alice_env, "--pin", input=b"7532-river-9\n")
    no_pin = knock(guarded, "alice_ssh", alice_env)
    bob_as_alice = knock(guarded, "alice_ssh", dict(
        bob_env, KNOCKD_ROTATOR_SECRET_ALICE_SSH=bob_env["KNOCKD_ROTATOR_SECRET_BOB_SSH"]))
    alice_as_bob = knock(guarded, "bob_ssh", dict(
        alice_env, KNOCKD_ROTATOR_SECRET_BOB_SSH=alice_env["KNOCKD_ROTATOR_SECRET_ALICE_SSH"]))
    for result in (wrong_pin, no_pin, bob_as_alice, alice_as_bob):
        assert result.returncode == 1 and "did not open" in result.stderr, result.stderr
    assert "OPEN SESAME" not in knockd.log_text()

    reloads = knockd.log_text().count("re-reading config file")
    right = knock(guarded, "alice_ssh", alice_env, "--pin", input=b"7531-river-9\n")
    assert right.returncode == 0, right.stderr
    assert (opened(knockd, "alice_ssh_ROTATOR"), opened(knockd, "bob_ssh_ROTATOR")) == (1, 0)
    # Alice's door is single-use: its burn reloads knockd, which drops a knock
    # in progress; bob knocks after it (his --check cannot tell, the port
    # being open for alice's address already).
    knockd.wait_log(r"re-reading config file", "alice's burn", count=reloads + 1)
    bob_knock = knock(guarded, "bob_ssh", bob_env)
    assert bob_knock.returncode == 0, bob_knock.stderr
    # The port is open already (alice's door): knockd's log tells the doors apart.
    knockd.wait_log(r"bob_ssh_ROTATOR(_GRACE)?: OPEN SESAME", "bob's door")
    assert (opened(knockd, "alice_ssh_ROTATOR"), opened(knockd, "bob_ssh_ROTATOR")) == (1, 1)

    # Removed: bob's sequence no longer opens anything.
    assert enrol.run("remove-client", "bob").returncode == 0
    knockd.wait_log(r"re-reading config file", "the reload of remove-client", count=4)
    knock(guarded, "bob_ssh", bob_env, "--check-timeout", "1")
    # knockd handles packets in order: once alice's next knock is logged, a
    # door that bob's knock opened would have been logged before it.
    assert knock(guarded, "alice_ssh", alice_env, "--pin", input=b"7531-river-9\n").returncode == 0
    knockd.wait_log(r"alice_ssh_ROTATOR(_GRACE)?: OPEN SESAME", "alice's second knock",
                    count=2)
    assert opened(knockd, "bob_ssh_ROTATOR") == 1


def independent_totp(secret, moment):
    """RFC 6238 written here, apart from the server's code."""
    digest = hmac.new(base64.b32decode(secret), struct.pack(">Q", int(moment) // 30),
                      hashlib.sha1).digest()
    offset = digest[-1] & 15
    return "%06d" % ((struct.unpack(">L", digest[offset:offset + 4])[0] & 0x7FFFFFFF) % 1000000)


def test_totp_door_opens_with_the_authenticator_code(enrol, guarded, start_knockd):
    """Server and client run at a fixed moment 2 s into a 30 s period."""
    need_root_and("knockd", "iptables", "faketime")
    moment = 1794993602
    clock = "2026-11-18 09:20:02"         # that moment in UTC; the clocks run on from it
    knockd = start_knockd(BASE_CONFIG.decode().split("\n", 2)[2])
    enrol.config = knockd.config
    env = dict(knockd_server_env(enrol, knockd), TZ="UTC")
    added = run_server("--config", knockd.config, "add-client", "carol", "--firewall", "iptables",
                       "--port", GUARDED_PORT, "--totp", "--pin", env=env, input=b"2580-river-9\n",
                       prefix=["faketime", clock])
    assert added.returncode == 0, added.stderr
    knockd.wait_log(r"re-reading config file", "the reload of add-client")
    secret = core_settings.env_values(enrol.env_file.read_bytes())["KNOCKD_ROTATOR_SECRET_CAROL_SSH"]
    code = independent_totp(secret, moment)
    carol = dict(client_env(client_lines(added.stdout)), TZ="UTC")
    assert "KNOCKD_ROTATOR_SECRET_CAROL_SSH" not in carol, "the phone holds no secret"

    wrong = "%06d" % ((int(code) + 1) % 1000000)
    for bad in (["--code", wrong, "--pin"], ["--code", code]):
        result = knock(guarded, "carol_ssh", carol, *bad, clock=clock, input=b"2580-river-9\n")
        assert result.returncode == 1, result.stderr
    assert "OPEN SESAME" not in knockd.log_text()
    typed = knock(guarded, "carol_ssh", carol, "--code", "-", "--pin", clock=clock,
                  input=("2580-river-9\n%s\n" % code).encode())
    assert typed.returncode == 0, typed.stderr
    assert opened(knockd, "carol_ssh_ROTATOR") == 1


NFT_RULESET = """
table inet filter {
    set knockd_rotator_%(port)d { type ipv4_addr; flags timeout; }
    set knockd_rotator_%(port)d_6 { type ipv6_addr; flags timeout; }
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        ip saddr @knockd_rotator_%(port)d tcp dport %(port)d accept
        ip6 saddr @knockd_rotator_%(port)d_6 tcp dport %(port)d accept
        tcp dport %(port)d drop
    }
}
""" % {"port": GUARDED_PORT}


def test_nftables_door_opens_through_its_set(enrol, netns, start_knockd, tmp_path):
    need_root_and("knockd", "nft")
    ruleset = tmp_path / "ruleset.nft"
    ruleset.write_text(NFT_RULESET)
    from test_doors import listen_both
    listener = listen_both(netns, GUARDED_PORT)
    try:
        for host in ("127.0.0.1", "::1"):
            wait_until(lambda: netns.tcp_open(GUARDED_PORT, host), 10, "the listener")
        netns.run("nft", "-f", ruleset)
        assert not netns.tcp_open(GUARDED_PORT)
        knockd = start_knockd(BASE_CONFIG.decode().split("\n", 2)[2])
        enrol.config = knockd.config
        env = knockd_server_env(enrol, knockd)
        added = run_server("--config", knockd.config, "add-client", "erin", "--firewall",
                           "nftables", "--port", GUARDED_PORT, env=env, netns=netns.name)
        assert added.returncode == 0, added.stderr
        knockd.wait_log(r"re-reading config file", "the reload of add-client")
        assert "add element inet filter knockd_rotator_%d { %%IP%% timeout 30s }" % GUARDED_PORT \
            in knockd.config.read_text()
        assert not netns.tcp_open(GUARDED_PORT, "::1"), "closed on IPv6 too"
        erin = client_env(client_lines(added.stdout))
        result = knock(netns, "erin_ssh", erin)
        assert result.returncode == 0, result.stderr
        elements = netns.run("nft", "list", "set", "inet", "filter",
                             "knockd_rotator_%d" % GUARDED_PORT).stdout
        assert "127.0.0.1" in elements and "expires" in elements
        # The door is single-use: its burn reloads knockd, which drops a knock
        # in progress; then a knock over IPv6 opens the port for ::1.
        knockd.wait_log(r"re-reading config file", "erin's burn", count=2)
        assert not netns.tcp_open(GUARDED_PORT, "::1")
        six = run_client("knock", "::1", "erin_ssh", "-6", "--check", GUARDED_PORT,
                         "--check-timeout", "3", env=erin, netns=netns.name)
        assert six.returncode == 0, six.stderr
        assert "::1" in netns.run("nft", "list", "set", "inet", "filter",
                                  "knockd_rotator_%d_6" % GUARDED_PORT).stdout
    finally:
        listener.kill()
        listener.wait()


def test_totp_door_under_watch_rotates_every_30_s_and_takes_a_late_code(
        tmp_path, guarded, start_knockd, watch):
    """--watch with a totp door: just after a boundary, this period's code
    opens the door, and the previous period's code, typed late, opens it on
    the client's retry, through the grace sibling."""
    from test_rotation_knockd import close_door, reloads, wait_for_moment
    from test_server_knockd import DOOR
    ssh = DOOR.format(port=GUARDED_PORT, cmd_timeout=120)
    knockd = start_knockd(ssh + ssh.replace("[ssh_ROTATOR]", "[carol_ssh_ROTATOR]"))
    secret = base64.b32encode(os.urandom(20)).decode()
    env_file = tmp_path / "absent.env"         # the ENV_FILE of server_env
    env_file.write_text("KNOCKD_ROTATOR_SECRET_CAROL_SSH=%s\nKNOCKD_ROTATOR_MODE_CAROL_SSH=totp\n"
                        "KNOCKD_ROTATOR_PIN_CAROL_SSH=2580-river-9\nKNOCKD_ROTATOR_GRACE_CAROL_SSH=15\n"
                        % secret)
    env_file.chmod(0o600)
    server, _ = watch(knockd, 3600, 0)       # the ssh door: no grace; carol's: 15 s
    boundary = wait_for_moment(30, 1, 3)
    # The block of this boundary's grace is in.
    wait_until(lambda: "removed at %d" % (boundary + 15) in knockd.config.read_text(), 3,
               "the boundary's rotation")
    knockd.wait_log(r"re-reading config file", "knockd to load it", count=reloads(knockd))
    carol = client_env({"KNOCKD_ROTATOR_MODE_CAROL_SSH": "totp"})

    now = knock(guarded, "carol_ssh", carol, "--code", independent_totp(secret, boundary),
                "--pin", input=b"2580-river-9\n")
    assert now.returncode == 0, now.stderr + server.text()
    assert "knocking again" not in now.stderr
    knockd.wait_log(r"carol_ssh_ROTATOR: OPEN SESAME", "the current code's door")
    close_door(guarded)

    late = knock(guarded, "carol_ssh", carol, "--code", independent_totp(secret, boundary - 30),
                 "--pin", input=b"2580-river-9\n")
    assert late.returncode == 0, late.stderr + server.text()
    assert "knocking again with the previous period's sequence" in late.stderr
    knockd.wait_log(r"carol_ssh_ROTATOR_GRACE: OPEN SESAME", "the grace sibling")
    assert server.stop() == 0


def test_a_boundary_run_derives_its_keys_before_it_sleeps(tmp_path, server_env, monkeypatch):
    """Timer mode: each run is a process of its own, so the boundary run that
    sleeps until an event derives the PIN doors' keys first (derive_keys), and
    its rotation at the event derives none, PIN or totp."""
    derived = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac",
                        lambda *args: derived.append(args[2]) or real(*args))
    monkeypatch.setattr(core_settings, "KEY_CACHE", {})
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"".join(b"[c%d_ROTATOR]\n\tstart_command = true\n" % i
                                for i in range(20)))
    env = server_env(PIN="2468-1357", PERIOD_MODULO=60)
    env.update(KNOCKD_ROTATOR_MODE_C0="totp",
               KNOCKD_ROTATOR_SECRET_C0="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    moment = (int(time.time()) // 60 + 5) * 60 + 3
    scheduling.derive_keys(str(config), env, moment)
    assert len(derived) == 20 + 1, "each door's key, and the totp door's of the previous period"
    before = len(derived)
    plan = knockd_render.plan_rotation(str(config), config.read_bytes(), moment,
                                core_settings.settings_reader(env))
    assert len(derived) == before, "the rotation at the moment derived a key again"
    assert len(plan.current) == 20
    scheduling.derive_keys(str(tmp_path / "missing.conf"), env, moment)    # no error escapes


def test_the_watch_derives_a_pin_door_s_key_once(monkeypatch):
    """PBKDF2 per PIN door and rotation made 1000 PIN doors cost seconds a
    rotation; the watch keeps the keys in memory (and only there)."""
    derived = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac",
                        lambda *args: derived.append(args[2]) or real(*args))
    monkeypatch.setattr(core_settings, "KEY_CACHE", {})
    env = {"KNOCKD_ROTATOR_SECRET": SECRET, "KNOCKD_ROTATOR_PIN": "2468-1357",
           "KNOCKD_ROTATOR_PERIOD_MODULO": "60"}
    data = b"".join(b"[c%d_ROTATOR]\n\tstart_command = true\n" % i for i in range(20))
    first = knockd_render.plan_rotation("k.conf", data, 6000, core_settings.settings_reader(env))
    later = knockd_render.plan_rotation("k.conf", data, 6060, core_settings.settings_reader(env))
    assert len(derived) == 20, "one key per door, for every rotation"
    assert first.current != later.current
    fresh = core_settings.settings_reader(env)("c3_ROTATOR")
    assert generator.door_key(fresh, SECRET.encode()) == core_settings.KEY_CACHE[
        ("c3_ROTATOR", "secret", b"2468-1357", SECRET.encode())]
