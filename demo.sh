#!/bin/sh
# knockd-rotator demo, for a Debian 12 machine, as root.  It touches nothing of
# the host's network: everything happens in a network namespace of its own,
# which it removes at the end, together with every process it started.
#
#   1. a namespace with a "service" on port 2222 that iptables drops;
#   2. knockd on the namespace's loopback, with a door [ssh_ROTATOR] whose
#      start_command lets the knocker in and whose stop_command, 5 s later,
#      shuts the door again;
#   3. knockd_rotator_server.py writes the current sequence into knockd.conf
#      and reloads knockd;
#   4. knockd_rotator_client.py knocks and waits for port 2222 to open;
#   5. the port closes again after cmd_timeout;
#   6. add-client gives a client "alice" a door and a secret of her own, and
#      her client, with only the lines add-client printed, opens the port;
#   7. the nftables engine (KNOCKD_ROTATOR_ENGINE=nftables), in a second
#      namespace, with no knockd: a door in the doors file, the server loads
#      the table inet knockd_rotator, the client's knock opens the port, a
#      replay of that single-use knock from another address opens nothing,
#      and `status` reports the table.
set -eu
cd "$(dirname "$0")"
here=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "error: the demo needs root (network namespace, iptables) (run: sudo $0)" >&2
    exit 2
fi
missing=""
for package in python3 knockd iptables nftables iproute2 procps; do
    dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q "ok installed" ||
        missing="$missing $package"
done
if [ -n "$missing" ]; then
    echo "== installing$missing"
    # Nothing installed here may start on the host's interfaces: knockd's
    # package would otherwise start it with Debian's example doors.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        trap 'rm -f "$policy"' EXIT
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    [ -z "$policy" ] || rm -f "$policy"
    trap - EXIT
fi
# knockd.conf holds live sequences and the environment file secrets: like a
# real server's, the demo's files are for root only.
umask 077

python=/usr/bin/python3
namespace="krdemo-$$"
nft_namespace="krdemo-nft-$$"
work=$(mktemp -d /tmp/knockd-rotator-demo.XXXXXX)
port=2222

