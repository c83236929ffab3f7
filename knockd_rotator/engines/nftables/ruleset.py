"""The nftables engine's ruleset: a pure renderer turns a plan of doors
(plain data) into the text of one `nft -f` transaction for the table `inet
knockd_rotator` (kernel.py loads it, and reads back which single-use
sequences the kernel burned).  Only callers read the clock: every pure function takes the moment as an argument.
docs/NFTABLES.md explains the ruleset and what nft 1.0.6 can and cannot do.

The ruleset in one paragraph.  The sequences of each cohort (windows valid
over the same time) form a trie whose nodes are 32-bit ids.  A per-source
map (`st4`/`st6`: address -> node, timeout seq_timeout) holds where each
source is.  Two maps hold every edge of every trie, `rtrans` from a cohort's
root and `trans` from any other node (`node . l4proto . port -> node`,
`trans` with a catch-all giving 0), so a packet costs the same few hash
lookups whatever the number of doors: the number of RULES depends only on
the cohorts in the window and the distinct door settings ("classes"), never
on the number of doors, which are ELEMENTS (one per knock).  The cohorts'
roots are tried by `meta time` rules (integers, UNIX seconds), so the
kernel switches sequences at a boundary with no reload.  A missing edge
resets the source and the same packet is tried again from the roots.  An
accepting node holds its door's number; the source is added to `allow4`/
`allow6` for the door's ports (`gp0`..`gp3`: door -> port) with the door's
open time, the door's counter (`opens`: door -> a named counter) counts the
opening, and the guard drops every other new connection to the guarded
ports.  A single-use accepting node deletes its
final edge in the packet path and records it in `spent` (read back with
`nft -j list set`), so a replay finds nothing to follow and the next use's
sequence, already loaded, opens.  Elements carry timeouts, so a top-up only
adds what is new.

The packet mark is the scratch register (nft 1.0.6 cannot nest a map lookup
in a concatenation or feed a lookup into a set element); each packet's own
mark is saved in a per-source map at entry and restored before it leaves.
"""

import hashlib
from collections import namedtuple

TABLE = "knockd_rotator"
FAMILIES = ("ip", "ip6", "inet")
PROTOCOLS = ("tcp", "udp")
MAX_DOORS = 1 << 14          # door numbers 0 .. 16383 (14 bits of a node id)
MAX_LENGTH = 32              # knockd's own limit (5 bits of a node id)
MAX_PORTS = 4                # guarded ports per door
MAX_CLASSES = 15             # 4 bits of a node id; class 0 marks the roots
PERIOD_SLOTS = 8             # windows of a door (7 bits): 128 periods, or with
USE_SLOTS = 16               # single use 8 periods x 16 uses
DYNAMIC_SIZE = 65536         # sources tracked at once, per family and map
SCRATCH_TIMEOUT = 1          # s; the saved mark lives only while a packet is inside

# Node ids (32 bits, the packet mark while a packet is in our chains):
#   bit 31      1: a root or a node shared by several windows (a hash)
#   bits 27-30  class (door settings) 1..15; 0 for a root
#   bit 26      1: an accepting node; bits 0-13 are then the door number
#   private node: bits 12-25 door number, 5-11 window slot, 0-4 depth
#   shared node:  bits 5-25 hash, 0-4 depth
# A first node (the state after a window's first knock) has depth 0.
SHARED = 1 << 31
CLASS_SHIFT = 27
CLASS_MASK = 0xF << CLASS_SHIFT
ACCEPT = 1 << 26
KIND_MASK = SHARED | CLASS_MASK          # roots: SHARED with class 0
HASH_MASK = ((1 << 21) - 1) << 5
DEPTH_MASK = 0x1F
DOOR_MASK = MAX_DOORS - 1               # an accepting node's door number

# A Window (core/plan.py) is one sequence of a door: its start, with the
# door's period, names the window's slot, so node ids stay the same from one
# render to the next.

Door = namedtuple("Door", "name number ports open_seconds seq_timeout period family windows")
Door.__new__.__defaults__ = ("inet", ())
Door.__doc__ = """A door of the plan.

name          text, for reading back
number        0 .. 16383, stable for the door (node ids are built from it)
ports         guarded TCP ports (1 to 4)
open_seconds  how long a completed knock opens them for the source
seq_timeout   seconds from the first knock within which the sequence must end
period        the door's period (seconds): with a window's start, its slot
family        "ip", "ip6" or "inet" (both)
windows       Window tuples"""

