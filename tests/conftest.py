"""Shared test helpers: run the scripts, make network namespaces, run real knockd.

Tests that need root or a Debian package fail on CI (CI=true) when it is
missing, since tests/run installs everything there; off CI they skip with the
reason.  Traffic only ever goes to loopback addresses inside namespaces that a
test made, and every namespace and process is removed afterwards.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Files the tests make are nobody else's business, as knockd.conf and the
# environment file must be (the server warns about either when others can
# read it, and add-client refuses).
os.umask(0o077)

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "knockd_rotator_client.py"
SERVER = ROOT / "knockd_rotator_server.py"
SECRET = "test-secret-not-for-production"


def need(condition, reason):
    """Skip off CI, fail on CI, when CONDITION does not hold."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail("CI must provide this: " + reason)
    pytest.skip(reason)


# The fast tier (`tests/run --fast`) leaves out the tests that run knockd,
# make network namespaces or boot a container; CI runs every test.  A test
# that needs one of these programs without being marked fails in the fast
# tier, so that the tier cannot quietly grow slow or skip.
SLOW_PROGRAMS = {"knockd": "knockd", "systemd-nspawn": "container", "mmdebstrap": "container"}
SLOW_FIXTURES = {"netns": "knockd", "knockd_program": "knockd", "knockd_verdicts": "knockd",
                 "rootfs": "container"}
FAST_TIER = [False]


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="only the tests that need no knockd, namespace or container")


