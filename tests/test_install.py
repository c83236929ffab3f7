"""./install.sh and ./install.sh uninstall, under a temporary root (DESTDIR)."""

import os
import re
import stat
import subprocess

import pytest

from conftest import ROOT, need_root_and, rotator_env

INSTALLED = {
    "usr/local/sbin/knockd_rotator_server.py": ("knockd_rotator_server.py", 0o755),
    "usr/local/sbin/knockd_rotator_client.py": ("knockd_rotator_client.py", 0o755),
    "usr/local/lib/knockd_rotator/knockd_rotator_client.py": ("knockd_rotator_client.py", 0o644),
    "etc/systemd/system/knockd_rotator.service": ("knockd_rotator.service", 0o644),
    "etc/systemd/system/knockd_rotator.timer": ("knockd_rotator.timer", 0o644),
    "etc/systemd/system/knockd_rotator-watch.service": ("knockd_rotator-watch.service", 0o644),
    "etc/systemd/system/knockd_rotator-knockd@.service": ("knockd_rotator-knockd@.service",
                                                          0o644),
    "etc/systemd/system/knockd.service.d/knockd_rotator.conf":
        ("knockd.service.d/knockd_rotator.conf", 0o644),
}
# The server imports its package from beside the client, compiled there too.
PACKAGE = "usr/local/lib/knockd_rotator/knockd_rotator"
INSTALLED.update({"%s/%s" % (PACKAGE, module.relative_to(ROOT / "knockd_rotator")):
                  (str(module.relative_to(ROOT)), 0o644)
                  for module in (ROOT / "knockd_rotator").rglob("*.py")})
# It imports the client from usr/local/lib/knockd_rotator, where its bytecode
# is compiled once, at install.
LAUNCHER = "usr/local/bin/knockd_rotator_client.py"


# ./install.sh --engine nftables adds these.
NFTABLES = {
    "etc/systemd/system/knockd_rotator-nftables.service":
        ("knockd_rotator-nftables.service", 0o644),
    "etc/systemd/system/knockd_rotator.service.d/nftables.conf":
        ("knockd_rotator.service.d/nftables.conf", 0o644),
    "etc/systemd/system/knockd_rotator-watch.service.d/nftables.conf":
        ("knockd_rotator.service.d/nftables.conf", 0o644),
    "etc/systemd/system/nftables.service.d/knockd_rotator.conf":
        ("nftables.service.d/knockd_rotator.conf", 0o644),
    "etc/knockd_rotator.doors": ("knockd_rotator.doors", 0o600),
}


def install(root, *args, netns=None):
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(prefix + [str(ROOT / "install.sh")] + list(args),
                          env=dict(os.environ, DESTDIR=str(root)), capture_output=True,
                          text=True)


