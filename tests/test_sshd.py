"""docs/CLIENTS.md's ssh `Match exec` line against a real sshd (issue 17).

Debian's sshd runs in the test's network namespace with a configuration of
its own (host key, pid file and authorized keys in tmp_path) and, in a
private mount namespace, a /run of its own for its privilege separation
directory.  iptables drops its port; a knockd door opens it.  ssh logs in with
a throwaway key: through the Match line, whose knock opens the door, it runs
its command; without it, the connection times out."""

import re
import shutil
import subprocess

import pytest

from conftest import GUARDED_PORT, accept_rules, need_root_and, run_server, wait_until
from test_server_knockd import DOOR, knockd_env
from test_ssh_match_exec import readme_match_line

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
"""

# In a mount namespace of sshd's own: a /run with the privilege separation
# directory, and root's account unlocked ('*' for '!') for sshd's own check
# of locked accounts (made when PAM is off), on a copy of /etc/shadow.
SSHD_START = """\
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -m 0755 /run/sshd
sed 's/^root:![^:]*:/root:*:/' /etc/shadow > "$1/shadow"
mount --bind "$1/shadow" /etc/shadow
"$2" -t -f "$1/sshd_config"
exec "$2" -D -e -f "$1/sshd_config"
"""


@pytest.fixture
def sshd(netns, tmp_path):
    """A running sshd on 127.0.0.1:GUARDED_PORT in NETNS that lets root in
    with the key tmp_path/client_key; killed after the test."""
    need_root_and("sshd", "ssh", "ssh-keygen", "unshare", "mount")
    directory = tmp_path / "sshd"
    directory.mkdir()
    for key in (directory / "host_key", tmp_path / "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "knockd-rotator test",
                        "-f", str(key)], check=True, stdin=subprocess.DEVNULL)
    shutil.copy(tmp_path / "client_key.pub", directory / "authorized_keys")
    (directory / "sshd_config").write_text(SSHD_CONFIG.format(port=GUARDED_PORT, dir=directory))
    sshd_path = shutil.which("sshd")          # sshd re-executes itself: an absolute path
    log = tmp_path / "sshd.log"
    with open(log, "wb") as output:
        process = netns.popen("unshare", "-m", "--propagation", "private", "sh", "-c",
                              SSHD_START, "sshd-start", directory, sshd_path,
                              stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    try:
        wait_until(lambda: process.poll() is not None or netns.tcp_open(GUARDED_PORT), 10,
                   "sshd to listen")
        assert process.poll() is None, "sshd exited:\n" + log.read_text(errors="replace")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def ssh(netns, tmp_path, config_text, env, timeout=3):
    """ssh root@127.0.0.1 echo ok, with the throwaway key and CONFIG_TEXT as
    its only configuration file, in NETNS."""
    config = tmp_path / "ssh_config"
    config.write_text(config_text)
    return netns.run("ssh", "-F", config, "-i", tmp_path / "client_key",
                     "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                     "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "ConnectTimeout=%d" % timeout, "-o", "LogLevel=ERROR",
                     "-p", GUARDED_PORT, "root@127.0.0.1", "echo", "ok",
                     env=env, check=False, stdin=subprocess.DEVNULL, timeout=60)


def test_readme_match_exec_line_knocks_then_ssh_logs_in(netns, sshd, start_knockd, server_env,
                                                        tmp_path):
    need_root_and("knockd", "iptables")
    # Open, sshd answers with the throwaway key (the set-up works) ...
    before = ssh(netns, tmp_path, "", None)
    assert (before.returncode, before.stdout) == (0, "ok\n"), before.stderr
    # ... then guarded by iptables, and a door that opens it.
    netns.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", GUARDED_PORT, "-j", "DROP")
    assert not netns.tcp_open(GUARDED_PORT)
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=60))
    env = knockd_env(server_env, knockd)
    rotated = run_server("--config", knockd.config, env=env)
    assert rotated.returncode == 0, rotated.stderr
    knockd.wait_log(r"re-reading config file", "the rotation's reload")

    shut = ssh(netns, tmp_path, "Host 127.0.0.1\n    User root\n", env, timeout=2)
    assert shut.returncode == 255 and shut.stdout == "", shut.stdout + shut.stderr
    assert "timed out" in shut.stderr, shut.stderr
    assert "OPEN SESAME" not in knockd.log_text() and not accept_rules(netns)

    line = readme_match_line("--check %d" % GUARDED_PORT)
    knocked = ssh(netns, tmp_path, "%s\n    User root\n" % line, env, timeout=5)
    assert (knocked.returncode, knocked.stdout) == (0, "ok\n"), (
        knocked.stderr + knockd.log_text())
    assert re.search(r"ssh_ROTATOR(_GRACE)?: OPEN SESAME", knockd.log_text())
    assert accept_rules(netns) == ["-A INPUT -s 127.0.0.1/32 -p tcp -m tcp --dport %d -j ACCEPT"
                                   % GUARDED_PORT]