# What the kernel holds, as data: the result of `build`, and what `render`
# diffs against for a top-up.
Ruleset = namedtuple("Ruleset", "elements classes cohorts finals rules")
Ruleset.__new__.__defaults__ = (None,)
TIMED = ("trans", "rtrans", "firsts")


def _class_key(door, window):
    single = window.use is not None
    # A spent record must outlive any use of the window: its whole validity
    # (at most period + lead + grace <= 2 periods) plus the knock's own time.
    spent_ttl = 2 * door.period + door.seq_timeout if single else 0
    return (door.family, door.seq_timeout, door.open_seconds, len(door.ports), single, spent_ttl)


def _slot(door, window):
    """7 bits of the window's node ids: the period (mod 128) for a door
    without single use; the period (mod 4) and the use (mod 32) for one with."""
    index = window.start // door.period
    if window.use is None:
        return index % (PERIOD_SLOTS * USE_SLOTS)
    return (index % PERIOD_SLOTS) * USE_SLOTS + window.use % USE_SLOTS


def _check(plan):
    numbers = set()
    for door in plan:
        if not 0 <= door.number < MAX_DOORS or door.number in numbers:
            raise ValueError("door %r: number %r is not unique in 0..%d"
                             % (door.name, door.number, MAX_DOORS - 1))
        numbers.add(door.number)
        if door.family not in FAMILIES:
            raise ValueError("door %r: family must be one of %s" % (door.name, FAMILIES))
        if not 1 <= len(door.ports) <= MAX_PORTS or len(set(door.ports)) != len(door.ports) \
                or not all(1 <= p <= 65535 for p in door.ports):
            raise ValueError("door %r: 1 to %d distinct guarded ports" % (door.name, MAX_PORTS))
        for value, what in ((door.open_seconds, "open_seconds"), (door.seq_timeout, "seq_timeout"),
                            (door.period, "period")):
            if int(value) != value or value < 1:
                raise ValueError("door %r: %s must be a whole number >= 1" % (door.name, what))
        slots = set()
        for window in door.windows:
            seq = tuple(window.sequence)
            if not 1 <= len(seq) <= MAX_LENGTH or len(set(seq)) != len(seq):
                raise ValueError("door %r: a sequence holds 1 to %d distinct items"
                                 % (door.name, MAX_LENGTH))
            for port, proto in seq:
                if proto not in PROTOCOLS or not 1 <= port <= 65535:
                    raise ValueError("door %r: bad knock %r" % (door.name, (port, proto)))
            if not window.valid_from < window.valid_until:
                raise ValueError("door %r: empty window" % door.name)
            slot = _slot(door, window)
            if slot in slots:
                raise ValueError("door %r: two windows in slot %d (at most %d periods and %d "
                                 "uses at once)" % (door.name, slot, PERIOD_SLOTS, USE_SLOTS))
            slots.add(slot)


class _Ids:
    """Ids of roots and shared nodes: a hash of what they stand for, so that
    the same node gets the same id in the next render; probed on collision."""

    def __init__(self):
        self.used = {}

    def get(self, cls, depth, what):
        digest = hashlib.sha256(repr(what).encode()).digest()
        value = int.from_bytes(digest[:4], "big")
        while True:
            node = SHARED | (cls << CLASS_SHIFT) | (value << 5 & HASH_MASK) | depth
            if value << 5 & HASH_MASK and self.used.setdefault(node, what) == what:
                return node
            value += 1


# A window to load, with what its node ids and elements are made of: KEY
# (door number, slot) names it; BASE is its private nodes' id at depth 0;
# EXPIRES is when its last knock can no longer come; SEQ its sequence.
_Entry = namedtuple("_Entry", "door window cls key base expires seq")


