#!/bin/sh
# Checks the meshchat systemd units with `systemd-analyze verify`.
#
#   deploy/systemd/verify.sh            # every *.service in this directory
#   deploy/systemd/verify.sh FILE...    # these unit files
#
# `systemd-analyze verify` refuses a unit whose ExecStart binary does not exist, and
# /usr/local/bin/meshchat-node is not installed where this runs (CI, a laptop). So each unit is
# copied into a temporary directory with its ExecStart binary replaced by /bin/true (the
# arguments stay), and that copy is verified. A template unit (name@.service) is verified as
# its instance name@1.service. Exits 1, printing systemd-analyze's output, when verification
# fails or any line of it mentions the unit; 0 and "ok: <unit>" lines otherwise. Exits 2 when
# systemd-analyze is missing.
set -eu

here=$(cd "$(dirname "$0")" && pwd)

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify.sh: systemd-analyze not found (apt-get install systemd)" >&2
    exit 2
fi
# Any executable that exists will do: systemd-analyze only checks that it is there.
stand_in=/bin/true
[ -x "$stand_in" ] || stand_in=/usr/bin/true

if [ "$#" -eq 0 ]; then
    set -- "$here"/*.service
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

status=0
for unit in "$@"; do
    if [ ! -f "$unit" ]; then
        echo "verify.sh: no such unit file: $unit" >&2
        status=1
        continue
    fi
    name=$(basename "$unit")
    case "$name" in
        *@.service) checked="${name%@.service}@1.service" ;;
        *) checked="$name" ;;
    esac
    # ExecStart=/path/to/binary args -> ExecStart=/bin/true args (also with a -, @, : or +
    # prefix before the path).
    sed -E "s|^(ExecStart=[-@:+!]*)[^ ]+|\1$stand_in|" "$unit" >"$tmp/$name"
    if [ "$checked" != "$name" ]; then
        # The instance resolves to the template in the same directory.
        target="$tmp/$checked"
        ln -sf "$name" "$target"
    else
        target="$tmp/$name"
    fi
    rc=0
    # SYSTEMD_LOG_COLOR=0: plain text. --man=no: the Documentation= URL is not looked up.
    out=$(cd "$tmp" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$target" 2>&1) || rc=$?
    base="${checked%.service}"
    tmpl="${name%.service}"
    if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -F -e "$base" -e "$tmpl" >/dev/null; then
        echo "FAILED: $unit (systemd-analyze verify exit $rc)" >&2
        printf '%s\n' "$out" >&2
        status=1
    else
        echo "ok: $unit"
    fi
done
exit "$status"
