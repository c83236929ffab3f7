"""docs/DOORS.md's doors, which add-client writes, with real knockd in a network
namespace: IPv4 and IPv6 knocks, and holes that close by themselves.

The door texts and the iptables rules come from docs/DOORS.md itself (port and
timeouts changed), so that the docs cannot drift from what is tested. The
README's first door is the iptables one, copied from there."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from knockd_rotator.clients import firewalls
from knockd_rotator.clients import knockd as manage
from conftest import ROOT, need_root_and, run_server, wait_until

PORT = 2223
SECONDS = 4                       # the doors' cmd_timeout in the tests
SEQUENCE = ["7101", "7103", "7102"]
PROGRAMS = {"iptables": "iptables", "nftables": "nft", "ufw": "ufw"}


def readme_blocks(firewall):
    """(blocks before the door, the door) of FIREWALL in docs/DOORS.md: the
    indented blocks of the paragraph that starts with 'FIREWALL:', without
    their 4-space indent."""
    doors = (ROOT / "docs" / "DOORS.md").read_text()
    text = doors[doors.index("\n%s: " % firewall):]
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("    "):
            current = current if current is not None else []
            current.append(line[4:])
        elif current is not None:
            blocks.append("\n".join(current) + "\n")
            current = None
            if blocks[-1].startswith("[ssh_ROTATOR]"):
                return blocks[:-1], blocks[-1]
    raise AssertionError("no door for %s in docs/DOORS.md" % firewall)


def localized(text):
    """TEXT on PORT with SECONDS instead of port 22 and 30 s."""
    text, ports = re.subn(r"(?<![0-9])22(?![0-9])", str(PORT), text)
    text = re.sub(r"(?<![0-9])30(?![0-9])", str(SECONDS), text)
    assert ports, text
    return text


@pytest.mark.parametrize("firewall", sorted(firewalls.FIREWALLS))
def test_readme_doors_are_the_ones_add_client_writes(firewall):
    _, door = readme_blocks(firewall)
    program = "/usr/sbin/%s" % PROGRAMS[firewall]
    commands = firewalls.door_commands(firewall, program, 22, 30)
    written = [line.decode().rstrip("\n") for line in
               manage.client_door_lines("alice", "ssh_ROTATOR", commands, b"\n")]
    assert door.splitlines() == written[2:]
    assert door.count("%IP%") == 4 and "start_command_6" in door and "stop_command_6" in door


def test_readme_iptables_rules_are_the_ones_add_client_prints():
    rules, _ = readme_blocks("iptables")
    assert len(rules) == 1
    assert [" ".join(line.split()) for line in rules[0].splitlines()] == \
        firewalls.firewall_rules("iptables", 22, 30)


def test_readme_first_door_is_the_tested_iptables_door():
    """The README's first door is docs/DOORS.md's iptables rules and door, as
    they stand (the README copies them; these tests run docs/DOORS.md's)."""
    readme = (ROOT / "README.md").read_text()
    rules, door = readme_blocks("iptables")
    for block in rules + [door]:
        assert "".join("    %s\n" % line for line in block.splitlines()) in readme, block


def listen_both(netns, port):
    """A TCP listener on 127.0.0.1 and ::1 (one dual-stack socket), PORT."""
    return netns.popen(sys.executable, "-c",
                       "import socket\ns = socket.socket(socket.AF_INET6)\n"
                       "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
                       "s.bind(('::', %d))\ns.listen(16)\n"
                       "while True: s.accept()[0].close()\n" % port)


def kill_knockd(netns):
    """SIGKILL knockd and its children (which would run stop_command), as
    systemd does to a knockd that dies under KillMode=mixed."""
    pids = subprocess.run(["ip", "netns", "pids", netns.name], capture_output=True,
                          text=True).stdout.split()
    killed = 0
    for pid in pids:
        try:
            with open("/proc/%s/comm" % pid) as handle:
                if handle.read().strip() != "knockd":
                    continue
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError):
            pass
    return killed


@pytest.mark.parametrize("firewall", ["iptables", "nftables"])
def test_readme_door_opens_per_family_and_closes_after_sigkill(firewall, netns, start_knockd,
                                                              tmp_path):
    need_root_and("knockd", "knock", PROGRAMS[firewall],
                  "ip6tables" if firewall == "iptables" else "nft")
    rules, door = readme_blocks(firewall)
    listener = listen_both(netns, PORT)
    try:
        for host in ("127.0.0.1", "::1"):
            wait_until(lambda: netns.tcp_open(PORT, host), 10, "the listener on " + host)
        for block in rules:
            if firewall == "nftables":
                netns.run("nft", "-f", "-", input=localized(block))
            else:
                for line in localized(block).splitlines():
                    netns.run(*shlex.split(line))
        for host in ("127.0.0.1", "::1"):
            assert not netns.tcp_open(PORT, host), "closed before the knock: " + host
        door = localized(door).replace(
            "[ssh_ROTATOR]\n", "[ssh_ROTATOR]\n    sequence        = %s\n" % ",".join(SEQUENCE))
        knockd = start_knockd(door)

        knocked = {}
        for host, family in (("127.0.0.1", "-4"), ("::1", "-6")):
            knocked[host] = time.monotonic()
            netns.run("knock", family, host, *SEQUENCE)
            wait_until(lambda: netns.tcp_open(PORT, host), 3, "the door to open for " + host)
            if host == "127.0.0.1":
                assert not netns.tcp_open(PORT, "::1"), "an IPv4 knock opens only IPv4"
        assert "running command" in knockd.log_text()

        assert kill_knockd(netns) >= 3, "knockd and the children of both doors"
        knockd.process.wait(5)
        elapsed = time.monotonic() - knocked["127.0.0.1"]
        assert elapsed < SECONDS - 1, "the test was too slow to kill knockd in time"
        for host in ("127.0.0.1", "::1"):
            assert netns.tcp_open(PORT, host), "still open within cmd_timeout: " + host
        for host in ("127.0.0.1", "::1"):
            # The kernel closes the hole: within cmd_timeout of its knock,
            # plus a margin for the polling.
            remaining = knocked[host] + SECONDS + 1.5 - time.monotonic()
            wait_until(lambda: not netns.tcp_open(PORT, host, timeout=0.2),
                       max(remaining, 0.1), "the hole for %s to expire" % host)
        log = knockd.log_text()
        stops = [line for line in door.splitlines() if "stop_command" in line]
        assert stops and all(stop.split("=", 1)[1].split("%IP%")[0].strip() not in log
                             for stop in stops), "no stop_command ran:\n" + log
        time.sleep(0.5)
        for host in ("127.0.0.1", "::1"):
            assert not netns.tcp_open(PORT, host)
    finally:
        listener.kill()
        listener.wait()


def test_check_warns_about_a_door_without_ipv6_commands(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_text(
        "[old_ROTATOR]\n\tsequence = 2000,4000,3000\n\ttcpflags = syn\n"
        "\tstart_command = iptables -I INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n"
        "\tcmd_timeout = 30\n"
        "\tstop_command = iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n"
        "[new_ROTATOR]\n" + readme_blocks("iptables")[1].split("\n", 1)[1] +
        "[plain_ROTATOR]\n\tstart_command = true\n\tstop_command = true\n")
    result = run_server("check", "--config", config, env=server_env())
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "start_command_6" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("warning: %s line 1: rotator door [old_ROTATOR] has no "
                                  "start_command_6" % config)
    assert "ip6tables -A INPUT -p tcp --dport PORT -j DROP" in warnings[0]
    assert warnings[0].endswith(")")
