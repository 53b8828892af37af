#!/usr/bin/env bash
# `ray up` for real on one host: bring up cluster/cluster_local.yaml (local provider, head at
# 127.0.0.1 over SSH), serve the fixture teacher through it, score a batch from a client, `ray down`.
#
#   cluster/ray_up_local.sh
#
# Needs sshd answering on 127.0.0.1:22 (Debian: apt-get install -y openssh-server && service ssh start)
# and this checkout's .venv; it downloads nothing. Not run in CI, because CI has no sshd.
# Ray token authentication is on (a token made for the run) unless RAY_AUTH_MODE=disabled is set.
# Exits non-zero on any failure. What it changes outside its temp dir, and undoes on exit:
#   - one line in ~/.ssh/authorized_keys: a throwaway key made for this run, usable only from
#     127.0.0.1/::1, with no forwarding, and only through this run's gate (sshd's config is unchanged);
#   - the SSH session's HOME is a directory inside the temp dir, so Ray's bootstrap files
#     (~/ray_bootstrap_config.yaml, ~/ray_bootstrap_key.pem) land there, not in your home.
# Everything the cluster starts carries CKD_RAY_UP_TAG=<this run> in its environment; `ray stop`
# inside the cluster (and so `ray down`) stops only those processes, never other Ray clusters on
# the host. Set CKD_RAY_UP_KEEP=1 to keep the temp dir (logs) afterwards.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$REPO/.venv/bin/python
RAY=$REPO/.venv/bin/ray
YAML=$REPO/cluster/cluster_local.yaml
SSH_HOST=127.0.0.1
NAMESPACE=ckd-rayup-local
TEACHER=fixture
N_ITEMS=1000

step() { printf '\n== %s\n' "$*"; }
die() { printf 'ray_up_local: FAILED: %s\n' "$*" >&2; exit 1; }

# --- 1. prerequisites --------------------------------------------------------------------------
step "prerequisites"
[ -x "$PY" ] && [ -x "$RAY" ] || die "no $REPO/.venv with ray in it; build the checkout's .venv first (README)"
"$PY" -c "import yaml, psutil, cluster.deploy, launch.serve, benchmarks.fixture_teacher, student.teacher_pool" \
  || die "the .venv cannot import the service modules"
for tool in ssh ssh-keygen rsync; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install -y openssh-client rsync)"
done
# sshd must answer with an SSH banner; this script never starts or reconfigures it.
"$PY" - "$SSH_HOST" <<'EOF' || die "sshd is not answering on $SSH_HOST:22 (Debian: apt-get install -y openssh-server && service ssh start, or /usr/sbin/sshd)"
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 22), timeout=5) as s:
        banner = s.recv(64)
except OSError as exc:
    sys.exit(f"{sys.argv[1]}:22: {exc}")
if not banner.startswith(b"SSH-"):
    sys.exit(f"port 22 answered {banner!r}, not an SSH banner")
print("sshd:", banner.decode().strip())
EOF
echo "ray: $("$RAY" --version 2>&1 | tail -n 1)   host: $(hostname)   user: $(id -un)"

