"""The units under a real systemd: PID 1 in a container, driven by systemctl.

A Debian 12 root file system (mmdebstrap, built once and cached) boots with
systemd-nspawn as PID 1 of a container with a private network (only lo) and a
throw-away overlay.  The project goes in read-only, `./install.sh` installs it
as README "Install on a server" says, and each test then does what an admin
does: writes a door into /etc/knockd.conf, runs the README's steps with
systemctl, and knocks with the client inside the container.  knockd, iptables
and the guarded listener all live in the container's network namespace;
nothing touches the host's firewall or the host's systemd.

Throughout, every command line of every process in the container is sampled
for the secrets of /etc/knockd_rotator.env: none may ever show one.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from knockd_rotator.core import settings as core_settings
from conftest import ROOT, need, wait_until
from test_doors import readme_blocks

# nftables and ufw: the nftables engine's host firewalls (test_systemd_nftables.py).
PACKAGES = ("systemd,systemd-sysv,dbus,knockd,iptables,python3,iproute2,procps,"
            "nftables,ufw")
SUITE = "bookworm"
CACHE = Path("/var/cache/knockd_rotator-tests")
PROJECT = "/root/knockd-rotator"          # where the project is, in the container
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PORT = 2222                               # the guarded TCP port in the container
ENV_FILE = "/etc/knockd_rotator.env"
SOURCE_ENV = "set -a; . %s; set +a; " % ENV_FILE

# The README's iptables door, guarding PORT; a short cmd_timeout so that a
# test can see the door shut again before the next knock.


# ---------------------------------------------------------------- the host side

def host_mirror():
    """The Debian mirror the host's apt uses for the suite, or deb.debian.org."""
    texts = []
    for path in [Path("/etc/apt/sources.list")] + sorted(
            Path("/etc/apt/sources.list.d").glob("*")):
        try:
            texts.append(path.read_text())
        except OSError:
            pass
    for text in texts:
        # one-line form: deb [options] URI SUITE COMPONENTS
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+%s\s" % SUITE, text, re.M):
            return match.group(1)
        # deb822 form: a paragraph with URIs: and Suites: naming the suite
        for paragraph in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", paragraph, re.M)
            suites = re.search(r"^Suites:(.*)$", paragraph, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    return "http://deb.debian.org/debian"


def cgroup_mounts():
    """Mount points of the hierarchies nspawn uses: cgroup2, and name=systemd."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        kind, options = fields[separator + 1], fields[separator + 3]
        if kind == "cgroup2" or (kind == "cgroup" and "name=systemd" in options.split(",")):
            mounts.append(fields[4])
    return mounts


def build_rootfs():
    """The root file system, built once and cached, keyed on what goes in."""
    mirror = host_mirror()
    key = hashlib.sha256(("%s minbase %s %s" % (SUITE, PACKAGES, mirror)).encode()).hexdigest()
    rootfs = CACHE / ("rootfs-" + key[:16])
    if (rootfs / ".complete").exists():
        return rootfs
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    for stale in CACHE.glob("rootfs-building-*"):      # an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix="rootfs-building-", dir=CACHE))
    partial.rmdir()                       # mmdebstrap wants to create it
    try:
        result = subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=" + PACKAGES, "--quiet",
             SUITE, str(partial), mirror],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.fail("mmdebstrap failed (%d):\n%s%s"
                        % (result.returncode, result.stdout, result.stderr[-5000:]))
        (partial / ".complete").write_text(PACKAGES + "\n")
        partial.rename(rootfs)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return rootfs


NSPAWN_RUN = Path("/run/systemd/nspawn")


@pytest.fixture(scope="session")
def rootfs():
    need(os.geteuid() == 0, "needs root (systemd-nspawn)")
    for program in ("mmdebstrap", "systemd-nspawn", "nsenter", "strace"):
        need(shutil.which(program), "needs %s (run tests/run to install it)" % program)
    need(cgroup_mounts(), "needs a cgroup2 or name=systemd hierarchy for systemd-nspawn")
    existed = NSPAWN_RUN.exists()
    yield build_rootfs()
    if not existed:
        # nspawn's own folders, empty once every container is gone
        for folder in (NSPAWN_RUN / "locks", NSPAWN_RUN / "propagate", NSPAWN_RUN):
            try:
                folder.rmdir()
            except OSError:
                pass


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """A snapshot of the project, so that edits made meanwhile do not leak in."""
    snapshot = tmp_path_factory.mktemp("project") / "knockd-rotator"
    shutil.copytree(ROOT, snapshot, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache",
                                                  ".hypothesis", "tests", "bench"))
    return snapshot


# ---------------------------------------------------------------- the container

class Container:
    """systemd as PID 1 in a container of its own, with an overlay and only lo."""

    def __init__(self, rootfs, project, workdir):
        self.rootfs = rootfs
        self.project = project
        self.workdir = workdir
        self.name = "kr-%d-%s" % (os.getpid(), uuid.uuid4().hex[:8])
        self.cgroups = [os.path.join(mount, "kr-test-" + self.name) for mount in cgroup_mounts()]
        self.nspawn = None
        self.pid1 = None
        self.secrets = set()
        self.seen_secrets = []
        self.log = open(workdir / ("%s.console" % self.name), "wb")
        self._sampler = None
        self._stop = threading.Event()
        self.helpers = []                 # host processes to end at teardown (strace)

    # boot and teardown

    def boot(self):
        moves = "".join('mkdir "%s" && echo $$ > "%s/cgroup.procs" && ' % (cg, cg)
                        for cg in self.cgroups)
        command = moves + 'exec "$@"'
        self.nspawn = subprocess.Popen(
            ["sh", "-c", command, "sh", "systemd-nspawn", "-D", str(self.rootfs),
             "--volatile=overlay", "--private-network", "--keep-unit", "--register=no",
             "--console=passive", "-M", self.name,
             "--bind-ro=%s:%s" % (self.project, PROJECT), "-b"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid1 = wait_until(self._find_pid1, 30, "the container's systemd to start")
        self.start_sampler()
        wait_until(lambda: self.path("/run/systemd/private").exists(), 30,
                   "the container's systemd to listen")
        # The sampler sees command lines in the container: try it on a canary.
        canary = "canary-" + uuid.uuid4().hex
        self.secrets.add(canary)
        self.sh("sleep 0.3; : %s" % canary)
        wait_until(lambda: any(canary in cmd for _, _, cmd in self.seen_secrets), 5,
                   "the command line sampler to see a canary")
        self.secrets.discard(canary)
        self.seen_secrets.clear()
        result = self.sh("systemctl is-system-running --wait", timeout=90, check=False)
        if result.stdout.strip() not in ("running", "degraded"):
            self.log.flush()
            pytest.fail("the container did not boot: %r %r\n%s\n%s" % (
                result.stdout, result.stderr,
                self.sh("systemctl --failed --no-pager", check=False).stdout,
                self.console()[-3000:]))

    def _find_pid1(self):
        if self.nspawn.poll() is not None:
            self.log.flush()
            pytest.fail("systemd-nspawn exited %d:\n%s" % (
                self.nspawn.returncode, self.console()))
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path("/proc/%s/stat" % entry).read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == self.nspawn.pid and comm == "systemd":
                return int(entry)
        return None

    def console(self):
        return (self.workdir / ("%s.console" % self.name)).read_text(errors="replace")

    def teardown(self):
        self._stop.set()
        if self._sampler:
            self._sampler.join(5)
        if self.pid1 and self.nspawn.poll() is None:
            try:
                # What the units said: shown when the test failed.
                print(self.sh("journalctl --no-pager -o short-precise -n 150 -u 'knockd*'",
                              check=False, timeout=30).stdout)
                # knockd waits for a door's cmd_timeout child before it exits:
                # no need to wait for that, at the end.
                self.sh("systemctl kill --signal=SIGKILL knockd.service", check=False,
                        timeout=30)
            except (Exception, pytest.fail.Exception) as exc:
                print("teardown: %s" % exc)
        for helper in self.helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        if self.nspawn and self.nspawn.poll() is None:
            # SIGTERM to nspawn: the container's systemd halts cleanly.
            self.nspawn.terminate()
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(10)
        self.log.close()
        for cgroup in self.cgroups:
            if not os.path.isdir(cgroup):
                continue
            for directory, _, _ in sorted(os.walk(cgroup), key=lambda w: -len(w[0])):
                try:
                    pids = Path(directory, "cgroup.procs").read_text().split()
                except OSError:
                    pids = []
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                deadline = time.monotonic() + 10
                while True:
                    try:
                        os.rmdir(directory)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
        nspawn_run = NSPAWN_RUN
        shutil.rmtree(nspawn_run / "propagate" / self.name, ignore_errors=True)
        stat = os.stat(self.rootfs)
        for lock in (nspawn_run / "locks").glob("inode-%d:%d" % (stat.st_dev, stat.st_ino)):
            lock.unlink()

    # running things inside

    def command(self, shell):
        return ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i", "PATH=" + PATH,
                "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
                "sh", "-c", shell]

    def sh(self, shell, timeout=60, check=True):
        """Run SHELL in the container as root; output through files, not pipes,
        since a process it leaves behind would hold a pipe open."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                result = subprocess.run(self.command(shell), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, timeout=timeout)
            except subprocess.TimeoutExpired:
                out.seek(0)
                err.seek(0)
                pytest.fail("timed out after %s s: %s\n%s%s" % (
                    timeout, shell, out.read().decode(errors="replace"),
                    err.read().decode(errors="replace")))
            out.seek(0)
            err.seek(0)
            result.stdout = out.read().decode("utf-8", "replace")
            result.stderr = err.read().decode("utf-8", "replace")
        if check and result.returncode != 0:
            pytest.fail("in the container, `%s` exited %d:\n%s%s" % (
                shell, result.returncode, result.stdout, result.stderr))
        return result

    def path(self, inside):
        """A path of the container's file system, seen from the host."""
        return Path("/proc/%d/root" % self.pid1) / inside.lstrip("/")

    def read(self, inside):
        return self.path(inside).read_text(errors="replace")

    def write(self, inside, text, mode=None):
        """Write TEXT as an editor would: an existing file keeps its mode
        (install.sh made knockd.conf 0600), a new one gets MODE or 0644."""
        path = self.path(inside)
        if mode is None:
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(path, mode)

    def append(self, inside, text):
        with open(self.path(inside), "a") as handle:
            handle.write(text)

    def show(self, unit, *properties):
        """systemctl show UNIT -p ... as a dict."""
        output = self.sh("systemctl show %s %s" % (
            unit, " ".join("-p " + p for p in properties))).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def journal(self, unit):
        return self.sh("journalctl --no-pager -o short-precise -u %s" % unit,
                       check=False).stdout

    def journal_entries(self, unit):
        output = self.sh("journalctl --no-pager -o json -u %s" % unit, check=False).stdout
        return [json.loads(line) for line in output.splitlines() if line.startswith("{")]

    # processes of the container, seen from the host

    def processes(self):
        """{host pid: (argv list, cgroup text)} of every process in the container."""
        try:
            namespace = os.readlink("/proc/%d/ns/pid" % self.pid1)
        except OSError:
            return {}
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink("/proc/%s/ns/pid" % entry) != namespace:
                    continue
                argv = Path("/proc/%s/cmdline" % entry).read_bytes().split(b"\0")
                cgroup = Path("/proc/%s/cgroup" % entry).read_text()
            except OSError:
                continue
            found[int(entry)] = ([a.decode(errors="replace") for a in argv if a], cgroup)
        return found

    def server_processes(self):
        return {pid: (argv, cgroup) for pid, (argv, cgroup) in self.processes().items()
                if any(a.endswith("knockd_rotator_server.py") for a in argv[:2])}

    # the secret is never on a command line

    def learn_secrets(self):
        """The secret values of the environment file, to look for on command lines."""
        try:
            text = self.read(ENV_FILE)
        except OSError:
            return
        for match in re.finditer(r"^KNOCKD_ROTATOR_SECRET\w*=(.+)$", text, re.M):
            value = match.group(1).strip().strip("'\"")
            if len(value) >= 10:
                self.secrets.add(value)

    def start_sampler(self):
        def sample():
            namespace = os.readlink("/proc/%d/ns/pid" % self.pid1)
            rounds = 0
            while not self._stop.is_set():
                if rounds % 20 == 0:
                    self.learn_secrets()
                rounds += 1
                secrets = [s.encode() for s in list(self.secrets)]
                if not secrets:
                    time.sleep(0.01)
                    continue
                for entry in os.listdir("/proc"):
                    if not entry.isdigit():
                        continue
                    try:
                        argv = Path("/proc/%s/cmdline" % entry).read_bytes()
                        if not any(s in argv for s in secrets):
                            continue
                        inside = os.readlink("/proc/%s/ns/pid" % entry) == namespace
                    except OSError:
                        continue
                    self.seen_secrets.append((int(entry), inside,
                                              argv.replace(b"\0", b" ").decode(errors="replace")))
                time.sleep(0.01)
        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def host_pid(self, inner):
        """The host's pid of the container's process INNER."""
        for pid in self.processes():
            try:
                status = Path("/proc/%d/status" % pid).read_text()
            except OSError:
                continue
            nspids = re.search(r"^NSpid:\s*(.*)$", status, re.M).group(1).split()
            if int(nspids[-1]) == inner:
                return pid
        pytest.fail("no process %d in the container" % inner)

    def trace_execs(self, pid):
        """strace every program PID and its new descendants start, from the
        host; returns the Trace (stop it with .stop(), which gives the lines)."""
        return Trace(self, pid)

    def assert_no_secret_seen(self):
        self.learn_secrets()
        assert self.secrets, "no secret found in %s" % ENV_FILE
        hidden = [(pid, inside, re.sub("|".join(map(re.escape, self.secrets)), "<SECRET>", cmd))
                  for pid, inside, cmd in self.seen_secrets]
        assert not hidden, "a secret was on a command line: %r" % hidden


class Trace:
    """strace -f of a process of the container, recording every execve."""

    def __init__(self, box, pid):
        self.box = box
        self.file = box.workdir / ("strace-%d-%s" % (pid, uuid.uuid4().hex[:6]))
        self.process = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-s", "65536",
             "-o", str(self.file), "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        box.helpers.append(self.process)
        wait_until(lambda: self.attached(pid), 10, "strace to attach to %d" % pid)

    def attached(self, pid):
        if self.process.poll() is not None:
            pytest.fail("strace exited: %s" % self.process.stderr.read().decode())
        status = Path("/proc/%d/status" % pid).read_text()
        return re.search(r"^TracerPid:\s*%d$" % self.process.pid, status, re.M)

    def stop(self):
        """Detach; the execve lines, after checking them for the secrets."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()
        lines = [line for line in self.file.read_text(errors="replace").splitlines()
                 if "execve(" in line]
        self.box.learn_secrets()
        leaked = [line for line in lines if any(s in line for s in self.box.secrets)]
        assert not leaked, "a secret was on a command line (strace): %r" % [
            re.sub("|".join(map(re.escape, self.box.secrets)), "<SECRET>", line)
            for line in leaked]
        return lines


@pytest.fixture
def container(rootfs, project, tmp_path):
    box = Container(rootfs, project, tmp_path)
    try:
        box.boot()
        yield box
    finally:
        box.teardown()


# ---------------------------------------------------------------- what an admin does

def install(box):
    """README "Install on a server": ./install.sh, as root, from the project."""
    result = box.sh("cd %s && ./install.sh" % PROJECT)
    assert "created /etc/knockd_rotator.env" in result.stdout
    box.learn_secrets()
    return result


def settings(box, **values):
    """Append KNOCKD_ROTATOR_* settings to the environment file."""
    box.append(ENV_FILE, "".join("KNOCKD_ROTATOR_%s=%s\n" % item for item in values.items()))


def readme_iptables(cmd_timeout, port=PORT):
    """docs/DOORS.md's iptables rules (shell lines) and door, the README's first
    door, on PORT with CMD_TIMEOUT."""
    def localized(text):
        text = re.sub(r"(?<![0-9])22(?![0-9])", str(port), text)
        return re.sub(r"(?<![0-9])30(?![0-9])", str(cmd_timeout), text)
    rules, door = readme_blocks("iptables")
    return [line for block in rules for line in localized(block).splitlines()
            if line.strip()], localized(door)


def knockd_setup(box, sequence=None, cmd_timeout=5):
    """knockd on the container's lo, a listener on PORT, closed and guarded
    as the README's iptables door says (without a sequence unless one is
    given)."""
    defaults = box.read("/etc/default/knockd")
    assert "START_KNOCKD" in defaults            # Debian's; its unit ignores it
    box.write("/etc/default/knockd", defaults + 'KNOCKD_OPTS="-i lo"\n')
    rules, door = readme_iptables(cmd_timeout)
    door = "\n" + door
    if sequence:
        door += "    sequence      = %s\n" % sequence
    box.write("/etc/knockd.conf", "[options]\n    UseSyslog\n    logfile = /var/log/knockd.log\n"
              + door)
    guard(box, PORT, rules)


def listen(box, port, dual_stack=False):
    """A TCP listener on PORT of 127.0.0.1 (DUAL_STACK: of :: and 0.0.0.0),
    a unit of its own in the container."""
    box.sh("systemd-run --unit=guarded-%d --quiet python3 -c '"
           "import socket\ns = socket.socket(socket.AF_INET6 if %s else socket.AF_INET)\n"
           "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
           "%s"
           "s.bind((\"%s\", %d))\ns.listen(16)\n"
           "while True: s.accept()[0].close()'"
           % (port, dual_stack, "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
              if dual_stack else "", "::" if dual_stack else "127.0.0.1", port))
    wait_until(lambda: port_open(box, port), 10, "the listener on %d" % port)


def guard(box, port, rules):
    """A listener on PORT, then the README's iptables RULES that close it."""
    listen(box, port)
    for rule in rules:
        box.sh(rule)
    assert not port_open(box, port)


