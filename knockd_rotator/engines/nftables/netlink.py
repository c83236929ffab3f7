"""nf_tables over netlink, where nft is too slow at 10,000 doors: the bulk of
a top-up written in, and what `status` reads out.

Writing: a top-up at 10,000 doors adds about 110,000 elements; nft spends
about 5 µs of its own CPU on each (parse and evaluate), this module about
0.3 µs, and the kernel's part is the same either way (docs/NFTABLES.md,
Top-ups).  Only elements that no packet can reach yet come here
(ruleset.render stages them): the rules and edges that lead to them follow
in the `nft -f` transaction, so what a packet sees still changes in one
step.  A batch is BATCH_BEGIN, NEWSETELEM messages, BATCH_END; the kernel
commits it whole or not at all, and acknowledges BATCH_END once committed.

Reading: nft 1.0.6 fetches every set's elements before it lists a rule or a
counter (7.5 s at 10,000 doors); a dump of just the rules, counters or set
asked for takes milliseconds.

The wire format: linux/netfilter/nfnetlink.h and nf_tables.h.
"""

import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM = 12
BATCH_BEGIN, BATCH_END = 0x10, 0x11
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLM_F_ACK_TLVS = 0x200
NLA_F_NESTED = 0x8000
NLMSGERR_ATTR_MSG = 1
NFPROTO_INET = 1
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
SO_SNDBUFFORCE = 32
CLONE_NEWNET = 0x40000000

LIST_TABLE, LIST_SET, LIST_ELEMENTS = 1, 2, 3        # NFTA_SET_ELEM_LIST_*
LIST_ELEM = 1 | NLA_F_NESTED                         # NFTA_LIST_ELEM
KEY, DATA, TIMEOUT = 1 | NLA_F_NESTED, 2 | NLA_F_NESTED, 4   # NFTA_SET_ELEM_*
VALUE = 1                                            # NFTA_DATA_VALUE

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# An element of trans or rtrans: key `mark . inet_proto . inet_service`
# (each field of a concatenation takes 4 bytes: the mark in host order, the
# protocol's byte, the port in network order), data `mark`, a timeout in
# milliseconds (big-endian).  An element of firsts: the key's last two fields.
_EDGE = struct.Struct("=HHHHHHIB3xH2xHHHHIHH8s")
_FIRST = struct.Struct("=HHHHHHB3xH2xHH8s")


def _edge(key, value, timeout):
    node, proto, port = key
    return _EDGE.pack(_EDGE.size, LIST_ELEM, 20, KEY, 16, VALUE, node, PROTOCOLS[proto],
                      socket.htons(port), 12, DATA, 8, VALUE, value, 12, TIMEOUT, timeout)


def _first(key, value, timeout):
    proto, port = key
    return _FIRST.pack(_FIRST.size, LIST_ELEM, 16, KEY, 12, VALUE, PROTOCOLS[proto],
                       socket.htons(port), 12, TIMEOUT, timeout)


ENCODERS = {"trans": (_edge, _EDGE.size), "rtrans": (_edge, _EDGE.size),
            "firsts": (_first, _FIRST.size)}
NEST_LIMIT = 0xFFFF           # an attribute's length is 16 bits


def _attribute(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind, flags, sequence, family, body, resource=0):
    payload = struct.pack("=BBH", family, 0, socket.htons(resource)) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, sequence, 0) + payload


def batch(table, staged, first_sequence=1):
    """The bytes of one batch adding STAGED ({set name: [(key, value,
    timeout seconds)]}) to TABLE's sets, and the sequence number of its
    BATCH_END (the one message the kernel acknowledges on success)."""
    sequence = first_sequence
    messages = [_message(BATCH_BEGIN, NLM_F_REQUEST, sequence, socket.AF_UNSPEC, b"",
                         NFNL_SUBSYS_NFTABLES)]
    timeouts = {}
    for set_name, items in sorted(staged.items()):
        encode, size = ENCODERS[set_name]
        head = _attribute(LIST_TABLE, name(table)) + _attribute(LIST_SET, name(set_name))
        per_message = (NEST_LIMIT - 4) // size
        for start in range(0, len(items), per_message):
            elements = b"".join(
                encode(key, value, timeouts.get(seconds) or timeouts.setdefault(
                    seconds, (seconds * 1000).to_bytes(8, "big")))
                for key, value, seconds in items[start:start + per_message])
            sequence += 1
            messages.append(_message(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
                NLM_F_REQUEST | NLM_F_CREATE, sequence, NFPROTO_INET,
                head + struct.pack("=HH", 4 + len(elements), LIST_ELEMENTS | NLA_F_NESTED)
                + elements))
    sequence += 1
    messages.append(_message(BATCH_END, NLM_F_REQUEST | NLM_F_ACK, sequence, socket.AF_UNSPEC,
                             b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(messages), sequence


def _setns(fd):
    import ctypes              # only for a namespace (tests, bench); os.setns is 3.12's
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET):
        raise OSError(ctypes.get_errno(), "setns: %s" % os.strerror(ctypes.get_errno()))


def _netlink_socket(netns):
    """A netfilter netlink socket, in network namespace NETNS (as `ip netns`
    names it) if given: a socket stays in the namespace it was made in."""
    if not netns:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    with open("/proc/thread-self/ns/net") as own, open("/run/netns/" + netns) as target:
        _setns(target.fileno())
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        finally:
            _setns(own.fileno())


def _exchange(message, netns, send_buffer=None):
    """Send MESSAGE on a new netfilter socket (in NETNS) and yield each
    message of the kernel's answer: (type, flags, sequence, what follows
    its header)."""
    with _netlink_socket(netns) as sock:
        if send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, send_buffer)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        # The kernel handles a batch within send(); its answer is queued
        # when it returns (the timeout is for one it drops without a word,
        # which a bug of ours would be).
        sock.settimeout(10)
        sock.send(message)
        while True:
            reply = sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(reply):
                length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", reply, offset)
                yield kind, flags, sequence, reply[offset + 16:offset + length]
                offset += max((length + 3) & ~3, 16)