def _entries(plan, now):
    """The classes ({index: class key}) and the windows of PLAN still to be
    knocked at NOW (valid_until > now), as _Entry tuples, in a stable order
    (door number, then first second of validity), so that ids and their
    probing are the same from one render to the next."""
    keys = sorted({_class_key(d, w) for d in plan for w in d.windows if w.valid_until > now})
    if len(keys) > MAX_CLASSES:
        raise ValueError("%d classes of door settings (family, seq_timeout, open_seconds, "
                         "ports, single use, period); at most %d" % (len(keys), MAX_CLASSES))
    index = {key: i + 1 for i, key in enumerate(keys)}
    entries = []
    for door in sorted(plan, key=lambda d: d.number):
        for window in sorted(door.windows, key=lambda w: (w.valid_from, w.use or 0)):
            if window.valid_until > now:
                cls = index[_class_key(door, window)]
                slot = _slot(door, window)
                entries.append(_Entry(
                    door, window, cls, (door.number, slot),
                    (cls << CLASS_SHIFT) | (door.number << 12) | (slot << 5),
                    window.valid_until + door.seq_timeout,
                    tuple((int(p), proto) for p, proto in window.sequence)))
    return {i: key for key, i in index.items()}, entries


class _Tries:
    """The edges of the cohorts' tries, as elements: `rtrans` (from a root),
    `trans` (from any other node) and `firsts` (the first knocks of all), each
    {key: (value, expires)}: an element lives until the last moment a knock
    may still need it, and the kernel then drops it itself."""

    def __init__(self, ids):
        self.elements = {"trans": {}, "rtrans": {}, "firsts": {}}
        self.finals = {}     # final edge key -> (door name, start, use), single-use windows
        self.ids = ids
        self.done_paths = set()

    def put(self, key, value, expires):
        if key[0] & KIND_MASK == SHARED:
            table = self.elements["rtrans"]
            # The first knocks of all: packets of sources that have made no
            # progress go no further unless they are to one of these.
            first = self.elements["firsts"].get(key[1:])
            if first is None or expires > first[1]:
                self.elements["firsts"][key[1:]] = (None, expires)
        else:
            table = self.elements["trans"]
        old = table.get(key)
        if old is None or (old[0] == value and expires > old[1]):
            table[key] = (value, expires)
        elif old[0] != value:
            raise ValueError("edge %r leads to two nodes (one sequence is a prefix of "
                             "another valid at the same time?)" % (key,))

    def accept(self, entry):
        """The accepting node of ENTRY's window: its class and door, so that
        the opening knows the door's ports and counter."""
        return (entry.cls << CLASS_SHIFT) | ACCEPT | entry.door.number

    def final(self, entry, key):
        """KEY is the final edge of ENTRY's window: remembered if it burns."""
        if entry.window.use is not None:
            self.finals[key] = (entry.door.name, entry.window.start, entry.window.use)

    def whole_path(self, entry, depth):
        """The edges private to one window, from its node at DEPTH (below
        its last) to its end: written straight into `trans`, since no other
        window's edge starts at its own nodes."""
        seq, base, expires = entry.seq, entry.base, entry.expires
        last = len(seq) - 1
        trans = self.elements["trans"]
        for k in range(depth, last - 1):
            port, proto = seq[k + 1]
            trans[(base | k, proto, port)] = (base | (k + 1), expires)
        key = (base | (last - 1), seq[last][1], seq[last][0])
        trans[key] = (self.accept(entry), expires)
        self.final(entry, key)

    def grow(self, node, depth, group, prefix, expires):
        """The edges out of NODE (at DEPTH, reached by the knocks PREFIX) for
        the windows of GROUP, and, depth first, everything below them."""
        by_item = {}
        for entry in group:
            by_item.setdefault(entry.seq[depth], []).append(entry)
        for item, members in by_item.items():
            key = (node, item[1], item[0])
            ending = [e for e in members if len(e.seq) == depth + 1]
            if ending:
                if len(ending) != len(members) or len({self.accept(e) for e in ending}) > 1:
                    raise ValueError("doors %s: a sequence that is, or starts, another valid "
                                     "at the same time" % ", ".join(sorted(
                                         e.door.name for e in members)))
                self.put(key, self.accept(ending[0]), expires)
                for entry in ending:
                    self.final(entry, key)
            elif len(members) == 1:
                # One window from here on: its own path, node ids from its base.
                entry = members[0]
                self.put(key, entry.base | depth, expires)
                if (entry.key, depth) not in self.done_paths:
                    self.done_paths.add((entry.key, depth))
                    self.whole_path(entry, depth)
            else:
                # A node shared by several windows: the longest seq_timeout
                # of theirs keeps the slowest one's progress.
                cls = max(members, key=lambda e: (e.door.seq_timeout, -e.cls)).cls
                child = self.ids.get(cls, depth, ("node", prefix + (item,),
                                                  tuple(sorted(e.key for e in members))))
                self.put(key, child, expires)
                self.grow(child, depth + 1, members, prefix + (item,), expires)