def port_open(box, port=PORT, host="127.0.0.1"):
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in '%s' else "
            "socket.AF_INET)\ns.settimeout(0.3)\n"
            "sys.exit(s.connect_ex(('%s', %d)) != 0)" % (host, host, port))
    return box.sh("python3 -c \"%s\"" % code, check=False).returncode == 0


def door_shut(box, port=PORT, host="127.0.0.1"):
    """The guarded port is closed again (the door's hole expired)."""
    return not port_open(box, port, host)


def knock(box, service="ssh", env_file=ENV_FILE, check=True, port=PORT, host="127.0.0.1",
          options=""):
    """The client knocks, inside; its secret comes from a file, not argv."""
    wait_until(lambda: door_shut(box, port, host), 30, "the door to be shut before knocking")
    result = box.sh("set -a; . %s; set +a; exec knockd_rotator_client.py knock %s %s "
                    "--check %d %s" % (env_file, host, service, port, options), check=False)
    if check:
        assert result.returncode == 0, "the knock did not open the door:\n%s%s\n%s" % (
            result.stdout, result.stderr, knockd_log(box)[-3000:])
    return result


def generate(box, offset=0, service="ssh"):
    return box.sh(SOURCE_ENV + "knockd_rotator_client.py generate %s --offset %d"
                  % (service, offset)).stdout.strip()