def _error(payload, flags):
    """The errno of an NLMSG_ERROR's PAYLOAD (0: an acknowledgement), and
    its text, with the kernel's extended ack message if any."""
    code = -struct.unpack_from("=i", payload)[0]
    text = os.strerror(code)
    if flags & NLM_F_ACK_TLVS:
        # After the error code and the original header (NETLINK_CAP_ACK).
        for kind, value in attribute_list(payload[4 + 16:]):
            if kind == NLMSGERR_ATTR_MSG:
                text += " (%s)" % string(value)
    return code, text


def add_elements(table, staged, netns=None):
    """Add STAGED ({set name: [(key, value, timeout seconds)]}) to TABLE's
    sets in one transaction.  Raises RuntimeError, with the kernel's reason,
    if it did not commit (nothing is then added)."""
    if not any(staged.values()):
        return
    data, end = batch(table, staged)
    try:
        for kind, flags, sequence, payload in _exchange(data, netns, len(data) + 65536):
            if kind == NLMSG_ERROR:
                code, text = _error(payload, flags)
                if code:
                    raise RuntimeError("netlink: the kernel refused the elements: %s" % text)
                if sequence == end:
                    return
    except OSError as exc:
        raise RuntimeError("netlink: %s" % exc) from None


# ---------------------------------------------------------------- reading

NLM_F_DUMP, NLM_F_DUMP_INTR = 0x300, 0x10
NLMSG_DONE = 3
DUMP_TRIES = 3
NFT_MSG_GETTABLE, NFT_MSG_GETRULE, NFT_MSG_GETSETELEM, NFT_MSG_GETOBJ = 1, 7, 13, 19
# Attribute numbers of what table_state reads (linux/netfilter/nf_tables.h).
TABLE_NAME = 1                                   # NFTA_TABLE_NAME
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS = 1, 2, 4
EXPR_NAME, EXPR_DATA = 1, 2
META_KEY, META_TIME_NS = 2, 30                   # NFTA_META_KEY, NFT_META_TIME_NS
CMP_OP, CMP_DATA, CMP_LT, CMP_GTE = 2, 3, 2, 5
ELEM_KEY, ELEM_OBJREF = 1, 9                     # NFTA_SET_ELEM_*
OBJ_TABLE, OBJ_NAME, OBJ_TYPE, OBJ_DATA = 1, 2, 3, 4
OBJECT_COUNTER, COUNTER_PACKETS = 1, 2


def attributes(data):
    """{type: payload} of the attributes in DATA (a nested one's payload is
    bytes again; a type repeated, as in a list, keeps its last)."""
    return dict(attribute_list(data))


def attribute_list(data):
    """[(type, payload)] of the attributes in DATA, in order."""
    found, at = [], 0
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4:
            break
        found.append((kind & ~NLA_F_NESTED, data[at + 4:at + length]))
        at += (length + 3) & ~3
    return found


def string(value):
    return value.rstrip(b"\0").decode("utf-8", "replace")


def name(text):
    """A name as an attribute's payload."""
    return text.encode() + b"\0"


def elements(table, set_name, netns=None):
    """[{attribute type: payload}] of each element of TABLE's set SET_NAME
    (ELEM_KEY: the key's value, ELEM_OBJREF: the object a map names)."""
    found = []
    for answer in request(NFT_MSG_GETSETELEM, [(LIST_TABLE, name(table)),
                                                (LIST_SET, name(set_name))], netns=netns):
        for _, element in attribute_list(answer.get(LIST_ELEMENTS, b"")):
            fields = attributes(element)
            if ELEM_KEY in fields:
                fields[ELEM_KEY] = attributes(fields[ELEM_KEY]).get(VALUE, b"")
            found.append(fields)
    return found


def request(kind, fields, dump=True, netns=None):
    """The kernel's answers to one nf_tables GET message KIND for the inet
    family with FIELDS ([(attribute type, bytes)]): a list of each answer's
    attributes ({type: payload}).  Raises OSError with the kernel's errno
    (ENOENT: no such table, chain or set)."""
    body = b"".join(_attribute(field, value) for field, value in fields)
    message = _message((NFNL_SUBSYS_NFTABLES << 8) | kind,
                       NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK), 1, NFPROTO_INET, body)
    for _ in range(DUMP_TRIES):
        answers, whole = _answers(message, dump, netns)
        if whole:
            break
    return answers


def _answers(message, dump, netns):
    """(answers, whole) for MESSAGE: not WHOLE when the table changed during
    the dump (a load raced it), which the kernel flags."""
    answers, whole = [], True
    for kind, flags, _, payload in _exchange(message, netns):
        whole = whole and not flags & NLM_F_DUMP_INTR
        if kind == NLMSG_DONE:
            break
        if kind == NLMSG_ERROR:
            code, text = _error(payload, flags)
            if code:
                raise OSError(code, text)
            break
        answers.append(attributes(payload[4:]))          # after the nfgenmsg
        if not dump:
            break
    return answers, whole
