"""Rotation with no lock-out: the grace window and --watch, with real knockd.

knockd guards a listener behind iptables in a test namespace (the fixtures of
test_server_knockd).  The server runs in --watch mode with a short period;
clients whose clocks are shifted run under faketime."""

import signal
import time

import pytest

from conftest import (GUARDED_PORT, Watch, accept_rules, need_root_and, run_client,
                      wait_until)
from test_server_knockd import DOOR


def reloads(knockd):
    return knockd.log_text().count("re-reading config file")


def wait_for_moment(period, low, high, after=0):
    """Wait until the time into the period is between LOW and HIGH seconds,
    in a period that starts after the time AFTER; return its start."""
    wait_until(lambda: low <= time.time() % period < high
               and time.time() // period * period > after, 2 * period + 1,
               "%g to %g s into a %d s period" % (low, high, period), interval=0.01)
    return int(time.time()) // period * period


def close_door(netns):
    """Remove every ACCEPT the door added, so the next knock starts closed."""
    while accept_rules(netns):
        netns.run("iptables", "-D", "INPUT", "-s", "127.0.0.1", "-p", "tcp", "--dport",
                  GUARDED_PORT, "-j", "ACCEPT")
    assert not netns.tcp_open(GUARDED_PORT)


def knock(netns, env, *args, timeout=3, clock=None):
    prefix = ["faketime", "-f", clock] if clock else ()
    return run_client("knock", "127.0.0.1", "ssh", "--check", GUARDED_PORT, "--check-timeout",
                      timeout, *args, netns=netns.name, env=env, prefix=prefix)


def test_a_client_2_s_behind_opens_after_the_boundary_but_not_after_the_grace(
        guarded, start_knockd, watch):
    need_root_and("faketime")
    period, grace = 20, 5
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=120))
    # No lead: the boundary's own reload is what this test follows.
    server, env = watch(knockd, period, grace, lead=0)
    # A boundary after the start-up rotation: one just before it would be that one.
    boundary = wait_for_moment(period, 0.5, 1.5, after=time.time())
    # Our rotation at the boundary happened (the first reload was at start-up).
    wait_until(lambda: reloads(knockd) >= 2, 2, "the boundary's reload")
    assert "_GRACE" in knockd.config.read_text()
    # Counted from here: a watch started inside a grace window reloaded once more before.
    at_boundary = reloads(knockd)

    behind = knock(guarded, env, clock="-2s")
    assert behind.returncode == 0, behind.stderr + server.text()
    assert "knocking again" not in behind.stderr, "the grace sibling opened at once"
    assert "ssh_ROTATOR_GRACE: OPEN SESAME" in knockd.log_text()
    close_door(guarded)

    wait_until(lambda: time.time() >= boundary + grace and reloads(knockd) > at_boundary,
               boundary + grace + 2 - time.time(), "the grace end's reload")
    assert "_GRACE" not in knockd.config.read_text()
    stale = knock(guarded, env, "--offset", "-1", timeout=2)
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert not accept_rules(guarded)
    assert server.stop() == 0


@pytest.mark.parametrize("lead", [0, None])
def test_a_client_ahead_gets_in_by_the_lead_or_by_its_retry(guarded, start_knockd, watch, lead):
    """7 s ahead, 6 s before the server's boundary: the client's clock is just
    past a boundary, and its first knock is the server's next period's.
    Within the server's lead (10 s by default) the door holds that sequence
    already, and it opens at once; without a lead, the client's retry with the
    previous period's (the server's current) opens."""
    need_root_and("faketime")
    period, grace = 20, 5
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=120))
    server, env = watch(knockd, period, grace, lead=lead)
    boundary = wait_for_moment(period, period - 6.5, period - 6) + period
    if lead is None:
        wait_until(lambda: "lead: the doors hold the sequences of the period from" in
                   server.text(), 2, "the lead's rotation")
        assert "_GRACE" in knockd.config.read_text()
    ahead = knock(guarded, env, timeout=4, clock="+7s")
    assert ahead.returncode == 0, ahead.stderr + server.text() + knockd.log_text()
    assert time.time() < boundary, "all before the server's boundary"
    if lead is None:
        assert "knocking again" not in ahead.stderr
        assert "ssh_ROTATOR: OPEN SESAME" in knockd.log_text()
    else:
        assert "did not open; knocking again with the previous period's sequence (just " \
               "after a period boundary)" in ahead.stderr
    assert "_GRACE: OPEN SESAME" not in knockd.log_text(), "the door, not its sibling, opened"
    assert server.stop() == 0