def assert_current(box, service="ssh"):
    """The door holds the sequence the client computes now or, within the
    server's lead before a boundary, the next one with the client's as its
    grace sibling (read between two computations of the same period, in case
    a boundary passes meanwhile)."""
    for _ in range(3):
        first = generate(box, service=service)
        held = door_sequence(box, service + "_ROTATOR")
        sibling = door_sequence(box, service + "_ROTATOR_GRACE")
        if generate(box, service=service) == first:
            assert held == first or (held == generate(box, offset=1, service=service)
                                     and sibling == first), box.read("/etc/knockd.conf")
            return
    pytest.fail("the period changed three times in a row")


def door_sequence(box, door="ssh_ROTATOR", path="/etc/knockd.conf"):
    """The sequence of [DOOR] in the container's knockd.conf (or PATH), or None."""
    text = box.read(path)
    match = re.search(r"^\[%s\]\n(.*?)(?=^\[|\Z)" % re.escape(door), text, re.M | re.S)
    if not match:
        return None
    sequence = re.search(r"^\s*sequence\s*=\s*(.*?)\s*$", match.group(1), re.M)
    return sequence.group(1) if sequence else None


def knockd_pid(box):
    return int(box.show("knockd.service", "MainPID")["MainPID"])


def knockd_log(box):
    try:
        return box.read("/var/log/knockd.log")
    except FileNotFoundError:
        return ""