def _door_elements(plan, entries):
    """The static elements about doors: the guarded ports of each family (of
    the windows loaded), the guard's port -> port map, each door's ports
    (gp<i>: door number -> its i-th port) and counter (opens: door number ->
    counter name), for every door of PLAN: a knock of a window that has just
    left the plan may still end."""
    guarded = {"ip": set(), "ip6": set()}
    for entry in entries:
        family = entry.door.family
        for name in ("ip", "ip6") if family == "inet" else (family,):
            guarded[name].update(entry.door.ports)
    elements = {"guarded4": {p: (None, None) for p in guarded["ip"]},
                "guarded6": {p: (None, None) for p in guarded["ip6"]},
                "gport": {p: (p, None) for p in guarded["ip"] | guarded["ip6"]}}
    for i in range(MAX_PORTS):
        elements["gp%d" % i] = {d.number: (d.ports[i], None) for d in plan if len(d.ports) > i}
    elements["opens"] = {d.number: (counter_name(d.number), None) for d in plan}
    return elements


def counter_name(number):
    """The named counter of door NUMBER's openings."""
    return "door%d" % number


def build(plan, now):
    """The ruleset's data for PLAN (a list of Door) at NOW (UNIX seconds):
    windows whose first knock can no longer come (valid_until <= now) are left
    out.  Raises ValueError on a plan the ruleset cannot hold."""
    plan = list(plan)
    _check(plan)
    classes, entries = _entries(plan, now)
    ids = _Ids()
    tries = _Tries(ids)
    # Cohorts: the windows valid over the same time (same valid_from and
    # valid_until) share a root; a packet tries the roots of the cohorts
    # valid at its `meta time`, so each window's first edge is loaded once.
    cohorts = {}
    for entry in entries:
        cohorts.setdefault((entry.window.valid_from, entry.window.valid_until), []).append(entry)
    cohort_roots = []
    for (valid_from, valid_until), group in sorted(cohorts.items()):
        root = ids.get(0, 0, ("root", valid_from, valid_until))
        cohort_roots.append((valid_from, valid_until, root))
        tries.grow(root, 0, group, (), valid_until + max(e.door.seq_timeout for e in group))
    elements = dict(tries.elements, **_door_elements(plan, entries))
    return Ruleset(elements, classes, cohort_roots, tries.finals)


# ------------------------------------------------------------------ rendering

DECLARATIONS = """\
table inet %(t)s {
	map trans { type mark . inet_proto . inet_service : mark; flags dynamic,timeout; }
	map rtrans { type mark . inet_proto . inet_service : mark; flags dynamic,timeout; }
	set firsts { type inet_proto . inet_service; flags timeout; }
	map gp0 { type mark : mark; }
	map gp1 { type mark : mark; }
	map gp2 { type mark : mark; }
	map gp3 { type mark : mark; }
	set guarded4 { type inet_service; }
	set guarded6 { type inet_service; }
	map gport { type inet_service : mark; }
	map opens { type mark : counter; }
	set spent { type mark . inet_proto . inet_service; flags dynamic,timeout; size %(n)d; }
%(sources)s	chain input { type filter hook input priority filter - 10; policy accept; }
	chain root4 { }
	chain knock4 { }
	chain guard4 { }
	chain root6 { }
	chain knock6 { }
	chain guard6 { }
}
"""


def _source_declarations(size):
    """Each family's per-source maps and sets, with their spares (see
    _spare_add), and the sources each port is open for."""
    lines = []
    for v, address in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        for spare in ("", "s"):
            lines += ["\tmap %s%s%s { type %s : mark; flags dynamic,timeout; size %d; }"
                      % (name, v, spare, address, size) for name in ("save", "prev", "st")]
            lines.append("\tset started%s%s { type %s; flags dynamic,timeout; size %d; }"
                         % (v, spare, address, size))
        lines.append("\tset allow%s { type %s . mark; flags dynamic,timeout; size %d; }"
                     % (v, address, size))
    return "\n".join(lines) + "\n"