WORK=$(mktemp -d /tmp/ckd-rayup.XXXXXX)  # short path: Ray's Unix socket paths live under it
TAG=$(basename "$WORK")
SANDBOX=$WORK/home
AUTH_KEYS=$HOME/.ssh/authorized_keys
MADE_SSH_DIR=0
MADE_AUTH_KEYS=0
CFG=$WORK/cluster_local.yaml
STATUS=1
# Ray's ports listen on every interface even with the head at 127.0.0.1 (Ray resolves a loopback
# --node-ip-address to the host's routable address), so token authentication is on unless
# RAY_AUTH_MODE=disabled is given explicitly.
export RAY_TMPDIR=$WORK/t TMPDIR=$WORK/t RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
mkdir -p "$RAY_TMPDIR" "$SANDBOX" "$WORK/bin"
# Token mode: Ray's own authentication on every Ray port of the cluster. The token is this run's
# (a file in the temp dir) unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH give one.
if [ "$RAY_AUTH_MODE" = token ]; then
  if [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    (umask 077; if [ -n "${RAY_AUTH_TOKEN:-}" ]; then printf '%s' "$RAY_AUTH_TOKEN"
     else "$PY" -c "import secrets; print(secrets.token_hex(32), end='')"; fi > "$WORK/auth_token")
    export RAY_AUTH_TOKEN_PATH=$WORK/auth_token
  fi
  unset RAY_AUTH_TOKEN
  echo "Ray token authentication: on (token file $RAY_AUTH_TOKEN_PATH)"
else
  echo "Ray token authentication: $RAY_AUTH_MODE (RAY_AUTH_MODE=$RAY_AUTH_MODE given): anyone who reaches this host's Ray ports can run code as $(id -un) while the cluster is up"
fi

# Stop every process of this cluster, by pid: those that carry this run's tag in their environment
# (/proc/<pid>/environ) or name its Ray temp dir on their command line (gcs_server, raylet, ...).
# SIGTERM, then SIGKILL after a grace period. `--count` only counts them. Its own ancestors are skipped.
cat > "$WORK/bin/stop_tagged.py" <<'EOF'
import os, sys, psutil
tag = sys.argv[1]
mark = os.path.join("/tmp", tag, "t") + "/"
me = psutil.Process()
skip = {me.pid} | {p.pid for p in me.parents()}
procs = []
for p in psutil.process_iter():
    if p.pid in skip:
        continue
    try:
        ours = p.environ().get("CKD_RAY_UP_TAG") == tag or any(mark in a for a in p.cmdline())
        if ours and p.status() != psutil.STATUS_ZOMBIE:
            procs.append(p)
    except (psutil.Error, OSError):
        pass
if "--listen" in sys.argv:  # the TCP ports the cluster's processes listen on, read from the OS
    rows = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    rows.add((c.laddr.ip, c.laddr.port, p.name()))
        except psutil.Error:
            pass
    wide = [r for r in rows if r[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    print(f"listening TCP sockets of the cluster's {len(procs)} processes: {len(rows)}, "
          f"{len(rows) - len(wide)} on loopback, {len(wide)} beyond it")
    for ip, port, name in sorted(rows, key=lambda r: (r[2], r[1])):
        print(f"  {ip}:{port}  {name}")
    sys.exit(0)
if "--count" in sys.argv:
    for p in procs:
        try:
            print(f"  still running: pid {p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    print(f"processes of this cluster still running: {len(procs)}")
    sys.exit(1 if procs else 0)
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(procs, timeout=15)
killed = []
for p in alive:
    try:
        killed.append(p.name())
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=5)
print(f"stopped {len(procs)} process(es) of cluster {tag}"
      + (f" ({len(alive)} needed SIGKILL: {', '.join(killed)})" if alive else ""))
EOF

cleanup() {
  local rc=$?
  set +e
  if [ "$STATUS" -ne 0 ]; then
    echo "ray_up_local: cleaning up after a failure (exit $rc)" >&2
    [ -f "$SANDBOX/serve.log" ] && { echo "--- serve.log (last 20 lines)" >&2; tail -n 20 "$SANDBOX/serve.log" >&2; }
  fi
  "$PY" "$WORK/bin/stop_tagged.py" "$TAG" >/dev/null 2>&1
  # ray's SSH connection master for this cluster (ControlPersist) is closed, not left to time out.
  local ctl
  ctl=$("$PY" -c "import getpass, hashlib; h=lambda s: hashlib.sha256(s.encode()).hexdigest()[:10]; \
print(f'/tmp/ray_ssh_{h(getpass.getuser())}/{h(\"ckd-mdsr-local\")}')")
  for sock in "$ctl"/*; do
    [ -S "$sock" ] && ssh -o ControlPath="$sock" -O exit "$SSH_HOST" >/dev/null 2>&1
  done
  rmdir "$ctl" "$(dirname "$ctl")" 2>/dev/null
  if [ -f "$AUTH_KEYS" ]; then
    grep -v -F "$TAG" "$AUTH_KEYS" > "$WORK/authorized_keys.new"
    cat "$WORK/authorized_keys.new" > "$AUTH_KEYS"  # rewrite in place: keeps owner and mode
    [ "$MADE_AUTH_KEYS" = 1 ] && [ ! -s "$AUTH_KEYS" ] && rm -f "$AUTH_KEYS"
  fi
  [ "$MADE_SSH_DIR" = 1 ] && rmdir "$HOME/.ssh" 2>/dev/null
  rm -f "$WORK/id_ed25519" "$WORK/id_ed25519.pub" "$SANDBOX/ray_bootstrap_key.pem"
  if [ "${CKD_RAY_UP_KEEP:-0}" = 1 ] || [ "$STATUS" -ne 0 ]; then
    echo "ray_up_local: logs kept in $WORK (remove it when done)" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- SSH to localhost: a throwaway key, a gate, a sandbox home ----------------------------------
ssh-keygen -q -t ed25519 -N '' -C "$TAG" -f "$WORK/id_ed25519"
# The gate is the key's forced command: it runs what ray asked for, in a login environment whose
# HOME is the sandbox (sshd resets PATH, so it cannot be passed in any other way without
# PermitUserEnvironment, which would weaken sshd for every user).
cat > "$WORK/bin/gate" <<EOF
#!/bin/bash
export HOME='$SANDBOX'
cd "\$HOME" || exit 1
exec /bin/bash -c "\${SSH_ORIGINAL_COMMAND:-true}"
EOF
cat > "$SANDBOX/.bashrc" <<EOF
export PATH='$WORK/bin':"\$PATH"
export CKD_RAY_UP_TAG='$TAG' RAY_TMPDIR='$RAY_TMPDIR' TMPDIR='$RAY_TMPDIR'
export RAY_AUTH_MODE='$RAY_AUTH_MODE' RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
EOF
[ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && echo "export RAY_AUTH_TOKEN_PATH='$RAY_AUTH_TOKEN_PATH'" >> "$SANDBOX/.bashrc"
echo '. "$HOME/.bashrc"' > "$SANDBOX/.bash_profile"
ln -s "$REPO" "$SANDBOX/ckd-mdsr"
# `ray` in the cluster's shell: the .venv's ray, but `ray stop` ends only this cluster's processes.
cat > "$WORK/bin/ray" <<EOF
#!/bin/bash
if [ "\${1:-}" = stop ]; then exec '$PY' '$WORK/bin/stop_tagged.py' '$TAG'; fi
exec '$RAY' "\$@"
EOF
chmod 755 "$WORK/bin/gate" "$WORK/bin/ray"

if [ ! -d "$HOME/.ssh" ]; then mkdir -m 700 "$HOME/.ssh"; MADE_SSH_DIR=1; fi
if [ ! -e "$AUTH_KEYS" ]; then (umask 077; : > "$AUTH_KEYS"); MADE_AUTH_KEYS=1; fi
printf 'from="127.0.0.1,::1",command="%s",no-port-forwarding,no-agent-forwarding,no-X11-forwarding %s\n' \
  "$WORK/bin/gate" "$(cat "$WORK/id_ed25519.pub")" >> "$AUTH_KEYS"
echo "authorised a throwaway key for $(id -un) in $AUTH_KEYS (from 127.0.0.1 only, forced command $WORK/bin/gate); removed on exit"
ssh -i "$WORK/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
  -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10 "$(id -un)@$SSH_HOST" \
  'echo "ssh: $(id -un)@$(hostname) ok, HOME=$HOME"' \
  || die "key login to $(id -un)@$SSH_HOST refused (sshd's PermitRootLogin, AllowUsers or AuthorizedKeysFile?)"

# --- the run's copy of cluster_local.yaml: this user, this key, free ports -------------------------
"$PY" - "$YAML" "$CFG" "$(id -un)" "$WORK/id_ed25519" <<'EOF'
import re, socket, sys, yaml
src, dst, user, key = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["auth"] = {"ssh_user": user, "ssh_private_key": key}

def free(port: int) -> int:
    """The port itself when nothing listens on it, else one the OS hands out."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

def repl(m: re.Match) -> str:
    port = free(int(m.group(2)))
    if port != int(m.group(2)):
        print(f"{m.group(1)}{m.group(2)} is taken on this host; using {port}")
    return f"{m.group(1)}{port}"

cmds = cfg["head_start_ray_commands"]
cfg["head_start_ray_commands"] = [
    re.sub(r"(--(?:port|ray-client-server-port|dashboard-agent-listen-port)=)(\d+)", repl, c) for c in cmds]
gcs = re.search(r"--port=(\d+)", " ".join(cfg["head_start_ray_commands"])).group(1)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
open(dst + ".gcs_port", "w").write(gcs)
EOF
GCS=127.0.0.1:$(cat "$CFG.gcs_port")
echo "cluster config: $CFG (GCS will be $GCS)"

# --- 2. ray up ---------------------------------------------------------------------------------
step "ray up -y (local provider, head $SSH_HOST)"
cd "$REPO"
RAYCLI=(--log-style record --log-color false)
timeout --foreground 600 "$RAY" up -y --no-config-cache --disable-usage-stats "${RAYCLI[@]}" "$CFG" > "$WORK/ray_up.log" 2>&1 \
  || { cat "$WORK/ray_up.log"; die "ray up failed"; }
cat "$WORK/ray_up.log"
timeout --foreground 60 "$RAY" exec --no-config-cache "${RAYCLI[@]}" "$CFG" "ray status --address $GCS" > "$WORK/status.log" 2>&1 \
  || { cat "$WORK/status.log"; die "ray status failed on the head"; }
sed -n '/Resources/,/^ *$/p' "$WORK/status.log" | sed 's/\x1b\[[0-9;]*m//g'

"$PY" "$WORK/bin/stop_tagged.py" "$TAG" --listen

# --- 3. serve the fixture teacher through the cluster ----------------------------------------------
step "serve a teacher through the cluster (ray exec ... python -m launch.serve)"
"$PY" -c "from benchmarks.fixture_teacher import make_fixture_checkpoint as m; \
print('checkpoint:', m('$WORK/ckpt/$TEACHER', num_items=$N_ITEMS, vocab_hash='fixture-vocab', dim=32, seed=0))"
cat > "$WORK/serve.yaml" <<EOF
namespace: $NAMESPACE
teacher_modules: [benchmarks.fixture_teacher]
bind_host: 127.0.0.1
heartbeat_s: 0.5
teachers:
  - name: $TEACHER
    checkpoint: $WORK/ckpt/$TEACHER
    replicas: 2
    num_cpus: 0.5
    resources: {teacher: 0.25}   # the role given by cluster_local.yaml's ray start --resources
EOF
timeout --foreground 60 "$RAY" exec --no-config-cache "${RAYCLI[@]}" "$CFG" \
  "cd ~/ckd-mdsr && nohup .venv/bin/python -m launch.serve --address $GCS --spec $WORK/serve.yaml \
   > ~/serve.log 2>&1 < /dev/null & echo \$! > ~/serve.pid; echo serve started, pid \$(cat ~/serve.pid)" \
  || die "ray exec (start serve) failed"
for _ in $(seq 1 240); do
  grep -q '"endpoints"' "$SANDBOX/serve.log" 2>/dev/null && break
  kill -0 "$(cat "$SANDBOX/serve.pid")" 2>/dev/null || die "serve exited before it was ready"
  sleep 0.5
done
grep -m1 '"endpoints"' "$SANDBOX/serve.log" || die "serve not ready after 120 s"
"$PY" "$WORK/bin/stop_tagged.py" "$TAG" --listen

# --- 4. a client scores a batch ------------------------------------------------------------------
step "client: TeacherPool.from_ray($GCS) scores a batch"
"$PY" - "$GCS" "$NAMESPACE" "$TEACHER" "$WORK/ckpt/$TEACHER" "$N_ITEMS" <<'EOF'
import sys
import numpy as np
import torch
import benchmarks.fixture_teacher  # noqa: F401  (registers the kind for load_teacher)
from student.teacher_pool import TeacherPool
from teachers.base import load_teacher

gcs, ns, name, ckpt, n_items = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rng = np.random.default_rng(0)
b, length, c = 8, 10, 16
lengths = rng.integers(1, length + 1, size=b)
hist = rng.integers(1, n_items, size=(b, length))
hist[np.arange(length)[None, :] >= lengths[:, None]] = 0
cands = rng.integers(1, n_items, size=(b, c))
with TeacherPool.from_ray(gcs, ns, [name]) as pool:
    info = pool.check_contract("fixture-vocab", n_items)[name]
    scores = pool.score(hist, lengths, cands)[name]
    calls = {k: v for k, v in pool.stats().items() if k.startswith("calls/")}
want = load_teacher(ckpt).score(torch.from_numpy(hist), torch.from_numpy(lengths), torch.from_numpy(cands)).numpy()
diff = float(np.abs(scores - want).max())
print(f"teacher {name}: kind {info.kind}, {info.replicas} replica(s), checkpoint sha256 {info.checkpoint_sha256[:12]}")
print(f"scores: shape {scores.shape} dtype {scores.dtype}; max |served - local| = {diff:.2e}; calls {calls}")
sys.exit(0 if scores.shape == (b, c) and diff < 1e-5 else "scores do not match the checkpoint scored locally")
EOF

if [ "$RAY_AUTH_MODE" = token ]; then
  step "token authentication: clients without the token are refused"
  for who in "wrong token" "no token, auth off"; do
    if [ "$who" = "wrong token" ]; then client_env=(RAY_AUTH_TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')")
    else client_env=(RAY_AUTH_MODE=disabled); fi
    # Three connection attempts instead of twenty: the answer is the same each time.
    if env -u RAY_AUTH_TOKEN_PATH "${client_env[@]}" RAY_NUM_REDIS_GET_RETRIES=3 timeout --foreground 90 "$PY" -c \
        "import ray; ray.init(address='$GCS', logging_level='ERROR'); print('joined', ray.cluster_resources())" \
        > "$WORK/refused.log" 2>&1; then
      cat "$WORK/refused.log"; die "a client with $who joined the cluster"
    fi
    why=$(grep -m1 -o 'Unauthenticated: [^[]*' "$WORK/refused.log") \
      || { tail -n 5 "$WORK/refused.log"; die "a client with $who failed, but not for want of the token"; }
    echo "$who: refused ($why)"
  done
fi

# --- 5. stop serving, ray down, nothing left ------------------------------------------------------
step "stop serve, ray down -y"
timeout --foreground 60 "$RAY" exec --no-config-cache "${RAYCLI[@]}" "$CFG" 'kill -TERM $(cat ~/serve.pid)' \
  || die "ray exec (stop serve) failed"
for _ in $(seq 1 120); do kill -0 "$(cat "$SANDBOX/serve.pid")" 2>/dev/null || break; sleep 0.5; done
kill -0 "$(cat "$SANDBOX/serve.pid")" 2>/dev/null && die "serve did not exit within 60 s of SIGTERM"
grep -q Traceback "$SANDBOX/serve.log" && { cat "$SANDBOX/serve.log"; die "serve raised while stopping"; }
echo "serve exited cleanly ($(wc -l < "$SANDBOX/serve.log") line(s) of log, no traceback)"
timeout --foreground 300 "$RAY" down -y "${RAYCLI[@]}" "$CFG" > "$WORK/ray_down.log" 2>&1 \
  || { cat "$WORK/ray_down.log"; die "ray down failed"; }
cat "$WORK/ray_down.log"
grep -q "stopped [0-9]* process(es) of cluster $TAG" "$WORK/ray_down.log" \
  || die "ray down did not run this cluster's ray stop"
"$PY" "$WORK/bin/stop_tagged.py" "$TAG" --count || die "ray down left processes running"
"$PY" -c "import socket; s=socket.socket(); s.settimeout(2); \
raise SystemExit('GCS port still open' if s.connect_ex(('127.0.0.1', int('$GCS'.split(':')[1]))) == 0 else 0)" \
  || die "the GCS port $GCS still answers after ray down"
echo "GCS $GCS closed"
STATUS=0
step "ray_up_local: OK (ray up, serve, score, ray down on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS} s)"