def rereads(box):
    return knockd_log(box).count("re-reading config file")


def readme_steps(box):
    """The README's steps after the door is written, as it writes them (the
    server reads /etc/knockd_rotator.env itself)."""
    box.sh("knockd_rotator_server.py check")
    dry = box.sh("knockd_rotator_server.py --dry-run")
    assert "sequence" in dry.stdout, dry.stdout
    box.sh("systemctl enable knockd.service")
    box.sh("systemctl enable --now knockd_rotator.timer")


def mtime(box, inside="/etc/knockd.conf"):
    return os.stat(box.path(inside)).st_mtime


def readme_number(pattern):
    return re.search(pattern, (ROOT / "docs" / "SECURITY.md").read_text(), re.S)


def assert_reloaded_at(box, moment):
    """systemd's journal shows knockd.service reloading within a second of MOMENT."""
    def reloads():
        times = [int(entry["__REALTIME_TIMESTAMP"]) / 1e6
                 for entry in box.journal_entries("knockd.service")
                 if str(entry.get("MESSAGE", "")).startswith("Reloading")]
        return [t - moment for t in times if t >= moment]
    lag = wait_until(reloads, 5, "a reload of knockd after %d" % moment)[0]
    assert lag < 1, "knockd reloaded %.3f s after the event at %d" % (lag, moment)


