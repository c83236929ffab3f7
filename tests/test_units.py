"""The systemd units pass `systemd-analyze verify` as they would be installed."""

import os
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


def verify(root):
    return subprocess.run(["systemd-analyze", "--root=%s" % root, "verify"]
                          + ["/etc/systemd/system/" + unit for unit in VERIFIED],
                          capture_output=True, text=True)


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