cleanup() {
    pkill -KILL -f "$work.* --at " 2>/dev/null || true
    for ns in "$namespace" "$nft_namespace"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
inside() { ip netns exec "$namespace" "$@"; }
# port_is_open [NAMESPACE [SOURCE]]: a TCP connect to 127.0.0.1:$port from SOURCE.
port_is_open() {
    ip netns exec "${1:-$namespace}" "$python" -c "import socket, sys
s = socket.socket(); s.settimeout(0.3); s.bind(('${2:-127.0.0.1}', 0))
sys.exit(s.connect_ex(('127.0.0.1', $port)))"
}

echo "== 1. namespace $namespace: a service on port $port, dropped by iptables"
ip netns add "$namespace"
ip -n "$namespace" link set lo up
inside "$python" -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1 &
inside iptables -A INPUT -p tcp --dport "$port" -j DROP
# add-client's iptables doors (step 6) write the address to this recent list,
# which the rule accepts for 30 s: the hole closes even if knockd dies.
inside iptables -I INPUT -p tcp --dport "$port" -m recent --name "knockd_rotator_$port" \
    --rcheck --seconds 30 -j ACCEPT
attempts=0
until inside ss -ltn "sport = :$port" | grep -q LISTEN; do
    attempts=$((attempts + 1)); [ "$attempts" -lt 100 ] || { echo "error: the service did not start" >&2; exit 1; }
    sleep 0.1
done
port_is_open && echo "   port $port: OPEN (unexpected)" || echo "   port $port: closed"

echo "== 2. knockd on the namespace's loopback"
cat > "$work/knockd.conf" <<EOF
[options]
	logfile = $work/knockd.log

[ssh_ROTATOR]
	sequence      = 1
	seq_timeout   = 10
	tcpflags      = syn
	start_command = iptables -I INPUT -s %IP% -p tcp --dport $port -j ACCEPT
	cmd_timeout   = 5
	stop_command  = iptables -D INPUT -s %IP% -p tcp --dport $port -j ACCEPT
EOF
inside knockd -d -i lo -c "$work/knockd.conf" -p "$work/knockd.pid"
attempts=0
until grep -q "listening on lo" "$work/knockd.log" 2>/dev/null; do
    attempts=$((attempts + 1)); [ "$attempts" -lt 100 ] || { echo "error: knockd did not start" >&2; exit 1; }
    sleep 0.1
done
echo "   knockd runs (pid $(cat "$work/knockd.pid"))"

# A fresh secret for this demo.  It lives in the environment only, never on a
# command line; a real server keeps it in /etc/knockd_rotator.env (mode 0600).
KNOCKD_ROTATOR_SECRET=$("$python" -c 'import secrets; print(secrets.token_urlsafe(32))')
KNOCKD_ROTATOR_RELOAD_COMMAND="kill -HUP \$(cat $work/knockd.pid)"
KNOCKD_ROTATOR_CHECK_COMMAND="kill -0 \$(cat $work/knockd.pid)"
KNOCKD_ROTATOR_RECOVER_COMMAND="ip netns exec $namespace knockd -d -i lo -c $work/knockd.conf -p $work/knockd.pid"
KNOCKD_ROTATOR_STATE_DIR="$work/state"
KNOCKD_ROTATOR_ENV_FILE="$work/knockd_rotator.env"
KNOCKD_ROTATOR_SERVER_INTERVAL=60
# The client's memory of single-use counters, too (not the user's own).
KNOCKD_ROTATOR_USES_FILE="$work/uses.json"
export KNOCKD_ROTATOR_SECRET KNOCKD_ROTATOR_RELOAD_COMMAND KNOCKD_ROTATOR_CHECK_COMMAND \
    KNOCKD_ROTATOR_RECOVER_COMMAND KNOCKD_ROTATOR_STATE_DIR KNOCKD_ROTATOR_ENV_FILE \
    KNOCKD_ROTATOR_SERVER_INTERVAL KNOCKD_ROTATOR_USES_FILE

echo "== 3. the server writes the current sequence into knockd.conf and reloads knockd"
"$python" "$here/knockd_rotator_server.py" --config "$work/knockd.conf" --dry-run | sed 's/^/   /'
"$python" "$here/knockd_rotator_server.py" --config "$work/knockd.conf"

echo "== 4. the client computes the same sequence and knocks"
"$python" "$here/knockd_rotator_client.py" generate ssh --format knock | sed 's/^/   sequence: /'
inside "$python" "$here/knockd_rotator_client.py" knock 127.0.0.1 ssh --check "$port" | sed 's/^/   /'
grep -E "OPEN SESAME|running command" "$work/knockd.log" | sed 's/^/   knockd: /'

echo "== 5. after cmd_timeout (5 s) knockd's stop_command closes the door"
started=$(date +%s)
while port_is_open; do
    [ $(($(date +%s) - started)) -lt 20 ] || { echo "error: port $port stayed open" >&2; exit 1; }
    sleep 0.5
done
echo "   port $port: closed again after about $(($(date +%s) - started)) s more"

echo "== 6. a client of her own: add-client alice (her secret is printed once, for her)"
inside "$python" "$here/knockd_rotator_server.py" --config "$work/knockd.conf" add-client alice \
    --port "$port" --firewall iptables --host 127.0.0.1 > "$work/alice.txt"
sed 's/^/   /' "$work/alice.txt"
# Her environment: only the lines add-client printed, in a file only she can read.
(umask 077; grep '^KNOCKD_ROTATOR_' "$work/alice.txt" > "$work/alice.env")
(
    unset KNOCKD_ROTATOR_SECRET
    set -a; . "$work/alice.env"; set +a
    inside "$python" "$here/knockd_rotator_client.py" knock 127.0.0.1 alice_ssh --check "$port" |
        sed 's/^/   alice: /'
)
grep -E "alice_ssh_ROTATOR: OPEN SESAME" "$work/knockd.log" | sed 's/^/   knockd: /'

echo "== 7. the nftables engine: the kernel matches the knocks (namespace $nft_namespace, no knockd)"
ip netns add "$nft_namespace"
ip -n "$nft_namespace" link set lo up
ip netns exec "$nft_namespace" "$python" -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1 &
attempts=0
until port_is_open "$nft_namespace"; do
    attempts=$((attempts + 1)); [ "$attempts" -lt 100 ] || { echo "error: the service did not start" >&2; exit 1; }
    sleep 0.1
done
echo "   port $port before the table: open (no firewall here; a server's must let it through too)"
mkdir "$work/nft"
# The doors file (/etc/knockd_rotator.doors on a server): a door guarding the
# port, open 5 s after a knock; a single-use door, so a captured knock is spent.
echo "ssh_ROTATOR guard=$port open=5" > "$work/nft/knockd_rotator.doors"
sed 's/^/   doors: /' "$work/nft/knockd_rotator.doors"
(
    KNOCKD_ROTATOR_ENGINE=nftables
    KNOCKD_ROTATOR_SINGLE_USE=1
    KNOCKD_ROTATOR_STATE_DIR="$work/nft/state"
    KNOCKD_ROTATOR_ENV_FILE="$work/nft/knockd_rotator.env"
    KNOCKD_ROTATOR_USES_FILE="$work/nft/uses.json"
    export KNOCKD_ROTATOR_ENGINE KNOCKD_ROTATOR_SINGLE_USE KNOCKD_ROTATOR_STATE_DIR \
        KNOCKD_ROTATOR_ENV_FILE KNOCKD_ROTATOR_USES_FILE
    in_nft() { ip netns exec "$nft_namespace" "$@"; }
    server() { in_nft "$python" "$here/knockd_rotator_server.py" --config "$work/nft/knockd_rotator.doors" "$@"; }
    server check | sed 's/^/   check: /'
    server 2>&1 | sed 's/^/   /'
    in_nft nft list tables | sed 's/^/   nft: /'
    port_is_open "$nft_namespace" && echo "   port $port: OPEN (unexpected)" || echo "   port $port: closed (the table drops it)"
    # What an eavesdropper would see: this knock's ports (its first use).
    knocked=$("$python" "$here/knockd_rotator_client.py" generate ssh --format knock --use 0)
    in_nft "$python" "$here/knockd_rotator_client.py" knock 127.0.0.1 ssh --check "$port" | sed 's/^/   nftables: /'
    # The same ports again, from another address, as a replay: the kernel
    # burned that sequence at the knock, so it opens nothing.
    in_nft "$python" -c "import socket, sys
for item in sys.argv[1:]:
    port, _, protocol = item.partition(':')
    s = socket.socket(type=socket.SOCK_DGRAM if protocol == 'udp' else socket.SOCK_STREAM)
    s.bind(('127.0.0.2', 0)); s.setblocking(False)
    s.sendto(b'', ('127.0.0.1', int(port))) if protocol == 'udp' else s.connect_ex(('127.0.0.1', int(port)))
    s.close()" $knocked
    sleep 0.5
    port_is_open "$nft_namespace" 127.0.0.2 && echo "   replay from 127.0.0.2: port $port OPEN (unexpected)" ||
        echo "   replay from 127.0.0.2: port $port shut (the single-use knock was spent)"
    started=$(date +%s)
    while port_is_open "$nft_namespace"; do
        [ $(($(date +%s) - started)) -lt 20 ] || { echo "error: port $port stayed open" >&2; exit 1; }
        sleep 0.5
    done
    echo "   nftables: port $port closed again after about $(($(date +%s) - started)) s more (open=5)"
    server status | sed 's/^/   status: /'
)
echo "== demo done: the namespaces, knockd, the table and the temp files are removed"