CHAINS = ("input", "root4", "knock4", "guard4", "root6", "knock6", "guard6")
STATIC = TIMED + ("gp0", "gp1", "gp2", "gp3", "guarded4", "guarded6", "gport", "opens")
MAPS = ("trans", "rtrans", "gp0", "gp1", "gp2", "gp3", "gport", "opens")


# The base chain: established traffic leaves at once; pure SYNs and new UDP
# datagrams are knocks; new connections to a guarded port meet the guard.
INPUT_RULES = [
    "ct state established,related accept",
    "meta nfproto ipv4 tcp flags & (fin|syn|rst|ack) == syn jump knock4",
    "meta nfproto ipv4 meta l4proto udp ct state new jump knock4",
    "meta nfproto ipv6 tcp flags & (fin|syn|rst|ack) == syn jump knock6",
    "meta nfproto ipv6 meta l4proto udp ct state new jump knock6",
    "meta nfproto ipv4 tcp dport @guarded4 jump guard4",
    "meta nfproto ipv6 tcp dport @guarded6 jump guard6",
]

# Per family: the chains' suffix, the source address, the door families served.
CHAIN_FAMILIES = (("4", "ip saddr", ("ip", "inet")), ("6", "ip6 saddr", ("ip6", "inet")))


def _rules(ruleset):
    """The rules, chain by chain: their number depends on the cohorts and
    classes, not on the doors."""
    out = {"input": list(INPUT_RULES)}
    for v, saddr, served in CHAIN_FAMILIES:
        out["root" + v] = _root_rules(ruleset.cohorts, v, saddr)
        out["knock" + v] = (_step_rules(v, saddr)
                            + _class_rules(sorted(ruleset.classes.items()), v, saddr, served)
                            + _restore_mark(v, saddr))
        out["guard" + v] = _guard_rules(v, saddr)
    return out


# The per-source maps a packet rewrites (its progress, when its clock
# started, its own mark, the node it leaves) each have a spare ("s"): on
# kernel 6.18 a packet-path `add` right after a `delete` of the same key
# fails now and then (about 1 in 3,000, more under load), and a second `add`
# in the same map fails too, while one into another map holds (measured:
# 0 lost in 90,000).  Each write goes to the map, and to its spare when the
# map did not take it; each read tries the map, then the spare.

def _spare_add(name, saddr, condition, what):
    """A write of WHAT (`timeout T : DATA`, or `timeout T` for a set) for the
    source into NAME, and the same into its spare when NAME did not take
    it; CONDITION: the matches both rules start with."""
    return ["%sadd @%s { %s %s }" % (condition, name, saddr, what),
            "%s%s != @%s add @%ss { %s %s }" % (condition, saddr, name, name, saddr, what)]


def _spare_delete(name, saddr, condition="", data=True):
    """The source's entry gone from NAME and from its spare."""
    key = "%s : 0" % saddr if data else saddr
    return "%sdelete @%s { %s } delete @%ss { %s }" % (condition, name, key, name, key)


def _keep_prev(v, saddr, condition=""):
    """The rules that remember the node a packet leaves (for the burn of a
    single-use final edge, which is keyed on it): rules of their own, so
    that a write that fails costs the record, never the knock."""
    return [_spare_delete("prev" + v, saddr, condition)] + _spare_add(
        "prev" + v, saddr, condition, "timeout %ds : meta mark" % SCRATCH_TIMEOUT)


def _save_mark(v, saddr):
    """The packet's own mark, saved: the mark is our scratch register."""
    return [_spare_delete("save" + v, saddr)] + _spare_add(
        "save" + v, saddr, "", "timeout %ds : meta mark" % SCRATCH_TIMEOUT)


def _restore_mark(v, saddr):
    """The packet's own mark back, from the map or its spare."""
    return ["meta mark set %s map @save%s" % (saddr, v),
            "%s != @save%s meta mark set %s map @save%ss" % (saddr, v, saddr, v),
            _spare_delete("save" + v, saddr)]


def _read_progress(v, saddr):
    """The node the source is at (the mark stays a root when it has none)."""
    return ["meta mark set %s map @st%s" % (saddr, v),
            "meta mark 0x%08x meta mark set %s map @st%ss" % (SHARED, saddr, v)]


