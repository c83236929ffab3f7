"""The nftables engine under a real systemd: PID 1 in a container (test_systemd.py's
machinery), `./install.sh --engine nftables`, the README's steps with systemctl,
behind each of three host firewalls.

The container has a private network namespace (only lo): its firewall, the
table inet knockd_rotator and the listener on port 22 all live there; the
host's firewall is never touched.  Each host firewall lets port 22 through,
as docs/OPERATIONS.md says it must (the table only drops):
  - nftables: Debian's nftables.service with a drop policy and an accept for 22/tcp,
  - iptables: a DROP input policy and an accept for 22/tcp (IPv4 and IPv6),
  - ufw: `ufw allow 22/tcp`, `ufw enable`.
"""

import json
import re
import time

import pytest

from conftest import ROOT, wait_until
from test_systemd import (ENV_FILE, PROJECT, container, door_shut, knock, listen,  # noqa: F401
                          port_open, project, rootfs)

pytestmark = pytest.mark.container

SSH = 22
OPEN = 3                                  # the doors' open seconds
DOORS_FILE = "/etc/knockd_rotator.doors"
BOOT_UNIT = "knockd_rotator-nftables.service"
TABLE = "inet knockd_rotator"

NFTABLES_CONF = """#!/usr/sbin/nft -f
flush ruleset
table inet filter {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        tcp dport 22 accept
    }
}
"""
IPTABLES = ["%s -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "%s -A INPUT -p tcp --dport 22 -j ACCEPT",
            "%s -P INPUT DROP"]
UFW = ["ufw allow 22/tcp", "ufw --force enable"]


def host_firewall(box, kind):
    """The host's firewall, letting port 22 through and little else."""
    if kind == "nftables":
        box.write("/etc/nftables.conf", NFTABLES_CONF, mode=0o755)
        box.sh("systemctl enable --now nftables.service")
    elif kind == "iptables":
        for rule in IPTABLES:
            box.sh(rule % "iptables")
            box.sh(rule % "ip6tables")
    else:
        # The container's /proc/sys is read-only: ufw's sysctl settings are
        # the host's business here, not the test's.
        box.sh("sed -i 's|^IPT_SYSCTL=.*|IPT_SYSCTL=|' /etc/default/ufw")
        for command in UFW:
            box.sh(command)
        assert "Status: active" in box.sh("ufw status").stdout


def table_loaded(box):
    return box.sh("nft list table %s" % TABLE, check=False).returncode == 0


def shut_everywhere(box):
    return door_shut(box, SSH) and door_shut(box, SSH, "::1")


def installed_with_nftables(box, kind):
    """The host firewall, a listener on 22 (open through it), and
    `./install.sh --engine nftables`, as the README says."""
    host_firewall(box, kind)
    listen(box, SSH, dual_stack=True)
    assert port_open(box, SSH) and port_open(box, SSH, "::1"), "the firewall lets 22 through"
    result = box.sh("cd %s && ./install.sh --engine nftables" % PROJECT)
    assert "and KNOCKD_ROTATOR_ENGINE=nftables" in result.stdout, result.stdout
    assert box.path(DOORS_FILE).stat().st_mode & 0o777 == 0o600
    box.learn_secrets()
    return result


# ---------------------------------------------------------------- no server needed