def pytest_configure(config):
    config.addinivalue_line("markers", "knockd: runs real knockd or makes a network namespace")
    config.addinivalue_line("markers", "container: boots the units under systemd in a container")
    FAST_TIER[0] = config.getoption("--fast")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in SLOW_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    if not FAST_TIER[0]:
        return
    slow = [item for item in items
            if item.get_closest_marker("knockd") or item.get_closest_marker("container")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


def in_fast_tier(full, fast):
    """FULL, or FAST in the fast tier: fewer rounds of a long randomised test,
    which CI runs in full."""
    return fast if FAST_TIER[0] else full


def need_root_and(*programs):
    need(os.geteuid() == 0, "needs root (network namespaces, iptables)")
    for program in programs:
        if FAST_TIER[0] and program in SLOW_PROGRAMS:
            pytest.fail("this test needs %s: mark it @pytest.mark.%s so that the fast "
                        "tier leaves it out" % (program, SLOW_PROGRAMS[program]))
        need(shutil.which(program), "needs %s (run tests/run to install it)" % program)


# The client's single-use counters: a file of each test's own (see below).
USES_FILE = [None]


@pytest.fixture(autouse=True)
def client_uses_file(tmp_path):
    USES_FILE[0] = tmp_path / "client-uses.json"
    yield
    USES_FILE[0] = None


def rotator_env(**overrides):
    """The test process's environment with only our KNOCKD_ROTATOR_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    env["KNOCKD_ROTATOR_SECRET"] = SECRET
    if USES_FILE[0]:
        env["KNOCKD_ROTATOR_USES_FILE"] = str(USES_FILE[0])
    for key, value in overrides.items():
        name = "KNOCKD_ROTATOR_" + key
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def run_script(script, *args, env=None, netns=None, timeout=60, prefix=(), **kwargs):
    """Run SCRIPT; its output goes through files, not pipes, since a boundary
    run it leaves behind inherits stderr and would hold a pipe open."""
    command = list(prefix) + [sys.executable, str(script)] + [str(a) for a in args]
    if netns:
        command = ["ip", "netns", "exec", netns] + command
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        result = subprocess.run(command, env=rotator_env() if env is None else env,
                                stdout=out, stderr=err, timeout=timeout, **kwargs)
        out.seek(0)
        err.seek(0)
        result.stdout = out.read().decode("utf-8", "replace")
        result.stderr = err.read().decode("utf-8", "replace")
    return result


def run_client(*args, **kwargs):
    return run_script(CLIENT, *args, **kwargs)


def run_server(*args, **kwargs):
    return run_script(SERVER, *args, **kwargs)


def daemon_start_command(namespace, config, pidfile):
    """A shell command that starts knockd as a daemon in NAMESPACE and returns
    once it has written PIDFILE (knockd -d returns before its child does), as
    `systemctl start` returns once the service runs."""
    return ("rm -f {p}; ip netns exec {n} knockd -d -i lo -c {c} -p {p} && i=0; "
            "while [ ! -s {p} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done"
            .format(n=namespace, c=config, p=pidfile))


# A raw SYN per port, from a chosen source address (argv 1) to 127.0.0.1,
# as knockd's C client sends them: `python3 -c SEND_SYNS SOURCE PORT...`.
# SOURCE may be several addresses, comma-separated: each sends the whole
# sequence in turn, as fast as a raw socket goes (a knock and its replays).
SEND_SYNS = r"""
import socket, struct, sys
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for text in sys.argv[1].split(","):
    source = bytes(int(part) for part in text.split("."))
    for port in sys.argv[2:]:
        tcp = struct.pack("!HHIIBBHHH", 40000, int(port), 0, 0, 5 << 4, 0x02, 1024, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
                         source, bytes([127, 0, 0, 1]))
        raw.sendto(ip + tcp, ("127.0.0.1", 0))
"""


def alive_command(pid):
    """A shell check that PID (a number, or a shell expression such as
    `$(cat PIDFILE)`) runs; a zombie does not count."""
    return "ps -o stat= -p %s | grep -qv Z" % pid


@pytest.fixture
def server_env(tmp_path):
    """server_env(**overrides): settings for a server run confined to tmp_path.

    Commands default to `true`, the state folder is tmp_path/state, and the
    period is long so that no boundary run is due unless a test asks for one.
    Any boundary run the test leaves is killed afterwards."""
    def make(**overrides):
        settings = dict(STATE_DIR=tmp_path / "state", ENV_FILE=tmp_path / "absent.env",
                        RELOAD_COMMAND="true", CHECK_COMMAND="true", RECOVER_COMMAND="true",
                        KILL_COMMAND="true", INSTANCE_RELOAD_COMMAND="true %i",
                        INSTANCE_CHECK_COMMAND="true %i", INSTANCE_RECOVER_COMMAND="true %i",
                        INSTANCE_KILL_COMMAND="true %i",
                        CHECK_SECONDS=1, PERIOD_MODULO=31622400, SERVER_INTERVAL=60)
        settings.update(overrides)
        return rotator_env(**settings)
    yield make
    subprocess.run(["pkill", "-KILL", "-f", "%s.* --at " % tmp_path], check=False)


def wait_until(predicate, timeout, what, interval=0.05):
    """Poll PREDICATE until it returns a true value, failing after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(interval)


class Namespace:
    def __init__(self, name):
        self.name = name

    def run(self, *command, check=True, **kwargs):
        return subprocess.run(["ip", "netns", "exec", self.name] + [str(c) for c in command],
                              check=check, capture_output=True, text=True, **kwargs)

    def popen(self, *command, **kwargs):
        return subprocess.Popen(["ip", "netns", "exec", self.name] + [str(c) for c in command],
                                **kwargs)

    def listen(self, port):
        """A TCP server on 127.0.0.1:PORT in the namespace (the caller kills it)."""
        listener = self.popen(sys.executable, "-c",
                              "import socket\ns = socket.socket()\n"
                              "s.bind(('127.0.0.1', %d))\ns.listen(16)\n"
                              "while True: s.accept()[0].close()\n" % port)
        wait_until(lambda: listener.poll() is not None or self.tcp_open(port), 10,
                   "the listener on port %d" % port)
        return listener

    def tcp_open(self, port, host="127.0.0.1", timeout=0.3):
        """True when a TCP connect to HOST:PORT succeeds inside the namespace."""
        code = ("import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] "
                "else socket.AF_INET)\ns.settimeout(%r)\n"
                "sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))) != 0)" % timeout)
        return self.run(sys.executable, "-c", code, host, port, check=False).returncode == 0


@pytest.fixture
def netns():
    need_root_and("ip")
    name = "krtest-%d-%s" % (os.getpid(), uuid.uuid4().hex[:8])
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Namespace(name)
    finally:
        # knockd's children (sleep cmd_timeout, then stop_command) live on
        # after knockd; kill everything in the namespace before deleting it.
        pids = subprocess.run(["ip", "netns", "pids", name],
                              capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


class Knockd:
    """Debian's knockd, in the foreground, on the loopback of a test namespace."""

    def __init__(self, namespace, directory, config):
        self.namespace = namespace
        self.config = Path(config)
        self.log = Path(directory) / "knockd.log"
        self.process = None

    def start(self):
        self.log.write_text("")
        self.process = self.namespace.popen("knockd", "-i", "lo", "-c", self.config,
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        self.wait_log(r"listening on lo", "knockd to start")
        return self

    def log_text(self):
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern, what, timeout=10, count=1):
        def seen():
            if self.process.poll() is not None:
                pytest.fail("knockd exited (%s) while waiting for %s:\n%s"
                            % (self.process.returncode, what, self.log_text()))
            return len(re.findall(pattern, self.log_text())) >= count
        wait_until(seen, timeout, what)

    def reload(self):
        """SIGHUP, as Debian's `systemctl reload knockd` sends."""
        self.process.send_signal(signal.SIGHUP)

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_knockd(netns, tmp_path):
    """start_knockd(config_text) -> a running Knockd; stopped after the test."""
    need_root_and("knockd")
    started = []

    def start(config_text, name="knockd.conf"):
        config = tmp_path / name
        log = tmp_path / "knockd.log"
        config.write_text("[options]\n\tlogfile = %s\n%s" % (log, config_text))
        knockd = Knockd(netns, tmp_path, config)
        started.append(knockd)
        return knockd.start()

    yield start
    for knockd in started:
        knockd.stop()


GUARDED_PORT = 2222


@pytest.fixture
def guarded(netns):
    """A listener on GUARDED_PORT that iptables drops, in the test namespace.

    It also accepts, for 30 s (add-client's cmd_timeout), the addresses in
    the recent list that add-client's iptables doors write to."""
    need_root_and("iptables")
    listener = netns.listen(GUARDED_PORT)
    netns.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", GUARDED_PORT, "-j", "DROP")
    netns.run("iptables", "-I", "INPUT", "-p", "tcp", "--dport", GUARDED_PORT, "-m", "recent",
              "--name", "knockd_rotator_%d" % GUARDED_PORT, "--rcheck", "--seconds", "30",
              "-j", "ACCEPT")
    yield netns
    listener.kill()
    listener.wait()


def accept_rules(netns):
    """The ACCEPT rules a door's start_command added to INPUT (not guarded's
    recent rule, which is always there)."""
    rules = netns.run("iptables", "-S", "INPUT").stdout
    return [rule for rule in rules.splitlines()
            if rule.startswith("-A") and "ACCEPT" in rule and "-m recent" not in rule]


class Watch:
    """knockd_rotator_server.py --watch for CONFIG, in the background."""

    def __init__(self, config, env, tmp_path):
        self.log = tmp_path / "watch.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVER), "--watch", "--config", str(config)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def text(self):
        return self.log.read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
        return self.process.returncode


@pytest.fixture
def watch(server_env, tmp_path):
    """watch(knockd, period, grace, lead=None) -> a running Watch, stopped
    after the test (LEAD None: the server's default)."""
    started = []

    def start(knockd, period, grace, lead=None):
        env = server_env(PERIOD_MODULO=period, GRACE=grace, LEAD=lead,
                         RELOAD_COMMAND="kill -HUP %d" % knockd.pid,
                         CHECK_COMMAND=alive_command(knockd.pid))
        started.append(Watch(knockd.config, env, tmp_path))
        knockd.wait_log(r"re-reading config file", "the first rotation")
        return started[-1], env

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()