def _root_rules(cohorts, v, saddr):
    """The roots of the cohorts valid now, tried in turn while the packet
    has not moved (its mark is still a root: SHARED with class 0)."""
    rules = []
    for valid_from, valid_until, root in cohorts:
        now_a_root = ("meta time >= %d meta time < %d meta mark & 0x%08x == 0x%08x "
                      % (valid_from, valid_until, KIND_MASK, SHARED))
        rules += ["%smeta mark set 0x%08x" % (now_a_root, root)]
        rules += _keep_prev(v, saddr, "meta mark 0x%08x " % root)
        rules.append("meta mark 0x%08x meta mark . meta l4proto . th dport != @spent "
                     "meta mark set meta mark . meta l4proto . th dport map @rtrans" % root)
    return rules


def _step_rules(v, saddr):
    """A knock moves its source one edge on, whatever the door: the same
    rules for every class."""
    return [
        # The fast way out: no progress, and no door starts with this port.
        "%s != @st%s %s != @st%ss meta l4proto . th dport != @firsts return"
        % (saddr, v, saddr, v),
    ] + _save_mark(v, saddr) + [
        "meta mark set 0x%08x" % SHARED,
    ] + _read_progress(v, saddr) + [
        # Progress older than seq_timeout, counted from the first knock as
        # knockd counts it, is void.
        "meta mark & 0x%08x != 0x%08x %s != @started%s %s != @started%ss meta mark set 0x%08x"
        % (KIND_MASK, SHARED, saddr, v, saddr, v, SHARED),
        # A burned final edge (single use) counts as missing, even if a
        # top-up racing with the burn loaded it again.
        "meta mark . meta l4proto . th dport @spent meta mark set 0x%08x" % SHARED,
    ] + _keep_prev(v, saddr, "meta mark & 0x%08x != 0x%08x " % (KIND_MASK, SHARED)) + [
        "meta mark & 0x%08x != 0x%08x meta mark set meta mark . meta l4proto . th dport "
        "map @trans" % (KIND_MASK, SHARED),
        # No edge (the catch-all gives 0): the same packet from the roots.
        "meta mark 0 meta mark set 0x%08x" % SHARED,
        "meta mark & 0x%08x == 0x%08x jump root%s" % (KIND_MASK, SHARED, v),
        "meta mark & 0x%08x == 0x%08x meta mark set 0" % (KIND_MASK, SHARED),
        # A first node starts the clock.
        _spare_delete("started" + v, saddr, "meta mark != 0 meta mark & 0x%08x == 0 "
                      % (ACCEPT | DEPTH_MASK), data=False),
    ]


def _class_rules(classes, v, saddr, served):
    """What depends on the door settings (a dynset's timeout comes from its
    rule, not from data): one rule a class for the clock and the progress,
    and for the classes this family serves, the opening and the burn."""
    rules = []
    for cls, key in classes:
        rules += _spare_add("started" + v, saddr, "meta mark & 0x%08x == 0x%08x " % (
            CLASS_MASK | ACCEPT | DEPTH_MASK, cls << CLASS_SHIFT), "timeout %ds" % key[1])
    rules.append(_spare_delete("st" + v, saddr))
    for cls, key in classes:
        rules += _spare_add("st" + v, saddr, "meta mark & 0x%08x == 0x%08x " % (
            CLASS_MASK, cls << CLASS_SHIFT), "timeout %ds : meta mark" % key[1])
    for cls, key in classes:
        if key[0] in served:
            rules += _accept_rules(cls, key, v, saddr)
    for cls, key in classes:
        if key[4] and key[0] in served:
            # Single use: the final edge goes, in the packet path, and is recorded.
            for prev in ("prev" + v, "prev%ss" % v):
                rules.append("meta mark & 0x%08x == 0x%08x meta mark set %s map @%s "
                             "add @spent { meta mark . meta l4proto . th dport timeout %ds } "
                             "delete @trans { meta mark . meta l4proto . th dport : 0 } "
                             "delete @rtrans { meta mark . meta l4proto . th dport : 0 }"
                             % (CLASS_MASK | ACCEPT, cls << CLASS_SHIFT | ACCEPT, saddr, prev,
                                key[5]))
    return rules