def test_the_units_sandbox_lets_nft_load_the_table(container):
    """The boot unit's and the drop-ins' sandbox (host network, CAP_NET_ADMIN,
    AF_NETLINK, every other hardening line) lets `nft` load and read a table,
    and the boot unit follows nftables.service's restart and reload, which
    flush the ruleset; `ufw reload` and `iptables -F` leave the table alone.
    The server's own runs are test_nftables_engine's: here `nft` stands in
    for it, so this holds whatever the server does."""
    box = container
    installed_with_nftables(box, "ufw")
    box.write("/etc/knockd_rotator-test.nft", "table inet knockd_rotator {\n"
              "    chain input { type filter hook input priority filter - 10; }\n}\n")
    for unit in (BOOT_UNIT, "knockd_rotator.service", "knockd_rotator-watch.service"):
        command = "/usr/sbin/nft -f /etc/knockd_rotator-test.nft"
        if unit == "knockd_rotator-watch.service":
            command = "/bin/sh -c 'nft list table inet knockd_rotator && exec sleep 600'"
        box.sh("mkdir -p /etc/systemd/system/%s.d" % unit)
        box.write("/etc/systemd/system/%s.d/zz-test.conf" % unit,
                  "[Service]\nExecStart=\nExecStart=%s\nExecReload=\nExecReload=%s\n"
                  % (command, command))
    box.sh("systemctl daemon-reload")
    box.sh("systemctl enable --now %s" % BOOT_UNIT)
    assert table_loaded(box), box.journal(BOOT_UNIT)
    assert box.sh("systemctl is-enabled %s" % BOOT_UNIT).stdout.strip() == "enabled"
    wants = box.sh("ls /etc/systemd/system/sysinit.target.wants/").stdout
    assert BOOT_UNIT in wants, wants
    shown = box.show(BOOT_UNIT, "After", "Before", "PartOf", "CapabilityBoundingSet",
                     "PrivateNetwork", "RestrictAddressFamilies")
    assert "nftables.service" in shown["After"].split(), shown
    assert "network-pre.target" in shown["Before"].split(), shown
    assert shown["CapabilityBoundingSet"] == "cap_net_admin", shown
    assert shown["PrivateNetwork"] == "no", shown
    for unit in ("knockd_rotator.service", "knockd_rotator-watch.service"):
        shown = box.show(unit, "CapabilityBoundingSet", "PrivateNetwork", "ProtectSystem",
                         "RestrictAddressFamilies", "DropInPaths")
        assert shown["CapabilityBoundingSet"] == "cap_net_admin", (unit, shown)
        assert shown["PrivateNetwork"] == "no" and shown["ProtectSystem"] == "strict", shown
        assert sorted(shown["RestrictAddressFamilies"].split()) == ["AF_NETLINK", "AF_UNIX"], shown
    box.sh("nft delete table %s" % TABLE)
    box.sh("systemctl start knockd_rotator.service")
    assert table_loaded(box), box.journal("knockd_rotator.service")
    box.sh("systemctl start knockd_rotator-watch.service")
    wait_until(lambda: "table inet knockd_rotator" in box.journal(
        "knockd_rotator-watch.service"), 10, "the watch unit to read the table")
    pid = box.host_pid(int(box.show("knockd_rotator-watch.service", "MainPID")["MainPID"]))
    status = open("/proc/%d/status" % pid).read()
    assert re.search(r"^CapBnd:\s*0000000000001000$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s*1$", status, re.M) and \
        re.search(r"^Seccomp:\s*2$", status, re.M), status
    box.sh("systemctl stop knockd_rotator-watch.service")

    # ufw reloads (its iptables tables only) and an iptables flush: the table stays.
    box.sh("ufw reload")
    box.sh("iptables -F")
    assert table_loaded(box)
    box.sh("ufw --force disable")

    # nftables.service: its start (while the boot unit is active), restart,
    # reload, and a stop then a start flush the ruleset; the boot unit
    # follows each and loads the table again, after nftables.service's own.
    box.write("/etc/nftables.conf", NFTABLES_CONF, mode=0o755)
    for verbs in (["start"], ["restart"], ["reload"], ["stop", "start"]):
        before = box.journal(BOOT_UNIT).count("Finished knockd_rotator-nftables")
        for verb in verbs:
            box.sh("systemctl %s nftables.service" % verb)
        wait_until(lambda: box.journal(BOOT_UNIT).count("Finished knockd_rotator-nftables")
                   > before or "Reloaded knockd_rotator-nftables" in box.journal(BOOT_UNIT)
                   and verbs == ["reload"], 10, "the boot unit to follow %s nftables" % verbs)
        wait_until(lambda: table_loaded(box), 10, "the table back after %s nftables" % verbs)
        assert box.sh("nft list table inet filter", check=False).returncode == 0
    assert port_open(box, SSH), "nothing but our table guards in this test"

    # The units' exposure, as docs/SECURITY.md publishes it.
    box.sh("rm -r /etc/systemd/system/*.service.d/zz-test.conf && systemctl daemon-reload")
    result = box.sh("systemd-analyze security --no-pager %s knockd_rotator.service "
                    "knockd_rotator-watch.service" % BOOT_UNIT, check=False)
    scores = dict(re.findall(r"Overall exposure level for (\S+): (\d+\.\d+ \w+)",
                             result.stdout))
    print("exposure under the nftables engine:", scores)
    published = re.search(r"nftables engine.*?exposure\s+\*\*(\d+\.\d+ \w+)\*\*",
                          (ROOT / "docs" / "SECURITY.md").read_text(), re.S)
    assert published, "docs/SECURITY.md publishes no exposure for the nftables engine"
    assert set(scores.values()) == {published.group(1)} and len(scores) == 3, result.stdout

    # uninstall removes the table (and the guard with it).
    result = box.sh("cd %s && ./install.sh uninstall" % PROJECT)
    assert "removed the nftables table inet knockd_rotator" in result.stdout, result.stdout
    assert not table_loaded(box)
    assert box.sh("systemctl is-enabled %s" % BOOT_UNIT, check=False).stdout.strip() in (
        "", "not-found"), "disabled and gone"
    box.assert_no_secret_seen()


# ---------------------------------------------------------------- the server's engine

