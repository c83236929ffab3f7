"""Interoperability with software nobody here wrote (issue 17), with real
knockd in a test namespace:

- the codes of oathtool and pyotp, the authenticator apps' algorithm as
  others implement it, open a totp door through the client's `--code -`;
- knockd's own C `knock` client, over IPv6, opens docs/DOORS.md's iptables door
  with the sequence of `generate --format knock`."""

import base64
import os
import shlex
import shutil
import subprocess
import time

import pytest

from conftest import (GUARDED_PORT, accept_rules, need, need_root_and, run_client,
                      run_server, wait_until)
from test_clients import client_env, independent_totp, knock, opened
from test_doors import PORT, listen_both, localized, readme_blocks
from test_rotation_knockd import wait_for_moment
from test_server_knockd import DOOR, knockd_env

PIN = "2580-river-9"


def oathtool_code(secret, moment):
    return subprocess.run(["oathtool", "--totp", "-b", "--now",
                           time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment)), secret],
                          capture_output=True, text=True, check=True).stdout.strip()


def oathtool_now(secret):
    """oathtool's code on its own clock, as a user would run it."""
    return subprocess.run(["oathtool", "--totp", "-b", secret], capture_output=True, text=True,
                          check=True).stdout.strip()


def pyotp_module():
    try:
        import pyotp
    except ImportError:
        need(False, "needs pyotp (Debian's python3-pyotp; run tests/run to install it)")
    return pyotp


def external_code(tool, secret, moment=None):
    """TOOL's code for SECRET now (on the tool's own clock), or at MOMENT."""
    if tool == "oathtool":
        return oathtool_now(secret) if moment is None else oathtool_code(secret, moment)
    totp = pyotp_module().TOTP(secret)
    return totp.now() if moment is None else totp.at(moment)


@pytest.mark.parametrize("tool", ["oathtool", "pyotp"])
def test_an_external_totp_code_opens_a_totp_door(tool, tmp_path, guarded, start_knockd,
                                                 server_env):
    need_root_and("knockd", "iptables", *(["oathtool"] if tool == "oathtool" else []))
    if tool == "pyotp":
        pyotp_module()
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=60).replace(
        "[ssh_ROTATOR]", "[carol_ssh_ROTATOR]"))
    secret = base64.b32encode(os.urandom(20)).decode()
    env_file = tmp_path / "rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_SECRET_CAROL_SSH=%s\nKNOCKD_ROTATOR_MODE_CAROL_SSH=totp\n"
                        "KNOCKD_ROTATOR_PIN_CAROL_SSH=%s\n" % (secret, PIN))
    env_file.chmod(0o600)
    env = knockd_env(server_env, knockd, ENV_FILE=env_file)
    carol = client_env({"KNOCKD_ROTATOR_MODE_CAROL_SSH": "totp"})

    # Well inside a 30 s period (never its last seconds), so that the server's
    # rotation, the tool's code and the client's knocks share one period.
    start = wait_for_moment(30, 1, 14)
    rotated = run_server("--config", knockd.config, env=env)
    assert rotated.returncode == 0, rotated.stderr
    knockd.wait_log(r"re-reading config file", "the rotation's reload")
    code = external_code(tool, secret)
    assert code == independent_totp(secret, time.time()), "RFC 6238, as the tool computes it"
    assert len(code) == 6 and code.isdigit(), code

    # The tool's code of the next period does not open the door.
    later = external_code(tool, secret, start + 30)
    assert later != code
    wrong = knock(guarded, "carol_ssh", carol, "--code", "-", "--pin",
                  input=("%s\n%s\n" % (PIN, later)).encode())
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "OPEN SESAME" not in knockd.log_text() and not accept_rules(guarded)

    right = knock(guarded, "carol_ssh", carol, "--code", "-", "--pin",
                  input=("%s\n%s\n" % (PIN, code)).encode())
    assert right.returncode == 0, right.stdout + right.stderr + knockd.log_text()
    assert "port %d on 127.0.0.1 open after" % GUARDED_PORT in right.stdout
    assert "knocking again" not in right.stderr, "the current period's sequence opened"
    assert opened(knockd, "carol_ssh_ROTATOR") == 1
    assert accept_rules(guarded)
    assert time.time() < start + 30, "the test ran past its period: the codes may differ"


@pytest.mark.parametrize("moment", [0, 59, 1111111109, 1234567890, 2000000000, 20000000000])
def test_oathtool_and_pyotp_agree_with_rfc6238(moment):
    """Both tools against the RFC 6238 code written in the tests, at fixed
    moments (the knocks above use whatever moment the test runs at)."""
    need(shutil.which("oathtool"), "needs oathtool (run tests/run to install it)")
    secret = base64.b32encode(b"12345678901234567890").decode()
    expected = independent_totp(secret, moment)
    assert oathtool_code(secret, moment) == expected
    assert pyotp_module().TOTP(secret).at(moment) == expected


def test_knockd_s_c_knock_opens_the_readme_door_over_ipv6(netns, start_knockd, server_env,
                                                          tmp_path):
    """`knock -6 ::1 $(knockd_rotator_client.py gen ssh --format knock)`, as the
    README shows it, opens the door for ::1 through its start_command_6."""
    need_root_and("knockd", "knock", "iptables", "ip6tables")
    rules, door = readme_blocks("iptables")
    assert "start_command_6" in door
    listener = listen_both(netns, PORT)
    try:
        for host in ("127.0.0.1", "::1"):
            wait_until(lambda: netns.tcp_open(PORT, host), 10, "the listener on " + host)
        for block in rules:
            for line in localized(block).splitlines():
                netns.run(*shlex.split(line))
        # A new door has no sequence, and knockd refuses it: the first rotation
        # writes one, then knockd starts (README, Install on a server).
        fresh = tmp_path / "fresh.conf"
        fresh.write_text(localized(door))
        env = server_env()
        rotated = run_server("--config", fresh, env=env)
        assert rotated.returncode == 0, rotated.stderr
        knockd = start_knockd(fresh.read_text())
        assert "sequence" in knockd.config.read_text()
        for host in ("127.0.0.1", "::1"):
            assert not netns.tcp_open(PORT, host), "closed before the knock: " + host

        generated = run_client("generate", "ssh", "--format", "knock", env=env)
        assert generated.returncode == 0, generated.stderr
        ports = generated.stdout.split()
        assert len(ports) >= 3 and all(p.split(":")[1] in ("tcp", "udp") for p in ports), ports
        netns.run("knock", "-6", "::1", *ports)
        wait_until(lambda: netns.tcp_open(PORT, "::1"), 3, "the door to open for ::1")
        knockd.wait_log(r"::1: ssh_ROTATOR(_GRACE)?: OPEN SESAME",
                        "knockd's log of the IPv6 knock")
        assert "running command" in knockd.log_text()
        assert not netns.tcp_open(PORT, "127.0.0.1"), "an IPv6 knock opens only IPv6"
    finally:
        listener.kill()
        listener.wait()