def events_after(moment, period, grace):
    """The server's next events after MOMENT: the start of the lead before a
    boundary (the server's default lead), and that boundary's grace end."""
    lead = min(core_settings.DEFAULT_LEAD, period - grace)
    boundary = (int(moment + lead) // period + 1) * period
    return boundary - lead, boundary + grace


def grace_sequence(box):
    return door_sequence(box, "ssh_ROTATOR_GRACE")


# ---------------------------------------------------------------- the scenarios

def test_timer_rotates_reloads_knockd_and_runs_on_the_boundary(container):
    """The README's timer set-up: the first rotation is a reload of the running
    knockd (same pid), a knock opens, and the boundary run left by the oneshot
    rotates at the lead's start (10 s before the boundary) and at the grace
    end, within a second."""
    box = container
    period, grace = 60, 10
    install(box)
    settings(box, PERIOD_MODULO=period, GRACE=grace)
    knockd_setup(box, sequence="7001:tcp,7003:tcp,7002:tcp")
    box.sh("systemctl start knockd.service")          # knockd already runs here
    wait_until(lambda: "listening on lo" in knockd_log(box), 10,
               "knockd to listen")
    pid = knockd_pid(box)
    before = rereads(box)
    readme_steps(box)
    trace = box.trace_execs(box.pid1)       # the service's every command line
    box.sh("systemctl start knockd_rotator.service")
    execs = trace.stop()
    assert [line for line in execs if "--at" in line], execs

    assert_current(box)
    assert knockd_pid(box) == pid, "knockd was restarted, not reloaded"
    assert rereads(box) > before, knockd_log(box)
    assert "Reloading" in box.journal("knockd.service")
    assert box.sh("systemctl is-active knockd.service").stdout.strip() == "active"
    knock(box)

    # The oneshot has ended; its boundary run waits in the unit's cgroup.
    assert box.show("knockd_rotator.service", "ActiveState")["ActiveState"] == "inactive"
    pending = [(argv, cgroup) for argv, cgroup in box.server_processes().values()
               if "--at" in argv]
    assert len(pending) == 1, box.server_processes()
    assert unit_of(pending[0][1]) == "knockd_rotator.service", pending

    # A run by hand, from an admin's terminal: it returns with its output
    # closed and leaves no process behind; only the unit's runs schedule.
    code, output, _ = run_piped(box, "knockd_rotator_server.py")
    assert code == 0, output
    left = box.server_processes()
    assert [unit_of(cgroup) for _, cgroup in left.values()] == ["knockd_rotator.service"], left

    lead_start, grace_end = events_after(time.time() + 1, period, grace)
    old = door_sequence(box)
    reloads = rereads(box)
    wait_until(lambda: door_sequence(box) != old, lead_start - time.time() + 5,
               "the rotation at the lead's start")
    written = mtime(box)
    assert 0 <= written - lead_start < 1, "rotated %.3f s after the lead's start" % (
        written - lead_start)
    assert_current(box)
    assert grace_sequence(box) == old
    assert knockd_pid(box) == pid
    wait_until(lambda: rereads(box) > reloads, 5, "knockd to re-read its file")
    assert_reloaded_at(box, lead_start)
    knock(box)

    wait_until(lambda: grace_sequence(box) is None, grace_end - time.time() + 5,
               "the rotation at the grace end")
    written = mtime(box)
    assert 0 <= written - grace_end < 1, "grace end rotated %.3f s late" % (
        written - grace_end)
    assert knockd_pid(box) == pid
    wait_until(lambda: rereads(box) > reloads + 1, 5, "knockd to re-read its file")
    assert_reloaded_at(box, grace_end)
    knock(box)

    # With no boundary run pending (`systemctl kill` ends it, as uninstall
    # does), a run by hand says when the next event is and leaves nothing.
    box.sh("systemctl kill knockd_rotator.service")
    wait_until(lambda: not box.server_processes(), 5, "the boundary run to end")
    code, output, _ = run_piped(box, "knockd_rotator_server.py")
    assert code == 0, output
    assert "next event" in output["stderr"], output
    assert not box.server_processes(), box.server_processes()
    box.assert_no_secret_seen()


def test_first_rotation_starts_knockd(container):
    """A new door has no sequence and knockd does not run: the first
    rotation writes the sequence and starts knockd through systemd."""
    box = container
    install(box)
    knockd_setup(box)
    assert door_sequence(box) is None
    readme_steps(box)
    assert box.sh("systemctl is-active knockd.service", check=False).stdout.strip() in (
        "inactive", "failed")
    box.sh("systemctl start knockd_rotator.service")
    assert box.sh("systemctl is-active knockd.service", check=False).stdout.strip() == "active"
    assert knockd_pid(box) > 0
    assert_current(box)
    # The file was tried on knockd first, inside the hardened unit.
    journal = box.journal("knockd_rotator.service")
    assert "rotated to the period" in journal and "not tried" not in journal, journal
    wait_until(lambda: "listening on lo" in knockd_log(box), 10, "knockd to listen")
    knock(box)
    box.assert_no_secret_seen()


def test_a_knockd_that_dies_comes_back_and_rotation_carries_on(container):
    """knockd 0.8 crashes at reloads under a flood: the drop-in install.sh
    adds to knockd.service starts it again, and the next rotation goes on
    with a knock that opens.  Killed again at a rotation's reload (as a crash
    there), it runs with the new file, not the old one."""
    box = container
    install(box)
    knockd_setup(box)
    readme_steps(box)
    box.sh("systemctl start knockd_rotator.service")
    first = knockd_pid(box)
    assert box.show("knockd.service", "Restart")["Restart"] == "on-failure"
    box.sh("kill -SEGV %d" % first)
    wait_until(lambda: knockd_pid(box) not in (0, first), 15, "systemd to start knockd again")
    wait_until(lambda: knockd_log(box).count("listening on lo") >= 2, 10,
               "knockd to listen again")
    knock(box)
    # A rotation whose reload meets a dying knockd: it runs with the new file.
    settings(box, PERIOD_MODULO=31622399, RELOAD_COMMAND="'systemctl kill --signal=SEGV knockd'")
    box.sh("systemctl start knockd_rotator.service")
    assert "knockd died after the reload" in box.journal("knockd_rotator.service")
    assert box.sh("systemctl is-active knockd.service", check=False).stdout.strip() == "active"
    assert_current(box)
    # The kill took the child that would have run the knock's stop_command:
    # the README's door closes by itself all the same, within cmd_timeout.
    wait_until(lambda: door_shut(box), 5 + 2, "the hole to expire")
    knock(box)
    box.assert_no_secret_seen()


def run_piped(box, shell, timeout=60):
    """Run SHELL in the container as an admin's terminal would, its output
    through pipes, with strace recording every program it starts.  Fails
    when it does not return, or returns and leaves its output open (a process
    it left behind holds it).  Returns (exit code, {stdout, stderr}, execs)."""
    # The command waits for a line on stdin, so that strace attaches first.
    process = subprocess.Popen(box.command("read _ && exec " + shell),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    box.helpers.append(process)

    def inner_shell():
        for pid in box.processes():
            try:
                stat = Path("/proc/%d/stat" % pid).read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == process.pid:
                return pid
        return None
    trace = box.trace_execs(wait_until(inner_shell, 10, "the command to start"))
    process.stdin.write(b"go\n")
    process.stdin.close()
    output = {}

    def read(name, stream):
        output[name] = stream.read().decode(errors="replace")
    readers = [threading.Thread(target=read, args=(name, stream), daemon=True)
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("`%s` did not return within %d s" % (shell, timeout))
    for reader in readers:
        reader.join(10)
    held = [reader for reader in readers if reader.is_alive()]
    assert not held, ("`%s` exited %d but left its output open; server processes: %r"
                      % (shell, code, box.server_processes()))
    return code, output, trace.stop()


def switch_to_watch(box):
    """docs/OPERATIONS.md: from the timer to the watch mode, exactly as it says
    (./install.sh has installed the unit)."""
    box.sh("systemctl disable --now knockd_rotator.timer")
    box.sh("systemctl enable --now knockd_rotator-watch.service")
    wait_until(lambda: "watching" in box.journal("knockd_rotator-watch.service"), 10,
               "the watch to start")


def is_burn(argv, cgroup):
    """A single-use door's burn: knockd's start_command runs it, in knockd's unit."""
    return "burn" in argv and unit_of(cgroup) == "knockd.service"


def unit_of(cgroup):
    units = re.findall(r"/([^/\n]+\.(?:service|scope))$", cgroup, re.M)
    return units[0] if units else None


def assert_no_timer_run_left(box):
    """No boundary run of the timer's service is left, and every server
    process is in a knockd_rotator unit (not in nsenter's, an admin's, cgroup)."""
    def left():
        return {pid: (argv, unit_of(cgroup)) for pid, (argv, cgroup)
                in box.server_processes().items()
                if "--at" in argv or unit_of(cgroup) != "knockd_rotator-watch.service"
                and not is_burn(argv, cgroup)}
    wait_until(lambda: not left(), 5, "no server process but the watch's")
    status = box.sh("systemctl status --no-pager --lines=0 knockd_rotator.service",
                    check=False).stdout
    assert "CGroup:" not in status and "knockd_rotator_server.py" not in status, status


def wait_for_events(box, period, grace, count, service="ssh"):
    """COUNT leads' starts and grace ends: each rotates within a second of its
    moment, keeps knockd's pid, and a knock opens after each."""
    pid = knockd_pid(box)
    for _ in range(count):
        lead_start, grace_end = events_after(time.time() + 1, period, grace)
        old = door_sequence(box)
        wait_until(lambda: door_sequence(box) != old, lead_start - time.time() + 5,
                   "the rotation at the lead's start %d" % lead_start)
        written = mtime(box)
        assert 0 <= written - lead_start < 1, "rotated %.3f s after the lead's start" % (
            written - lead_start)
        assert_current(box)
        assert grace_sequence(box) == old
        assert_reloaded_at(box, lead_start)
        knock(box, service)
        wait_until(lambda: grace_sequence(box) is None, grace_end - time.time() + 5,
                   "the rotation at the grace end %d" % grace_end)
        written = mtime(box)
        assert 0 <= written - grace_end < 1, "grace end rotated %.3f s late" % (
            written - grace_end)
        assert knockd_pid(box) == pid, "knockd was restarted"
        assert_reloaded_at(box, grace_end)
        knock(box, service)


def timer_installed(box, **values):
    """The README's install, with VALUES in the environment file, and the
    timer's first run."""
    install(box)
    settings(box, **values)
    knockd_setup(box)
    readme_steps(box)
    box.sh("systemctl start knockd_rotator.service")


def test_watch_mode(container):
    """docs/OPERATIONS.md's switch to the watch: it leaves no timer run behind, rotates at
    every lead's start and grace end, stops cleanly, restarts, and shows a failing
    rotation in the unit's state."""
    box = container
    period, grace = 30, 10
    timer_installed(box, PERIOD_MODULO=period, GRACE=grace)
    assert [argv for argv, _ in box.server_processes().values() if "--at" in argv], \
        "the timer's service left no boundary run to take over from"

    switch_to_watch(box)
    assert_no_timer_run_left(box)
    watcher = int(box.show("knockd_rotator-watch.service", "MainPID")["MainPID"])
    trace = box.trace_execs(box.host_pid(watcher))        # every command the watch runs
    wait_for_events(box, period, grace, 3)
    execs = trace.stop()
    assert [line for line in execs if "systemctl" in line and "reload" in line], execs

    stop = box.sh("systemctl stop knockd_rotator-watch.service", check=False)
    assert stop.returncode == 0, stop.stderr
    state = box.show("knockd_rotator-watch.service", "ActiveState", "Result", "ExecMainStatus")
    assert state["ActiveState"] == "inactive" and state["Result"] == "success", state

    box.sh("systemctl restart knockd_rotator-watch.service")
    state = box.show("knockd_rotator-watch.service", "ActiveState", "MainPID")
    assert state["ActiveState"] == "active" and state["MainPID"] not in ("0", str(watcher))
    wait_until(lambda: "rotated" in box.show("knockd_rotator-watch.service", "StatusText")
               ["StatusText"], 10, "the restarted watch to report a rotation")
    box.sh("systemctl restart knockd_rotator-watch.service")
    assert box.sh("systemctl is-active knockd_rotator-watch.service").stdout.strip() == "active"

    # An admin's typo in the door: every rotation now fails knockd's grammar.
    conf = box.read("/etc/knockd.conf")
    box.write("/etc/knockd.conf", conf.replace("[ssh_ROTATOR]\n",
                                               "[ssh_ROTATOR]\n    bogus_key     = 1\n", 1))
    properties = ("ActiveState", "SubState", "Result", "NRestarts", "StatusText",
                  "ExecMainStatus")

    def failing():
        state = box.show("knockd_rotator-watch.service", *properties)
        if (state["ActiveState"] != "active" or state["Result"] != "success"
                or int(state["NRestarts"]) > 0 or "FAIL" in state["StatusText"].upper()):
            return state
        return None
    state = wait_until(failing, 10, "the watch unit to show the failed rotation")
    print("the failing watch, at first:", state)
    # After 3 failed events in a row the process exits non-zero: systemd
    # counts a restart (or shows the unit failed).
    state = wait_until(lambda: (lambda s: s if int(s["NRestarts"]) > 0
                                or s["Result"] not in ("success",) else None)(
                                    box.show("knockd_rotator-watch.service", *properties)),
                       3 * (period // 2) + 30, "the watch to exit after 3 failed events")
    print("the failing watch, later:", state)
    journal = box.journal("knockd_rotator-watch.service")
    assert "bogus_key" in journal or "line" in journal, journal[-3000:]
    box.assert_no_secret_seen()


def test_add_client_under_the_watch(container):
    """add-client while the watch runs: bob's door opens with the lines it
    printed, its output reaches EOF, and no process is left outside a unit."""
    box = container
    period, grace = 30, 10
    timer_installed(box, PERIOD_MODULO=period, GRACE=grace)
    switch_to_watch(box)
    assert_no_timer_run_left(box)

    code, output, execs = run_piped(
        box, "knockd_rotator_server.py add-client bob --firewall iptables --port %d" % PORT)
    assert code == 0, output
    box.learn_secrets()
    assert len(box.secrets) == 2, "bob's secret is not in the environment file"
    assert [line for line in execs if "iptables" in line], execs

    lines = re.findall(r"^\s*(KNOCKD_ROTATOR_\w+=\S+)\s*$", output["stdout"], re.M)
    assert [line for line in lines if line.startswith("KNOCKD_ROTATOR_SECRET_BOB_SSH=")], \
        output["stdout"]
    print("add-client printed:", [line.split("=")[0] for line in lines])
    box.write("/root/bob.env", "".join(line + "\n" for line in lines), mode=0o600)
    wait_until(lambda: door_sequence(box, "bob_ssh_ROTATOR"), 5, "bob's door")
    assert_current(box, "bob_ssh")
    knock(box, "bob_ssh", env_file="/root/bob.env")

    # Nothing is left outside a unit, and nothing holds add-client's output.
    for pid, (argv, cgroup) in box.server_processes().items():
        assert (unit_of(cgroup) or "").startswith("knockd_rotator") or is_burn(argv, cgroup), (
            pid, argv, cgroup)
    assert_no_timer_run_left(box)
    # The watch takes bob's door along at the next events.
    wait_for_events(box, period, grace, 1, service="bob_ssh")
    box.assert_no_secret_seen()


def test_uninstall_leaves_nothing_running(container):
    """./install.sh uninstall, in timer mode with a boundary run pending: no
    unit, no process, no state folder, and nothing rewrites knockd.conf later."""
    box = container
    period, grace = 30, 10
    timer_installed(box, PERIOD_MODULO=period, GRACE=grace)
    assert [argv for argv, _ in box.server_processes().values() if "--at" in argv]

    box.sh("cd %s && ./install.sh uninstall" % PROJECT)
    units = box.sh("ls -R /etc/systemd/system/").stdout
    assert "knockd_rotator" not in units, units
    wait_until(lambda: not box.server_processes(), 5, "every knockd_rotator process to end")
    assert not box.path("/var/lib/knockd_rotator").exists()
    listed = box.sh("systemctl list-units --all --no-legend 'knockd_rotator*'").stdout
    assert "knockd_rotator" not in listed or "not-found" in listed, listed
    assert box.sh("systemctl is-active knockd.service").stdout.strip() == "active"

    written = mtime(box)
    lead_start, grace_end = events_after(time.time(), period, grace)
    now = time.time()
    event = min(t for t in (grace_end - period, lead_start, grace_end) if t > now)
    deadline = event + 3
    while time.time() < deadline:       # nothing may happen, until past the next event
        assert mtime(box) == written, "knockd.conf was rewritten after uninstall"
        assert not box.path("/var/lib/knockd_rotator").exists(), "the state folder is back"
        assert not box.server_processes(), box.server_processes()
        time.sleep(0.1)
    box.assert_no_secret_seen()


def test_security_exposure_as_published(container):
    """systemd-analyze security, in the container, gives docs/SECURITY.md's number."""
    box = container
    install(box)
    result = box.sh("systemd-analyze security --no-pager knockd_rotator.service "
                    "knockd_rotator-watch.service", check=False)
    scores = dict(re.findall(r"Overall exposure level for (\S+): (\d+\.\d+ \w+)",
                             result.stdout))
    print("exposure:", scores)
    published = readme_number(r"exposure\s+\*\*(\d+\.\d+ \w+)\*\*")
    assert published, "docs/SECURITY.md publishes no exposure level"
    assert scores == {"knockd_rotator.service": published.group(1),
                      "knockd_rotator-watch.service": published.group(1)}, result.stdout


# ---------------------------------------------------------------- several knockd

INSTANCE = "knockd_rotator-knockd@1"
INSTANCE_CONF = "/etc/knockd_rotator.d/1.conf"
BOB_PORT = PORT + 1                       # bob's door guards a port of its own


def enrol(box, name, port):
    """docs/CLIENTS.md "One door per client": add-client NAME, and the lines it
    printed into /root/NAME.env, the client's file.  Returns its output."""
    output = box.sh("knockd_rotator_server.py add-client %s --firewall iptables --port %d"
                    % (name, port)).stdout
    lines = re.findall(r"^\s*(KNOCKD_ROTATOR_\w+=\S+)\s*$", output, re.M)
    assert lines, output
    box.write("/root/%s.env" % name, "".join(line + "\n" for line in lines), mode=0o600)
    box.learn_secrets()
    return output


def said(box, unit, text):
    """How many lines of knockd's own log (UseSyslog) in UNIT's journal hold TEXT."""
    return sum(1 for entry in box.journal_entries(unit)
               if entry.get("SYSLOG_IDENTIFIER") == "knockd"
               and text in str(entry.get("MESSAGE", "")))


def unit_states(box, unit):
    """(systemctl is-active UNIT, systemctl is-enabled UNIT)."""
    return tuple(box.sh("systemctl %s %s" % (verb, unit), check=False).stdout.strip()
                 for verb in ("is-active", "is-enabled"))


def no_burn_left(box):
    return not [argv for argv, _ in box.server_processes().values() if "burn" in argv]


def split_knock(box, reloaded):
    """Bob's sequence (the one his door holds) in two halves, sent with
    knockd's C client (one SYN a port, as the client sends them), and
    `systemctl reload RELOADED` in between: after the second knockd has taken
    the first half, and before the second half, once RELOADED re-read its file."""
    sequence = door_sequence(box, "bob_ssh_ROTATOR", INSTANCE_CONF).split(",")
    half = len(sequence) // 2
    stage = "bob_ssh_ROTATOR: Stage %d" % half
    staged = said(box, INSTANCE, stage)
    box.sh("knock 127.0.0.1 " + " ".join(sequence[:half]))
    wait_until(lambda: said(box, INSTANCE, stage) > staged, 5,
               "the second knockd to take the first half of bob's knock")
    rereads_before = said(box, reloaded, "re-reading config file")
    box.sh("systemctl reload " + reloaded)
    wait_until(lambda: said(box, reloaded, "re-reading config file") > rereads_before, 10,
               "%s to re-read its file" % reloaded)
    box.sh("knock 127.0.0.1 " + " ".join(sequence[half:]))


def test_clients_beyond_doors_per_knockd_get_a_knockd_of_their_own(container):
    """KNOCKD_ROTATOR_DOORS_PER_KNOCKD: the client past it gets a second
    knockd (knockd_rotator-knockd@1, enabled and active) and both clients'
    knocks open; a reload of one knockd leaves a knock in progress at the
    other intact (and a reload of that one drops it); a rotation under the
    unit rewrites the instance's file and reloads that knockd alone; and
    ./install.sh uninstall stops it."""
    box = container
    install(box)
    # knockd.conf has the README's [ssh_ROTATOR]: alice is its second and
    # last door.  A period of a year puts no boundary into the test.
    settings(box, DOORS_PER_KNOCKD=2, PERIOD_MODULO=31622399)
    knockd_setup(box)
    guard(box, BOB_PORT, readme_iptables(5, BOB_PORT)[0])
    readme_steps(box)
    box.sh("systemctl start knockd_rotator.service")
    wait_until(lambda: said(box, "knockd", "listening on lo"), 10, "knockd to listen")

    output = enrol(box, "alice", PORT)
    assert "in /etc/knockd.conf" in output, output
    assert not box.path(INSTANCE_CONF).exists()
    output = enrol(box, "bob", BOB_PORT)
    assert "in %s" % INSTANCE_CONF in output, output
    assert box.path(INSTANCE_CONF).stat().st_mode & 0o777 == 0o600
    assert unit_states(box, INSTANCE) == ("active", "enabled"), box.journal(INSTANCE)
    assert door_sequence(box, "bob_ssh_ROTATOR") is None
    assert door_sequence(box, "bob_ssh_ROTATOR", INSTANCE_CONF)
    wait_until(lambda: said(box, INSTANCE, "listening on lo"), 10, "the second knockd to listen")
    pid = int(box.show(INSTANCE, "MainPID")["MainPID"])

    listed = box.sh("knockd_rotator_server.py list-clients").stdout
    knockd_of = {row.split()[1]: row.split()[-1] for row in listed.splitlines()[1:]}
    assert knockd_of == {"ssh_ROTATOR": "knockd", "alice_ssh_ROTATOR": "knockd",
                         "bob_ssh_ROTATOR": INSTANCE}, listed
    status = box.sh("knockd_rotator_server.py status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "knockd on /etc/knockd.conf: active, 2 doors" in status.stdout, status.stdout
    assert "%s on %s: active, 1 doors" % (INSTANCE, INSTANCE_CONF) in status.stdout, status.stdout
    report = json.loads(box.sh("knockd_rotator_server.py status --json").stdout)["report"]
    assert [(each["knockd"], each["door_count"], each["knockd_active"])
            for each in report["instances"]] == [(INSTANCE, 1, True)], report["instances"]

    # Each client's knock opens its port; bob's single-use burn reloads only his knockd.
    rereads_before = said(box, "knockd", "re-reading config file")
    knock(box, "alice_ssh", env_file="/root/alice.env")
    wait_until(lambda: said(box, "knockd", "re-reading config file") > rereads_before, 10,
               "alice's burn to reload knockd")
    wait_until(lambda: no_burn_left(box), 10, "alice's burn to end")
    rereads = said(box, "knockd", "re-reading config file"), \
        said(box, INSTANCE, "re-reading config file")
    held = door_sequence(box, "bob_ssh_ROTATOR", INSTANCE_CONF)
    knock(box, "bob_ssh", env_file="/root/bob.env", port=BOB_PORT)
    wait_until(lambda: said(box, INSTANCE, "re-reading config file") > rereads[1], 10,
               "bob's burn to reload the second knockd")
    wait_until(lambda: no_burn_left(box), 10, "bob's burn to end")
    assert door_sequence(box, "bob_ssh_ROTATOR", INSTANCE_CONF) != held
    assert said(box, "knockd", "re-reading config file") == rereads[0], box.journal("knockd")

    # A reload of bob's own knockd between the halves of his knock drops it ...
    wait_until(lambda: door_shut(box, BOB_PORT), 10, "bob's port to be shut")
    opened = said(box, INSTANCE, "bob_ssh_ROTATOR: OPEN SESAME")
    split_knock(box, INSTANCE)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert door_shut(box, BOB_PORT), "a knock opened across its knockd's reload"
    assert said(box, INSTANCE, "bob_ssh_ROTATOR: OPEN SESAME") == opened
    # ... and one of the other knockd leaves it intact.
    split_knock(box, "knockd")
    wait_until(lambda: port_open(box, BOB_PORT), 5, "bob's split knock to open his port")
    assert said(box, INSTANCE, "bob_ssh_ROTATOR: OPEN SESAME") == opened + 1
    wait_until(lambda: no_burn_left(box), 10, "bob's burn to end")

    # A rotation under the unit: a new period for bob's door rewrites the
    # instance's file and reloads its knockd, and only that one.
    rereads = said(box, "knockd", "re-reading config file"), \
        said(box, INSTANCE, "re-reading config file")
    kept = door_sequence(box), door_sequence(box, "alice_ssh_ROTATOR")
    held = door_sequence(box, "bob_ssh_ROTATOR", INSTANCE_CONF)
    settings(box, PERIOD_MODULO_BOB_SSH=31622398)
    box.sh("systemctl start knockd_rotator.service")
    assert door_sequence(box, "bob_ssh_ROTATOR", INSTANCE_CONF) != held
    assert (door_sequence(box), door_sequence(box, "alice_ssh_ROTATOR")) == kept
    wait_until(lambda: said(box, INSTANCE, "re-reading config file") > rereads[1], 10,
               "the rotation to reload the second knockd")
    assert said(box, "knockd", "re-reading config file") == rereads[0], box.journal("knockd")
    journal = box.journal("knockd_rotator.service")
    assert box.show("knockd_rotator.service", "Result")["Result"] == "success", journal
    assert not re.search(r"error|fail|warning", journal, re.I), journal
    box.append("/root/bob.env", "KNOCKD_ROTATOR_PERIOD_MODULO_BOB_SSH=31622398\n")
    knock(box, "bob_ssh", env_file="/root/bob.env", port=BOB_PORT)
    assert int(box.show(INSTANCE, "MainPID")["MainPID"]) == pid, "the second knockd restarted"

    # ./install.sh uninstall stops the second knockd, and keeps its file; it
    # waits for bob's pending stop_command first (a stop would kill it).
    output = box.sh("cd %s && ./install.sh uninstall" % PROJECT).stdout
    assert "stopped %s" % INSTANCE in output, output
    journal = box.journal(INSTANCE)
    assert unit_states(box, INSTANCE)[0] == "inactive", journal
    assert "Killing process" not in journal, journal
    assert box.path(INSTANCE_CONF).exists()
    wait_until(lambda: not [argv for argv, _ in box.processes().values()
                            if INSTANCE_CONF in argv], 10, "the second knockd to end")
    assert box.sh("systemctl is-active knockd.service").stdout.strip() == "active"
    box.assert_no_secret_seen()