def files_under(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_install_is_idempotent_and_keeps_the_secret(tmp_path):
    first = install(tmp_path)
    assert first.returncode == 0, first.stderr
    env_file = tmp_path / "etc/knockd_rotator.env"
    for path, (source, mode) in INSTALLED.items():
        assert (tmp_path / path).read_bytes() == (ROOT / source).read_bytes()
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "etc/knockd_rotator.d").stat().st_mode) == 0o700
    secret = [line.split("=", 1)[1] for line in env_file.read_text().splitlines()
              if line.startswith("KNOCKD_ROTATOR_SECRET=")]
    assert len(secret) == 1 and len(secret[0]) >= 40
    assert secret[0] not in first.stdout + first.stderr, "the secret is never printed"
    assert "next steps:" in first.stdout
    kept = env_file.read_bytes()

    second = install(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "kept %s (never overwritten)" % env_file in second.stdout
    assert env_file.read_bytes() == kept
    compiled = [str(path.relative_to(tmp_path)) for path in (
        tmp_path / "usr/local/lib/knockd_rotator/__pycache__").glob("knockd_rotator_client.*.pyc")]
    assert len(compiled) == 1
    modules = [path for path in INSTALLED if path.startswith(PACKAGE + "/")]
    compiled += [str(path.relative_to(tmp_path)) for path in (tmp_path / PACKAGE).rglob("*.pyc")]
    assert len(compiled) == 1 + len(modules)
    assert stat.S_IMODE((tmp_path / LAUNCHER).stat().st_mode) == 0o755
    assert files_under(tmp_path) == sorted(list(INSTALLED) + compiled
                                           + [LAUNCHER, "etc/knockd_rotator.env"])

    # The installed server reads the generated file's secret.
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    env = rotator_env(SECRET=secret[0], RELOAD_COMMAND="true", CHECK_COMMAND="true",
                      STATE_DIR=tmp_path / "state", ENV_FILE=env_file)
    result = subprocess.run([str(tmp_path / "usr/local/sbin/knockd_rotator_server.py"),
                             "--config", str(config), "--dry-run"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "+\tsequence = " in result.stdout, result.stderr
    assert "others can read" not in result.stderr


def test_the_client_on_the_path_runs_the_compiled_single_file(tmp_path):
    assert install(tmp_path).returncode == 0
    env = rotator_env()
    single = subprocess.run([str(ROOT / "knockd_rotator_client.py"), "gen", "ssh"], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0 and single.stdout, single.stderr
    launched = subprocess.run([str(tmp_path / LAUNCHER), "gen", "ssh"],
                              env=dict(env, PYTHONVERBOSE="1"), capture_output=True, text=True)
    assert launched.returncode == 0 and launched.stdout == single.stdout
    assert re.search(r"knockd_rotator/__pycache__/knockd_rotator_client\.[^/]*\.pyc matches ",
                     launched.stderr), "imported from the bytecode install.sh compiled"
    for args in (["gen"], ["--version"]):
        ours, theirs = (subprocess.run([str(script)] + args, env=env, capture_output=True,
                                       text=True) for script in (tmp_path / LAUNCHER,
                                                                 ROOT / "knockd_rotator_client.py"))
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            theirs.returncode, theirs.stdout, theirs.stderr)


def test_an_existing_environment_file_is_never_overwritten(tmp_path):
    env_file = tmp_path / "etc/knockd_rotator.env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("KNOCKD_ROTATOR_SECRET=mine-and-only-mine\n")
    env_file.chmod(0o644)
    result = install(tmp_path)
    assert result.returncode == 0
    assert env_file.read_text() == "KNOCKD_ROTATOR_SECRET=mine-and-only-mine\n"
    assert "warning: others can read %s" % env_file in result.stdout


def test_uninstall_keeps_the_secret_unless_purged(tmp_path):
    assert install(tmp_path).returncode == 0
    (tmp_path / "var/lib/knockd_rotator").mkdir(parents=True)
    (tmp_path / "var/lib/knockd_rotator/lock").touch()
    result = install(tmp_path, "uninstall")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path) == ["etc/knockd_rotator.env"]
    assert install(tmp_path, "uninstall").returncode == 0, "uninstall twice is fine"
    assert install(tmp_path, "uninstall", "--purge").returncode == 0
    assert files_under(tmp_path) == []


def test_bad_arguments(tmp_path):
    for args in (["bogus"], ["uninstall", "--everything"]):
        result = install(tmp_path, *args)
        assert result.returncode == 2
        assert result.stderr.startswith("error: unknown ")
    assert files_under(tmp_path) == []


def engine_lines(env_file):
    return [line for line in env_file.read_text().splitlines()
            if line.startswith("KNOCKD_ROTATOR_ENGINE=")]


def test_install_the_nftables_engine(tmp_path):
    """--engine nftables (both forms): the engine in a new environment file,
    the doors example (0600), the boot unit and both drop-ins; an update
    without --engine keeps it all; the doors file is never overwritten."""
    result = install(tmp_path, "--engine", "nftables")
    assert result.returncode == 0, result.stderr
    assert "next steps (nftables engine" in result.stdout
    env_file = tmp_path / "etc/knockd_rotator.env"
    assert engine_lines(env_file) == ["KNOCKD_ROTATOR_ENGINE=nftables"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    for path, (source, mode) in dict(INSTALLED, **NFTABLES).items():
        assert (tmp_path / path).read_bytes() == (ROOT / source).read_bytes(), path
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode, path
    doors = [line for line in (tmp_path / "etc/knockd_rotator.doors").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert doors == [], "the example guards nothing until the admin says so"
    secret = env_file.read_text().split("KNOCKD_ROTATOR_SECRET=")[1].split()[0]
    assert secret not in result.stdout + result.stderr

    (tmp_path / "etc/knockd_rotator.doors").write_text("ssh_ROTATOR guard=22\n")
    kept = env_file.read_bytes()
    files = files_under(tmp_path)
    for args in (["install", "--engine=nftables"], [], ["install"]):
        again = install(tmp_path, *args)
        assert again.returncode == 0, (args, again.stderr)
        assert "next steps (nftables engine" in again.stdout, args
        assert "kept %s" % (tmp_path / "etc/knockd_rotator.doors") in again.stdout
        assert env_file.read_bytes() == kept
        assert files_under(tmp_path) == files, args
    assert (tmp_path / "etc/knockd_rotator.doors").read_text() == "ssh_ROTATOR guard=22\n"

    result = install(tmp_path, "uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path) == []
    assert not list(tmp_path.rglob("*.service.d")), "the drop-in folders go too"


def test_another_engine_than_the_environment_files_is_refused(tmp_path):
    """An existing environment file keeps its engine: --engine naming another
    one changes nothing and says how to switch."""
    assert install(tmp_path).returncode == 0
    env_file = tmp_path / "etc/knockd_rotator.env"
    assert engine_lines(env_file) == []
    files = files_under(tmp_path)
    kept = env_file.read_bytes()
    result = install(tmp_path, "--engine", "nftables")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: %s sets the knockd engine" % env_file)
    assert len(result.stderr.splitlines()) == 1
    assert "set KNOCKD_ROTATOR_ENGINE=nftables in it" in result.stderr
    assert env_file.read_bytes() == kept and files_under(tmp_path) == files

    # Switched as it says: the engine is the file's, the drop-ins come; and back.
    env_file.write_text(env_file.read_text() + "KNOCKD_ROTATOR_ENGINE=nftables\n")
    assert install(tmp_path, "--engine", "nftables").returncode == 0
    assert (tmp_path / "etc/systemd/system/knockd_rotator.service.d/nftables.conf").exists()
    env_file.write_text(env_file.read_text().replace("ENGINE=nftables", "ENGINE=knockd"))
    result = install(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "etc/systemd").rglob("*nftables*")), files_under(tmp_path)
    assert (tmp_path / "etc/knockd_rotator.doors").exists(), "the admin's doors stay"


def test_bad_engines(tmp_path):
    for args in (["--engine"], ["--engine", "iptables"], ["--engine="], ["install", "--engine",
                 "NFTABLES"], ["uninstall", "--engine", "nftables"], ["--purge"]):
        result = install(tmp_path, *args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, \
            (args, result.stderr)
    assert files_under(tmp_path) == []
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/knockd_rotator.env").write_text("KNOCKD_ROTATOR_ENGINE=pf\n")
    result = install(tmp_path)
    assert result.returncode == 2 and "KNOCKD_ROTATOR_ENGINE=pf" in result.stderr
    assert files_under(tmp_path) == ["etc/knockd_rotator.env"]


def test_help():
    result = subprocess.run([str(ROOT / "install.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    assert "./install.sh --engine nftables" in result.stdout
    assert "set -eu" not in result.stdout and not result.stdout.startswith("#")


TABLE = "table inet knockd_rotator {\n chain input { type filter hook input priority -10; }\n}\n"


@pytest.mark.knockd
def test_uninstall_removes_the_table(tmp_path, netns):
    """./install.sh uninstall removes the table inet knockd_rotator (in the
    network namespace it runs in): under DESTDIR, only for a root whose
    engine is nftables."""
    need_root_and("nft")

    def loaded():
        return netns.run("nft", "list", "table", "inet", "knockd_rotator",
                         check=False).returncode == 0
    knockd_root, nft_root = tmp_path / "knockd", tmp_path / "nft"
    assert install(knockd_root, netns=netns.name).returncode == 0
    assert install(nft_root, "--engine", "nftables", netns=netns.name).returncode == 0
    netns.run("nft", "-f", "-", input=TABLE)
    assert loaded()
    result = install(knockd_root, "uninstall", netns=netns.name)
    assert result.returncode == 0 and loaded(), "not a table of this root's engine"
    assert "warning" not in result.stdout + result.stderr
    result = install(nft_root, "uninstall", netns=netns.name)
    assert result.returncode == 0, result.stderr
    assert "removed the nftables table inet knockd_rotator" in result.stdout
    assert not loaded()
    assert install(nft_root, "uninstall", netns=netns.name).returncode == 0, "twice is fine"
    assert files_under(nft_root) == ["etc/knockd_rotator.doors", "etc/knockd_rotator.env"]


@pytest.mark.knockd
def test_installing_the_knockd_engine_warns_of_a_table_left(tmp_path, netns):
    need_root_and("nft")
    netns.run("nft", "-f", "-", input=TABLE)
    result = install(tmp_path, netns=netns.name)
    assert result.returncode == 0, result.stderr
    assert "warning: the nftables table inet knockd_rotator is still loaded" in result.stdout