def _accept_rules(cls, key, v, saddr):
    """An accepting node of class CLS opens each of its door's ports for the
    source (the node holds the door number; gp<i> its i-th port), and each
    rule puts the node back in the mark for the next one.  The first port's
    rule also counts the opening in the door's counter, once the source is
    in allow (a full set breaks the rule before it counts): one lookup in
    `opens` whatever the number of doors."""
    rules = []
    for i in range(key[3]):
        count = (" meta mark set %s map @st%s meta mark set meta mark & 0x%08x "
                 "counter name meta mark map @opens" % (saddr, v, DOOR_MASK)) if i == 0 else ""
        rules.append("meta mark & 0x%08x == 0x%08x meta mark set meta mark & 0x%08x "
                     "meta mark set meta mark map @gp%d "
                     "add @allow%s { %s . meta mark timeout %ds }%s"
                     % (CLASS_MASK | ACCEPT, cls << CLASS_SHIFT | ACCEPT, DOOR_MASK,
                        i, v, saddr, key[2], count))
        rules += _read_progress(v, saddr)[:1] + [
            "meta mark & 0x%08x != 0x%08x meta mark set %s map @st%ss"
            % (CLASS_MASK | ACCEPT, cls << CLASS_SHIFT | ACCEPT, saddr, v)]
    return rules


def _guard_rules(v, saddr):
    """A new connection to a guarded port passes only from a source the
    port is open for (with the packet's own mark back); the rest is dropped."""
    return _save_mark(v, saddr) + [
        "meta mark set tcp dport map @gport",
    ] + ["%s . meta mark @allow%s %s @%s meta mark set %s map @%s %s accept"
         % (saddr, v, saddr, save, saddr, save, _spare_delete("save" + v, saddr))
         for save in ("save" + v, "save%ss" % v)] + [
        # Neither copy of the mark (both writes failed): the connection still passes.
        "%s . meta mark @allow%s accept" % (saddr, v),
        "drop",
    ]


def _element(name, key, value, timeout):
    t = "" if timeout is None else " timeout %ds" % timeout
    if name in ("trans", "rtrans"):
        return "0x%08x . %s . %d%s : 0x%08x" % (key[0], key[1], key[2], t, value)
    if name in ("guarded4", "guarded6"):
        return "%d" % key
    if name == "opens":
        return '%d : "%s"' % (key, value)
    if name == "firsts":
        return "%s . %d%s" % (key[0], key[1], t)
    return "%d : %d" % (key, value)        # gport: port -> port; gp<i>: group -> port


def _element_lines(verb, name, items, now, chunk=2000):
    items = sorted(items)
    for i in range(0, len(items), chunk):
        yield "%s element inet %s %s { %s }" % (verb, TABLE, name, ", ".join(
            _element(name, k, v, None if e is None else max(1, e - now))
            for k, (v, e) in items[i:i + chunk]))


# A top-up deletes no element that expires within this many seconds: the
# kernel drops it itself, and `delete` of an element that has just expired
# would fail the whole transaction.
DELETE_MARGIN = 10


# What render gives kernel.apply: TEXT for one `nft -f` transaction, and
# STAGED, the elements of a top-up that no packet can reach until TEXT is
# loaded ({set name: [(key, value, timeout seconds)]}), which netlink.py
# writes first, in a transaction of its own, without nft's parser.
Load = namedtuple("Load", "text staged")


