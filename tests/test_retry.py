"""The client's --check: when the port stays shut, what it knocks with, and when.

retry_plan() is pure: the tests give it the client's clock.  The test with
knockd makes knockd drop the first knock (a reload as it arrives)."""

import signal
import subprocess
import sys
import time

import pytest

import knockd_rotator_client as client
from conftest import GUARDED_PORT, CLIENT, rotator_env, wait_until

PERIOD, GRACE = 60, 30          # grace at half the period, as for totp doors


@pytest.mark.parametrize("into, plan", [
    (45, [(0, 0)]),                        # mid-period: the same sequence again, only
    (59.5, [(0, 0)]),                      # just before a boundary: never the next period
    (0.5, [(-1, 0), (0, 0)]),              # just after: the previous period's first
    (29.9, [(-1, 0), (0, 0)]),             # the grace's last moment
    (30, [(0, 0)]),                        # the grace is over
])
def test_retry_plan_by_the_clock(into, plan):
    now = 1800000000 // PERIOD * PERIOD + into
    assert client.retry_plan(now, PERIOD, GRACE, 0, False) == plan


def test_retry_plan_never_sends_the_next_period_and_is_bounded():
    for into in range(PERIOD * 10):
        for use in (0, 3, 50):
            plan = client.retry_plan(1800000000 + into / 10, PERIOD, GRACE, use, True)
            assert plan[plan[0] == (-1, 0)] == (0, use), "the same sequence (next) first"
            assert plan.count((-1, 0)) <= 1
            assert all(offset in (0, -1) for offset, _ in plan)
            assert len(plan) <= client.RETRIES


def test_retry_plan_of_a_single_use_door_walks_forward_then_back():
    plan = client.retry_plan(1800000000 // PERIOD * PERIOD + 45, PERIOD, GRACE, 3, True)
    assert plan == [(0, 3), (0, 0), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (0, 9), (0, 10),
                    (0, 11), (0, 12), (0, 13)]
    assert client.retry_plan(1800000000 // PERIOD * PERIOD + 45, PERIOD, GRACE, 0, True) == [
        (0, use) for use in range(client.LOOK_AHEAD + 1)]
    # Just after a boundary the previous period comes first: the look-ahead
    # would otherwise outlast --check-timeout.
    plan = client.retry_plan(1800000000 // PERIOD * PERIOD + 2, PERIOD, GRACE, 3, True)
    assert plan[:4] == [(-1, 0), (0, 3), (0, 0), (0, 4)]


def test_a_knock_dropped_by_a_reload_gets_in_on_the_retry(guarded, start_knockd):
    """knockd reloads as the first knock arrives (as at a rotation, or
    another client's single-use burn) and drops it; the retry, about a
    second later, opens the door."""
    door = ("[ssh_ROTATOR]\n\tsequence = %s\n\tseq_timeout = 10\n\ttcpflags = syn\n"
            "\tstart_command = iptables -I INPUT -s %%IP%% -p tcp --dport %d -j ACCEPT\n"
            "\tcmd_timeout = 5\n\tstop_command = iptables -D INPUT -s %%IP%% -p tcp --dport %d "
            "-j ACCEPT\n")
    env = rotator_env(PERIOD_MODULO=3600, GRACE=0)
    sequence = subprocess.run([sys.executable, str(CLIENT), "generate", "ssh"], env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
    knockd = start_knockd(door % (sequence, GUARDED_PORT, GUARDED_PORT))
    # --delay spreads the knock over 0.9 s; a SIGHUP in the middle drops it.
    started = time.monotonic()
    knocking = guarded.popen(sys.executable, str(CLIENT), "knock", "127.0.0.1", "ssh",
                             "--delay", "100", "--check", GUARDED_PORT, "--check-timeout", "8",
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    knockd.wait_log(r"127.0.0.1: ssh_ROTATOR: Stage 3", "the knock to be under way")
    knockd.process.send_signal(signal.SIGHUP)
    out, err = knocking.communicate(timeout=20)
    took = time.monotonic() - started
    assert knocking.returncode == 0, err
    assert "knocking again with the same sequence" in err
    assert knockd.log_text().count("ssh_ROTATOR: OPEN SESAME") == 1
    assert took < 0.9 + 1.2 + 0.9 + 1, "the retry came about a second after the knock"
    print("dropped knock, retried, opened: %.2f s" % took)
