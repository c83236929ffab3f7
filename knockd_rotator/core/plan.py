"""What every door holds at a moment, whatever enforces it (plan_doors): the period
and sequence of each rotator door, its use counter, its grace sibling, the next
event.  Pure: a function of the settings, the counters and the moment."""

from collections import namedtuple

from knockd_rotator.core.generator import period_start, ROTATOR_SUFFIX


def is_rotator(section):
    """Whether SECTION (bytes, or None before the first header) is a rotator door."""
    return section is not None and section.endswith(ROTATOR_SUFFIX.encode())


GRACE_SUFFIX = "_GRACE"


def use_count(uses, settings, start):
    """The use counter of SETTINGS's door in the period from START (0: unused)."""
    if not uses or not settings.single_use:
        return 0
    return uses.get(settings.door, {}).get("counts", {}).get(str(start), 0)


class Plan:
    """What every door holds at one moment (plan_doors), and what an engine
    makes of it for its file (engines/knockd/render.py)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def door_start(now, settings):
    """The start of the period whose sequence the door of SETTINGS holds at NOW:
    the next period's from SETTINGS.lead seconds before its boundary."""
    return period_start(now + settings.lead, settings.period)


def next_event(now, period, grace, lead):
    """When the server next changes the file: the grace end, or the next lead's start."""
    start = period_start(now + lead, period)
    return start + grace if now < start + grace else start + period - lead


# --at's latest moment: beyond any real boundary, and far enough below
# datetime's year 9999 that utc() of a moment a period later stays within it.
AT_MAX = 2 ** 37


def plan_doors(doors, now, settings_of, uses=None):
    """What each of DOORS holds at NOW (pure): SETTINGS_OF(door) gives its
    settings (.period, .grace, .lead, .sequence_at(period start, use)), USES
    its use counters (use_count).  The Plan's .starts are the periods they
    hold, .current their sequences, .graced the doors whose previous sequence
    still opens them (a grace sibling), .event the next moment any of that
    changes (None: no door)."""
    settings = {door: settings_of(door) for door in doors}
    starts = {door: door_start(now, settings[door]) for door in doors}
    counters = {door: use_count(uses, settings[door], starts[door]) for door in doors}
    current = {door: settings[door].sequence_at(starts[door], counters[door]) for door in doors}
    graced = [door for door in doors if now < starts[door] + settings[door].grace]
    event = min((next_event(now, s.period, s.grace, s.lead) for s in settings.values()),
                default=None)
    return Plan(doors=doors, settings=settings, starts=starts, counters=counters,
                current=current, graced=graced, event=event)


def grace_uses(plan, uses=None):
    """{door: (period start, use counter)} of the sequence each graced door's
    sibling holds: its previous period's."""
    previous = {door: plan.starts[door] - plan.settings[door].period for door in plan.graced}
    return {door: (start, use_count(uses, plan.settings[door], start))
            for door, start in previous.items()}


def grace_until(plan):
    """When the last grace of PLAN's graced doors ends."""
    return max(plan.starts[door] + plan.settings[door].grace for door in plan.graced)


# A door whose sequences the kernel switches by itself (the nftables engine)
# holds them ahead: at least this many periods beyond the current one, and
# enough for two runs of the timer, within what its window slots hold.
PERIODS_AHEAD_MIN = 3
PERIODS_HELD_MAX = 120
# A single-use door holds this many uses of each period ahead of its counter:
# a client that knocks again opens with no server in between (the client's
# retry walks ahead too, docs/SPEC.md).
USES_AHEAD = 8


Window = namedtuple("Window", "start valid_from valid_until sequence use")
Window.__new__.__defaults__ = (None,)
Window.__doc__ = """One sequence of a door and when its first knock may come.

start        the period start it belongs to (UNIX seconds)
valid_from   first second at which the FIRST knock may be sent (the period's
             start less the lead)
valid_until  first second at which it may no longer be sent (the next
             period's start plus the grace); the rest of the knock may
             follow within the door's seq_timeout
sequence     ((port, "tcp"|"udp"), ...), 1 to 32 distinct items
use          the single-use counter, or None for a door without single use"""


def periods_ahead(settings, horizon):
    """How many periods beyond the current one SETTINGS's door holds, to
    cover HORIZON seconds (with single use: PERIODS_AHEAD_MIN)."""
    if settings.single_use:
        return PERIODS_AHEAD_MIN
    wanted = -(-horizon // settings.period)
    return max(PERIODS_AHEAD_MIN, min(wanted, PERIODS_HELD_MAX - 2))


def held_windows(settings, now, horizon, uses=None):
    """The Windows SETTINGS's door holds at NOW (pure): the previous period's
    (while its grace lasts), the current one's and periods_ahead() more;
    for a single-use door, USES_AHEAD uses of each, from its counter on."""
    current = period_start(now, settings.period)
    ahead = periods_ahead(settings, horizon)
    windows = []
    for index in range(-1, ahead + 1):
        start = current + index * settings.period
        valid_from = start - settings.lead
        valid_until = start + settings.period + settings.grace
        if valid_until <= now:
            continue
        if settings.single_use:
            first = use_count(uses, settings, start)
            numbers = range(first, first + USES_AHEAD)
        else:
            numbers = (None,)
        windows += [Window(start, valid_from, valid_until,
                           settings.knocks_at(start, number or 0), number)
                    for number in numbers]
    return windows


def next_top_up(settings, now, horizon):
    """When a door of SETTINGS holding held_windows(now) must be topped up:
    once only two periods beyond the current one are left."""
    current = period_start(now, settings.period)
    return current + (periods_ahead(settings, horizon) - 2) * settings.period