def render(plan, now, loaded=None, fresh=()):
    """The Load that makes the table hold PLAN from NOW on.

    LOADED None: a full load (creates the table, or replaces every static
    map of an existing one; packet-path state, open doors, spent uses and
    the doors' counters stay), all in its text.  LOADED the Ruleset returned
    with the Load applied last: a top-up that only adds what is new and
    deletes what the plan dropped before its time; elements of the past
    expire in the kernel by themselves.  A top-up stages the new edges that
    hang from nodes no packet can reach yet (a new window's) and the new
    first knocks: what a packet sees still changes in one transaction, the
    text's.  The counters of the doors numbered in FRESH (new to the
    caller's record) start from zero.  Returns (load, ruleset): keep the
    ruleset for the next top-up."""
    ruleset = build(plan, now)
    lines = [DECLARATIONS % {"t": TABLE, "n": DYNAMIC_SIZE,
                             "sources": _source_declarations(DYNAMIC_SIZE)}]
    # `add counter` of an existing counter keeps its value (a full load
    # keeps the doors' counts); the counters must exist before `opens`
    # names them.
    doors = ruleset.elements["opens"]
    known = {} if loaded is None else loaded.elements.get("opens", {})
    lines.extend("add counter inet %s %s" % (TABLE, name)
                 for number, (name, _) in sorted(doors.items()) if number not in known)
    if loaded is None:
        for name in STATIC:
            lines.append("flush %s inet %s %s" % ("map" if name in MAPS else "set", TABLE, name))
    # Not the count a door removed by a full load left under its number:
    # deleted and made again, after the flush, so that nothing names it.
    for number in sorted(set(fresh) & set(doors) - set(known)):
        lines += ["delete counter inet %s %s" % (TABLE, counter_name(number)),
                  "add counter inet %s %s" % (TABLE, counter_name(number))]
    rules = _rules(ruleset)
    # Only the chains whose rules changed are rewritten: binding a rule's
    # lookup to `trans` makes the kernel walk all its elements (a loop check,
    # nf_tables_bind_set), 80 ms a chain at 10,000 doors.  In a full load
    # the rules come before the elements, so the walk meets empty maps.
    for chain in CHAINS:
        if loaded is None or not loaded.rules or loaded.rules.get(chain) != rules[chain]:
            lines.append("flush chain inet %s %s" % (TABLE, chain))
            lines.extend("add rule inet %s %s %s" % (TABLE, chain, rule) for rule in rules[chain])
    state, staged = {}, {}
    if loaded is None:
        lines.append("add element inet %s trans { * : 0 }" % TABLE)
        for name in STATIC:
            lines.extend(_element_lines("add", name, ruleset.elements[name].items(), now))
            state[name] = dict(ruleset.elements[name])
    else:
        hidden = _hidden(loaded)
        for name in STATIC:
            changes, state[name], staged[name] = _topup_lines(
                name, ruleset.elements[name], loaded.elements.get(name, {}), now, hidden)
            lines.extend(changes)
        # A door gone from the plan: its counter goes, after its `opens` element.
        lines.extend("delete counter inet %s %s" % (TABLE, name)
                     for number, (name, _) in sorted(known.items()) if number not in doors)
    return (Load("\n".join(lines) + "\n", {name: items for name, items in staged.items() if items}),
            ruleset._replace(elements=state, rules=rules))


def _hidden(loaded):
    """Whether a new element of a set is out of every packet's reach while
    LOADED is what the kernel holds: a first knock (it only spares a packet
    the fast way out), or an edge from a node that no rule and no loaded
    edge leads to."""
    reached = {root for _, _, root in loaded.cohorts}
    for name in ("trans", "rtrans"):
        reached.update(value for value, _ in loaded.elements.get(name, {}).values())
    return lambda name, key: name == "firsts" or (name in ("trans", "rtrans")
                                                  and key[0] not in reached)


def _topup_lines(name, new, old, now, hidden):
    """The lines that turn set or map NAME from OLD (as loaded) into NEW
    ({key: (value, expires)} both), the elements staged instead (new ones
    HIDDEN(name, key) says no packet reaches yet), and what the kernel then
    holds."""
    kept = dict(new)
    gone, added = [], []
    for key, item in old.items() - new.items():            # what is not as loaded
        fresh = new.get(key)
        value, expires = item
        if fresh is not None and fresh[0] == value:
            if expires is not None and fresh[1] > expires:
                gone.append((key, item))                   # to live longer
                added.append((key, fresh))
            else:
                kept[key] = item
        elif expires is None or expires > now + DELETE_MARGIN:
            gone.append((key, item))
            if fresh is not None:
                added.append((key, fresh))
    staged = []
    for key in new.keys() - old.keys():
        value, expires = new[key]
        if hidden(name, key):
            staged.append((key, value, int(max(1, expires - now))))
        else:
            added.append((key, (value, expires)))
    lines = []
    if gone:
        # `delete` of an absent element would fail the transaction:
        # `add` first what the packet path may have deleted (a burned
        # edge) or what may just have expired.
        lines.extend(_element_lines("add", name, [
            (k, (v, e)) for k, (v, e) in gone
            if name in ("trans", "rtrans") or (e is not None and e <= now + DELETE_MARGIN)
        ], now))
        lines.extend(_element_lines("delete", name, [(k, (v, None)) for k, (v, e)
                                                     in gone], now))
    lines.extend(_element_lines("add", name, added, now))
    return lines, kept, staged


def remove_text():
    """The transaction that removes the table (uninstall)."""
    return "table inet %s\ndelete table inet %s\n" % (TABLE, TABLE)
