"""The bulk of a top-up written straight to the kernel: set elements in one
nf_tables netlink batch (one transaction of its own), without nft's parser.

A top-up at 10,000 doors adds about 110,000 elements; nft spends about 5 µs
of its own CPU on each (parse and evaluate), this module about 0.3 µs, and
the kernel's part is the same either way (docs/NFTABLES.md, Top-ups).  Only
elements that no packet can reach yet come here (ruleset.render stages
them): the rules and edges that lead to them follow in the `nft -f`
transaction, so what a packet sees still changes in one step.

The wire format (linux/netfilter/nfnetlink.h and nf_tables.h): a batch is
BATCH_BEGIN, NEWSETELEM messages, BATCH_END; the kernel commits it whole or
not at all, and acknowledges BATCH_END once committed.
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
    for name, items in sorted(staged.items()):
        encode, size = ENCODERS[name]
        head = _attribute(LIST_TABLE, table.encode() + b"\0") + \
            _attribute(LIST_SET, name.encode() + b"\0")
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


def _error(reply, offset, length, flags):
    """The kernel's message for an NLMSG_ERROR, with its extended ack text."""
    code = -struct.unpack_from("=i", reply, offset + 16)[0]
    text = os.strerror(code)
    if flags & NLM_F_ACK_TLVS:
        # After the error code and the original header (NETLINK_CAP_ACK).
        at, end = offset + 16 + 4 + 16, offset + length
        while at + 4 <= end:
            size, kind = struct.unpack_from("=HH", reply, at)
            if size < 4:
                break
            if kind & ~NLA_F_NESTED == NLMSGERR_ATTR_MSG:
                text += " (%s)" % reply[at + 4:at + size].rstrip(b"\0").decode("utf-8", "replace")
            at += (size + 3) & ~3
    return code, text


def add_elements(table, staged, netns=None):
    """Add STAGED ({set name: [(key, value, timeout seconds)]}) to TABLE's
    sets in one transaction.  Raises RuntimeError, with the kernel's reason,
    if it did not commit (nothing is then added)."""
    if not any(staged.values()):
        return
    data, end = batch(table, staged)
    try:
        sock = _netlink_socket(netns)
    except OSError as exc:
        raise RuntimeError("netlink: %s" % exc) from None
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + 65536)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))
            # The kernel handles the batch within this call; its answer is
            # queued when it returns (the timeout is for a batch it drops
            # without a word, which a bug of ours would be).
            sock.settimeout(10)
            sock.send(data)
            while True:
                reply = sock.recv(1 << 16)
                offset = 0
                while offset + 20 <= len(reply):
                    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", reply, offset)
                    if kind == NLMSG_ERROR:
                        code, text = _error(reply, offset, length, flags)
                        if code:
                            raise RuntimeError("netlink: the kernel refused the elements: %s"
                                               % text)
                        if sequence == end:
                            return
                    offset += max((length + 3) & ~3, 16)
        except OSError as exc:
            raise RuntimeError("netlink: %s" % exc) from None
