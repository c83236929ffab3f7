"""The systemd units pass `systemd-analyze verify` as they would be installed."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import CLIENT, ROOT, SERVER, need, run_script

UNITS = ("knockd_rotator.service", "knockd_rotator.timer", "knockd_rotator-watch.service",
         "knockd_rotator-knockd@.service")
# A template is verified as one of its instances.
VERIFIED = [unit.replace("@.", "@1.") for unit in UNITS]


@pytest.fixture
def install_root(tmp_path):
    """A root with systemd's own units, our units and scripts where they go."""
    need(shutil.which("systemd-analyze"), "needs systemd-analyze (Debian package systemd)")
    shutil.copytree("/lib/systemd/system", tmp_path / "lib/systemd/system", symlinks=True)
    (tmp_path / "usr/local/sbin").mkdir(parents=True)
    for script in (SERVER, CLIENT):
        shutil.copy2(script, tmp_path / "usr/local/sbin" / script.name)
    # The template's commands: Debian's knockd (tests/run installs it) and kill.
    for program in ("/usr/sbin/knockd", "/bin/kill"):
        need(os.access(program, os.X_OK), "needs %s (Debian package knockd)" % program)
        (tmp_path / program[1:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, tmp_path / program[1:])
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(ROOT / unit, units / unit)
    return tmp_path


# The nftables engine (./install.sh --engine nftables): the table's boot
# unit, and one drop-in for both rotator services.
BOOT_UNIT = "knockd_rotator-nftables.service"
DROPIN = ROOT / "knockd_rotator.service.d" / "nftables.conf"
DROPPED = ("knockd_rotator.service", "knockd_rotator-watch.service")
# nftables.service's start flushes the ruleset: the table follows it.
HOST_DROPIN = ROOT / "nftables.service.d" / "knockd_rotator.conf"


def verify(root, units=VERIFIED):
    return subprocess.run(["systemd-analyze", "--root=%s" % root, "verify"]
                          + ["/etc/systemd/system/" + unit for unit in units],
                          capture_output=True, text=True)


def with_nftables(root):
    """ROOT as ./install.sh --engine nftables leaves it."""
    units = root / "etc/systemd/system"
    shutil.copy(ROOT / BOOT_UNIT, units / BOOT_UNIT)
    for unit in DROPPED:
        (units / (unit + ".d")).mkdir()
        shutil.copy(DROPIN, units / (unit + ".d") / DROPIN.name)
    (units / "nftables.service.d").mkdir()
    shutil.copy(HOST_DROPIN, units / "nftables.service.d" / HOST_DROPIN.name)
    # nftables.service's command, and the drop-in's.
    for program in ("/usr/sbin/nft", "/bin/systemctl"):
        need(os.access(program, os.X_OK), "needs %s (Debian packages nftables, systemd)" % program)
        (root / program[1:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, root / program[1:])
    return root


def directives(text):
    """The unit's KEY=VALUE lines, in order, without comments."""
    return [line for line in text.splitlines() if "=" in line and not line.startswith("#")]


def effective(lines):
    """KEY=VALUE lines with systemd's drop-in semantics for the lists the
    drop-in resets (an empty assignment clears) and the booleans (the last wins)."""
    result = []
    for line in lines:
        key, value = line.split("=", 1)
        if key in ("CapabilityBoundingSet", "RestrictAddressFamilies", "PrivateNetwork"):
            result = [kept for kept in result if not kept.startswith(key + "=")]
        if value:
            result.append(line)
    return result


def hardening(unit_text):
    return unit_text[unit_text.index("# Hardening"):].split("[Install]")[0]


def test_units_verify(install_root):
    result = verify(install_root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_catches_a_broken_unit(install_root):
    unit = install_root / "etc/systemd/system/knockd_rotator.service"
    unit.write_text(unit.read_text().replace("ExecStart=/usr/local/sbin/knockd_rotator_server.py",
                                             "ExecStart=/usr/local/sbin/missing.py"))
    assert verify(install_root).returncode != 0


def test_service_takes_secrets_from_a_file_and_survives_for_boundary_runs():
    service = (ROOT / "knockd_rotator.service").read_text()
    assert "EnvironmentFile=/etc/knockd_rotator.env" in service
    assert "KNOCKD_ROTATOR_SECRET" not in service.replace("# ", "")
    assert "\nKillMode=process\n" in service and "\nType=oneshot\n" in service
    timer = (ROOT / "knockd_rotator.timer").read_text()
    assert "\nPersistent=true\n" in timer and "\nOnBootSec=" in timer
    assert "\nOnClockChange=yes\n" in timer


def test_watch_unit_runs_watch_mode_and_excludes_the_timer():
    watch = (ROOT / "knockd_rotator-watch.service").read_text()
    assert "\nExecStart=/usr/local/sbin/knockd_rotator_server.py --watch\n" in watch
    assert "\nConflicts=knockd_rotator.timer knockd_rotator.service\n" in watch
    assert "\nEnvironmentFile=/etc/knockd_rotator.env\n" in watch
    assert "KNOCKD_ROTATOR_SECRET" not in watch.replace("# ", "")
    # SIGTERM to the main process only, so that a reload under way finishes.
    assert "\nKillMode=mixed\n" in watch and "\nRestart=on-failure\n" in watch
    service = (ROOT / "knockd_rotator.service").read_text()
    assert watch[watch.index("# Hardening."):watch.index("[Install]")].strip() == \
        service[service.index("# Hardening."):].strip(), "both units are hardened alike"


def test_a_rotation_needs_no_capability(tmp_path, server_env):
    """The units keep no capability: as root without any, a rotation of a
    root-owned file in a root-owned folder works, keeping mode and owner; a
    file of another owner fails cleanly (it would need CAP_CHOWN)."""
    need(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
    no_capabilities = ["setpriv", "--bounding-set=-all", "--inh-caps=-all",
                       "--ambient-caps=-all", "--no-new-privs"]
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    config.chmod(0o640)
    env = server_env()
    shown = subprocess.run(no_capabilities + ["grep", "CapEff", "/proc/self/status"],
                           capture_output=True, text=True).stdout
    assert shown.split() == ["CapEff:", "0000000000000000"]
    result = run_script(SERVER, "--config", config, env=env, prefix=no_capabilities)
    assert result.returncode == 0, result.stderr
    assert b"sequence = 1\n" not in config.read_bytes()
    assert oct(config.stat().st_mode & 0o777) == "0o640" and config.stat().st_uid == 0

    os.chown(config, 65534, 65534)
    config.chmod(0o644)
    before = config.read_bytes()
    result = run_script(SERVER, "--config", config, env=server_env(PERIOD_MODULO=31622399),
                        prefix=no_capabilities)
    assert result.returncode == 4, result.stderr
    assert "cannot write %s: Operation not permitted" % config in result.stderr
    assert config.read_bytes() == before and config.stat().st_uid == 65534
    assert [p.name for p in folder.iterdir()] == ["knockd.conf"], "no temp file left"


def test_nftables_units_verify(install_root):
    """The boot unit and the drop-ins, as installed, pass systemd-analyze
    verify, together with the units they change."""
    root = with_nftables(install_root)
    result = verify(root, VERIFIED + [BOOT_UNIT, "nftables.service"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    broken = root / "etc/systemd/system/knockd_rotator.service.d" / DROPIN.name
    broken.write_text(broken.read_text() + "PrivateNetwork=sometimes\n")
    assert re.search(r"nftables\.conf:\d+: Failed to parse boolean", verify(root).stderr)


def test_nftables_dropin_keeps_every_other_hardening_line():
    """Under the nftables engine a unit gets the host's network, CAP_NET_ADMIN
    alone and AF_UNIX AF_NETLINK; every other line stays, and the boot unit
    is hardened exactly as a service with the drop-in."""
    dropin = directives(DROPIN.read_text())
    assert [line for line in dropin if not line.startswith("After=")] == [
        "PrivateNetwork=no", "CapabilityBoundingSet=", "CapabilityBoundingSet=CAP_NET_ADMIN",
        "RestrictAddressFamilies=", "RestrictAddressFamilies=AF_UNIX AF_NETLINK"]
    for unit in DROPPED:
        hardened = directives(hardening((ROOT / unit).read_text()))
        changed = effective(hardened + dropin[1:])
        assert "PrivateNetwork=yes" in hardened and "PrivateNetwork=no" in changed
        assert [line for line in changed if line.startswith("CapabilityBoundingSet")] == [
            "CapabilityBoundingSet=CAP_NET_ADMIN"]
        assert sorted(set(hardened) - set(changed)) == [
            "CapabilityBoundingSet=CAP_NET_RAW", "PrivateNetwork=yes",
            "RestrictAddressFamilies=AF_UNIX AF_PACKET AF_NETLINK"]
    boot = (ROOT / BOOT_UNIT).read_text()
    assert sorted(directives(hardening(boot))) == sorted(changed)


def test_the_table_loads_at_boot_before_the_network():
    """After nftables.service (its flush ruleset would wipe the table), before
    network-pre.target, wanted at boot; it follows nftables.service's restart
    and reload, and its stop removes nothing."""
    boot = directives((ROOT / BOOT_UNIT).read_text())
    for line in ("DefaultDependencies=no", "Wants=network-pre.target",
                 "PartOf=nftables.service", "ReloadPropagatedFrom=nftables.service",
                 "Type=oneshot", "RemainAfterExit=yes",
                 "ExecStart=/usr/local/sbin/knockd_rotator_server.py",
                 "ExecReload=/usr/local/sbin/knockd_rotator_server.py",
                 "EnvironmentFile=/etc/knockd_rotator.env",
                 "WantedBy=sysinit.target nftables.service"):
        assert line in boot, line
    after = [line for line in boot if line.startswith("After=")][0].split("=")[1].split()
    before = [line for line in boot if line.startswith("Before=")][0].split("=")[1].split()
    assert "nftables.service" in after and "network-pre.target" in before
    assert not [line for line in boot if line.startswith("ExecStop")]
    assert "KNOCKD_ROTATOR_SECRET" not in (ROOT / BOOT_UNIT).read_text().replace("# ", "")
    dropin = directives(DROPIN.read_text())
    assert dropin[0] == "After=knockd_rotator-nftables.service nftables.service"
    assert directives(HOST_DROPIN.read_text()) == [
        "ExecStartPost=-/bin/systemctl --no-block try-restart " + BOOT_UNIT]