def status(box):
    result = box.sh("knockd_rotator_server.py status --json", check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("firewall", ["nftables", "iptables", "ufw"])
def test_nftables_engine(container, firewall):
    """docs/OPERATIONS.md "The nftables engine", behind FIREWALL: the table
    guards 22 (shut to new connections before a knock), the client's knock
    opens it for OPEN seconds and for its own address family only, an IPv6
    door opens over ::1 only, the table survives restarts of the units, and
    `./install.sh uninstall` removes it."""
    box = container
    installed_with_nftables(box, firewall)
    # A door for every client (over IPv4 or IPv6), and one over IPv6 only.
    box.write(DOORS_FILE, box.read(DOORS_FILE)
              + "ssh_ROTATOR guard=%d open=%d\n" % (SSH, OPEN)
              + "six_ROTATOR guard=%d open=%d family=ip6\n" % (SSH, OPEN))
    box.sh("knockd_rotator_server.py check")
    box.sh("systemctl enable --now %s" % BOOT_UNIT)
    mode = "knockd_rotator-watch.service" if firewall == "ufw" else "knockd_rotator.timer"
    box.sh("systemctl enable --now %s" % mode)
    if mode == "knockd_rotator.timer":
        box.sh("systemctl start knockd_rotator.service")
    assert table_loaded(box), box.journal(BOOT_UNIT)
    assert box.show(BOOT_UNIT, "Result")["Result"] == "success", box.journal(BOOT_UNIT)
    code, output = status(box)
    assert code == 0, output
    assert shut_everywhere(box), "port 22 is shut to new connections before a knock"

    # IPv4: the knock opens for 127.0.0.1 only, and shuts OPEN seconds later.
    knock(box, port=SSH)
    assert door_shut(box, SSH, "::1"), "an IPv4 knock opened IPv6"
    opened = time.monotonic()
    wait_until(lambda: door_shut(box, SSH), OPEN + 5, "the door to shut after %d s" % OPEN)
    assert time.monotonic() - opened > OPEN - 1.5

    # IPv6: the IPv6 door's sequence over IPv4 opens nothing; over ::1 it
    # opens for ::1 only; the inet door opens over ::1 too.
    result = knock(box, "six", port=SSH, check=False, options="--check-timeout 3")
    assert result.returncode == 1 and shut_everywhere(box), result.stdout + result.stderr
    knock(box, "six", port=SSH, host="::1")
    assert door_shut(box, SSH), "an IPv6 knock opened IPv4"
    wait_until(lambda: shut_everywhere(box), OPEN + 5, "the IPv6 door to shut")
    knock(box, port=SSH, host="::1")
    assert door_shut(box, SSH)
    wait_until(lambda: shut_everywhere(box), OPEN + 5, "the door to shut")

    if mode == "knockd_rotator-watch.service":
        # A door added while the watch runs: a top-up, its new windows
        # written over netlink from inside the unit's sandbox.
        loads = (lambda: box.journal(mode).count("loaded the table"))
        before = loads()
        box.write(DOORS_FILE, box.read(DOORS_FILE)
                  + "web_ROTATOR guard=%d open=%d\n" % (SSH, OPEN))
        wait_until(lambda: loads() > before, 20, "the watch's top-up")
        knock(box, "web", port=SSH)
        assert "refused" not in box.journal(mode), box.journal(mode)
        wait_until(lambda: shut_everywhere(box), OPEN + 5, "the door to shut")

    # Restarts of the units keep the table (nothing unloads it) and the guard.
    box.sh("systemctl restart %s %s" % (BOOT_UNIT, mode.replace(".timer", ".service")))
    if mode == "knockd_rotator.timer":
        box.sh("systemctl restart knockd_rotator.timer")
    assert table_loaded(box) and shut_everywhere(box)
    box.sh("systemctl stop %s" % BOOT_UNIT)
    assert table_loaded(box), "a stop removes nothing"
    box.sh("systemctl start %s" % BOOT_UNIT)      # it follows nftables.service while active
    knock(box, port=SSH)
    code, output = status(box)
    assert code == 0, output
    report = json.loads(box.sh("knockd_rotator_server.py status --json", check=False).stdout)
    assert report["state"] == "OK", report

    # What wipes the table, and what brings it back (docs/OPERATIONS.md).
    if firewall == "nftables":
        box.sh("systemctl reload nftables.service")
        wait_until(lambda: table_loaded(box), 10, "the table back after reload nftables")
    elif firewall == "ufw":
        box.sh("ufw reload")
        assert table_loaded(box), "ufw reload leaves other tables alone"
    box.sh("nft flush ruleset" if firewall != "iptables" else "nft delete table %s" % TABLE)
    if mode == "knockd_rotator.timer":
        # Gone until the next run: status says so; a run (the timer's) loads it.
        code, output = status(box)
        assert code == 2, "a missing table is CRITICAL: %s" % output
        box.sh("systemctl start knockd_rotator.service")
    else:
        wait_until(lambda: table_loaded(box), 10, "the watch to load the table again")
    assert table_loaded(box) and shut_everywhere(box)

    # uninstall removes the table: the ports are the host firewall's again.
    result = box.sh("cd %s && ./install.sh uninstall" % PROJECT)
    assert "removed the nftables table" in result.stdout, result.stdout
    assert not table_loaded(box)
    if firewall != "nftables":          # its table was flushed above
        assert port_open(box, SSH) and port_open(box, SSH, "::1")
    box.assert_no_secret_seen()
