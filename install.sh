#!/bin/sh
# knockd-rotator: install, or uninstall, on a Debian-like system (as root).
#
#   ./install.sh                      install (idempotent: run it again to update)
#   ./install.sh uninstall            remove what install added, keep the secret
#   ./install.sh uninstall --purge    also remove /etc/knockd_rotator.env
#
# DESTDIR=/some/root installs under that root instead of / (for packaging and
# tests); systemctl is then left alone.  The secret is made by Python's
# `secrets` straight into a file created with mode 0600; it is never printed,
# and an existing environment file is never overwritten.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
sbin=$root/usr/local/sbin
bin=$root/usr/local/bin
# The client that /usr/local/bin runs, imported from here by a launcher, and
# the server's package, which the server in /usr/local/sbin imports.
lib=$root/usr/local/lib/knockd_rotator
package=knockd_rotator
units=$root/etc/systemd/system
env_file=$root/etc/knockd_rotator.env
state=$root/var/lib/knockd_rotator
scripts="knockd_rotator_server.py knockd_rotator_client.py"
unit_files="knockd_rotator.service knockd_rotator.timer knockd_rotator-watch.service knockd_rotator-knockd@.service"
# The files of the further knockd that add-client starts (docs/SCALE.md).
instances=$root/etc/knockd_rotator.d
# Debian's knockd.service gets a drop-in that restarts a knockd that died.
dropin_dir=$units/knockd.service.d
dropin=knockd_rotator.conf

systemctl_here() {
    if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
        systemctl "$@" || true
    fi
}

install_all() {
    install -d -m 0755 "$sbin" "$bin" "$units" "$root/etc"
    for script in $scripts; do
        install -m 0755 "$here/$script" "$sbin/$script"
    done
    # Python compiles a script it runs anew at every start (5 ms, a sixth of
    # a knock), but caches the bytecode of a module it imports: the client
    # on the PATH is a launcher that imports the compiled client.
    install -d -m 0755 "$lib"
    install -m 0644 "$here/knockd_rotator_client.py" "$lib/knockd_rotator_client.py"
    python3 -m py_compile "$lib/knockd_rotator_client.py"
    # Anew, so that a module an update removed does not stay behind.
    rm -rf "${lib:?}/$package"
    (cd "$here" && find "$package" -name '*.py') | while read -r module; do
        install -D -m 0644 "$here/$module" "$lib/$module"
    done
    python3 -m compileall -q "$lib/$package"
    cat >"$bin/knockd_rotator_client.py" <<'LAUNCHER'
#!/usr/bin/env python3
"""knockd-rotator client launcher: runs ../lib/knockd_rotator/knockd_rotator_client.py,
the whole client in one file (copy that one, or /usr/local/sbin's, to a client)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "lib",
                                "knockd_rotator"))
from knockd_rotator_client import main  # noqa: E402

sys.exit(main())
LAUNCHER
    chmod 0755 "$bin/knockd_rotator_client.py"
    for unit in $unit_files; do
        install -m 0644 "$here/$unit" "$units/$unit"
    done
    install -d -m 0755 "$dropin_dir"
    install -m 0644 "$here/knockd.service.d/$dropin" "$dropin_dir/$dropin"
    install -d -m 0700 "$instances"
    if [ -e "$env_file" ]; then
        echo "kept $env_file (never overwritten)"
        if [ -n "$(find "$env_file" -perm /077)" ]; then
            echo "warning: others can read $env_file: chmod 600 $env_file"
        fi
    else
        python3 - "$env_file" <<'PYTHON'
import os, secrets, sys
descriptor = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(descriptor, "w") as handle:
    handle.write("# knockd-rotator settings (see docs/SETTINGS.md); keep this file mode 0600\n"
                 "KNOCKD_ROTATOR_SECRET=%s\n" % secrets.token_urlsafe(32))
PYTHON
        echo "created $env_file (mode 0600) with a new secret"
    fi
    # knockd.conf holds the live sequences: Debian ships it readable by all.
    if [ -f "$root/etc/knockd.conf" ]; then
        chmod go-rwx "$root/etc/knockd.conf"
    fi
    systemctl_here daemon-reload
    cat <<NEXT
installed: $sbin/knockd_rotator_server.py (runs $lib/$package/),
           $sbin/knockd_rotator_client.py,
           $bin/knockd_rotator_client.py (runs $lib/knockd_rotator_client.py),
           $units/{$(echo $unit_files | tr ' ' ',')},
           $dropin_dir/$dropin (restarts knockd when it dies)
next steps:
  1. add a door such as [ssh_ROTATOR] to /etc/knockd.conf (README, "The first door"; every firewall: docs/DOORS.md), then
     knockd_rotator_server.py check && knockd_rotator_server.py --dry-run
  2. systemctl enable --now knockd_rotator.timer && systemctl start knockd_rotator.service
     (or, for periods under an hour: systemctl enable --now knockd_rotator-watch.service)
  3. copy $sbin/knockd_rotator_client.py and the KNOCKD_ROTATOR_* lines of
     /etc/knockd_rotator.env to each client, and knock before you log out
NEXT
}

# A stop kills knockd's children that wait to run a door's stop_command (a
# door opened in the last cmd_timeout would stay open): wait for them first,
# 60 s at most.
stop_instance() {
    if [ -n "$root" ] || ! command -v systemctl >/dev/null 2>&1; then
        return
    fi
    pid=$(systemctl show --property=MainPID --value "$1" 2>/dev/null || echo 0)
    waited=0
    while [ "${pid:-0}" -gt 0 ] && pgrep -P "$pid" >/dev/null && [ $waited -lt 60 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    systemctl disable --now "$1" || true
}

uninstall_all() {
    for unit in knockd_rotator.timer knockd_rotator.service knockd_rotator-watch.service; do
        systemctl_here disable --now "$unit"
    done
    # A boundary run the timer's service left (KillMode=process) outlives the
    # oneshot, and `stop` does not reach it: it would rotate once more and
    # make the state folder again.
    systemctl_here kill knockd_rotator.service
    # The further knockd go with their unit; their files stay, as knockd.conf does.
    for file in "$instances"/*.conf; do
        [ -e "$file" ] || continue
        stop_instance "knockd_rotator-knockd@$(basename "$file" .conf).service"
        echo "stopped knockd_rotator-knockd@$(basename "$file" .conf) (its doors stay in $file)"
    done
    for script in $scripts; do
        rm -f "$sbin/$script"
    done
    rm -f "$bin/knockd_rotator_client.py"
    rm -rf "$lib"
    for unit in $unit_files; do
        rm -f "$units/$unit"
    done
    rm -f "$dropin_dir/$dropin"
    rmdir "$dropin_dir" 2>/dev/null || true
    rm -rf "$state"
    systemctl_here daemon-reload
    if [ "${1:-}" = "--purge" ]; then
        rm -f "$env_file"
        rm -rf "$instances"
        echo "removed knockd-rotator, $env_file and $instances"
    else
        rmdir "$instances" 2>/dev/null || true
        echo "removed knockd-rotator; kept $env_file (./install.sh uninstall --purge removes it)"
    fi
}

case "${1:-install}" in
    install) install_all ;;
    uninstall)
        case "${2:-}" in
            ""|--purge) uninstall_all "${2:-}" ;;
            *) echo "error: unknown option ${2} (use: ./install.sh uninstall [--purge])" >&2; exit 2 ;;
        esac ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) echo "error: unknown command ${1} (use: ./install.sh [install|uninstall [--purge]])" >&2; exit 2 ;;
esac