def test_watch_keeps_every_knock_working_over_3_rotations(guarded, start_knockd, watch):
    """Period 10 s, grace 3 s, a fresh client once a second for 34 s.  The
    lead (7 s: at most the period less the grace) reaches back to the grace
    end, so the file changes once a period.

    Knocks start half a second after a whole second, away from the instants
    knockd reloads (the benchmark measures knocks at every instant)."""
    period, grace = 10, 3
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=120))
    server, env = watch(knockd, period, grace)
    first = wait_for_moment(period, 0.4, 0.6)
    outcomes = []
    for second in range(34):
        wait_until(lambda: time.time() >= first + second + 0.5, 2, "the next knock's moment",
                   interval=0.01)
        result = knock(guarded, env)
        outcomes.append((round(time.time() - first, 1), result.returncode, result.stderr))
        close_door(guarded)
    assert [o for o in outcomes if o[1] != 0] == []
    # knockd 0.8 hears about 1 knock in 800 only in part (knockd-facts): one
    # retry is knockd's, more would be the rotation's.
    retried = [o for o in outcomes if "knocking again" in o[2]]
    assert len(retried) <= 1, retried
    assert reloads(knockd) >= 1 + 3, "the lead's start (the grace end) in each of 3 periods"
    assert server.stop() == 0


def test_sigterm_stops_watch_cleanly_and_leaves_a_consistent_file(tmp_path, server_env):
    """SIGTERM, at rest and in the middle of a reload: exit 0, file complete."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    started = tmp_path / "reload-started"
    for moment in ("at rest", "during a reload"):
        slow = "touch %s; sleep 1" % started if moment == "during a reload" else "true"
        env = server_env(PERIOD_MODULO=4, GRACE=1, RELOAD_COMMAND=slow)
        config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
        server = Watch(config, env, tmp_path)
        try:
            if moment == "at rest":
                wait_until(lambda: "rotated" in server.text(), 10, "the first rotation")
            else:
                wait_until(started.exists, 10, "the reload to begin")
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(10) == 0, server.text()
        finally:
            server.process.kill()
            server.process.wait()
        text = server.text()
        assert "stopped by signal %d" % signal.SIGTERM in text, text
        assert "ssh_ROTATOR: rotated" in text, "a rotation under way finishes first"
        assert b"sequence = 1\n" not in config.read_bytes()
        assert list(tmp_path.glob(".knockd.conf.*")) == []


def test_watch_survives_a_failed_reload(tmp_path, server_env):
    """The reload fails while a flag file exists: the old file is restored,
    --watch goes on, and the next event's rotation succeeds."""
    config = tmp_path / "knockd.conf"
    original = b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n"
    config.write_bytes(original)
    failing = tmp_path / "fail"
    failing.touch()
    env = server_env(PERIOD_MODULO=4, GRACE=1, RELOAD_COMMAND="test ! -e %s" % failing)
    server = Watch(config, env, tmp_path)
    try:
        wait_until(lambda: "trying again at" in server.text(), 10, "a failed rotation")
        assert config.read_bytes() == original
        failing.unlink()
        wait_until(lambda: "ssh_ROTATOR: rotated" in server.text(), 10, "the retry")
        assert server.process.poll() is None, "still running"
        assert config.read_bytes() != original
    finally:
        assert server.stop() == 0
