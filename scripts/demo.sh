#!/usr/bin/env bash
# The whole story on one machine, over loopback:
#   an app author's CA chain (openssl) → a manifest allowing one URL of a local upstream,
#   signed with `requestor manifest sign` → a provider daemon (`provider run`) trusting the
#   CA → `requestor submit` negotiating over libp2p (TCP + noise + yamux), the payload
#   booted in a microVM (QEMU; TCG where KVM cannot boot Linux), three batches: an allowed
#   fetch through the egress proxy, a fetch of a URL the manifest does not allow, and a
#   command the ExeScript gate denies → the results, the signed receipt verified offline,
#   and the provider's audit log.
# Everything lives in a temporary directory; nothing outside it is touched except the
# cargo build and the guest-kernel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Build: provider, requestor, the static guest agent; the guest kernel; a busybox image"
scripts/install-deps.sh
cargo build --quiet -p provider --bins
RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=true \
  cargo build --quiet --release -p guest --target x86_64-unknown-linux-gnu --target-dir target/guest
export PROVIDER_GUEST="$repo/target/guest/x86_64-unknown-linux-gnu/release/provider-guest"
provider="$repo/target/debug/provider"
requestor="$repo/target/debug/requestor"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
export PROVIDER_DATA_DIR="$work/provider-data"
mkdir -p www/allowed
"$repo/scripts/make-test-image.sh" www/image.tar >/dev/null
echo "hello from the allowed upstream" > www/allowed/hello.txt
echo "this must not leave the host" > www/secret.txt

step "A local upstream on 127.0.0.1 (serves the payload image and the allowed URL)"
python3 - "$work/www" > upstream.port <<'PY' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
PY
pids+=($!)
for _ in $(seq 50); do [[ -s upstream.port ]] && break; sleep 0.1; done
port=$(cat upstream.port)
echo "upstream: http://127.0.0.1:$port/"
hash=$(python3 -c 'import hashlib,sys;print(hashlib.sha3_256(open(sys.argv[1],"rb").read()).hexdigest())' www/image.tar)

step "The app author's chain: root CA → author (openssl)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout root.key \
  -out root.pem -days 3650 -subj "/O=Demo/CN=Demo Root CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout author.key \
  -out author.csr -subj "/O=Demo/CN=Demo App Author" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' > leaf.ext
openssl x509 -req -in author.csr -CA root.pem -CAkey root.key -CAcreateserial \
  -out author.pem -days 365 -extfile leaf.ext 2>/dev/null
echo "made root.pem and author.pem"

step "The manifest: this image, wget and echo allowed, one URL prefix of the upstream"
cat > manifest.json <<JSON
{
  "version": "0.1.0",
  "createdAt": "2024-01-01T00:00:00Z",
  "expiresAt": "2100-01-01T00:00:00Z",
  "metadata": { "name": "demo-fetch", "version": "1.0.0" },
  "payload": [ { "platform": { "arch": "x86_64", "os": "linux" },
                 "urls": [ "http://127.0.0.1:$port/image.tar" ],
                 "hash": "sha3:$hash" } ],
  "compManifest": { "version": "0.1.0",
    "script": { "commands": [ "run /bin/wget -q -O - http://.*", "run /bin/echo .*" ], "match": "regex" },
    "net": { "inet": { "out": { "protocols": [ "http" ], "urls": [ "http://127.0.0.1:$port/allowed" ] } } } }
}
JSON
cat manifest.json
run "$requestor" manifest sign --manifest manifest.json --key author.key --alg sha256 --out manifest.sig

step "The provider: trust the demo CA for audited payloads with full outbound, start the daemon"
run "$provider" keystore add root.pem
rootid=$("$provider" --json keystore list | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["id"])')
run "$provider" rule set outbound audited-payload cert-id "${rootid:0:16}" --mode all
"$provider" run --listen /ip4/127.0.0.1/tcp/0 --no-mdns --allow-cidr 127.0.0.0/8 \
  > daemon.out 2> daemon.log &
pids+=($!)
daemon=$!
for _ in $(seq 300); do grep -q '^listening on ' daemon.out 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' daemon.out | head -1)
[[ -n "$addr" ]] || { cat daemon.log; echo "the daemon did not start" >&2; exit 1; }
echo "provider listening on $addr"

step "The requestor's batches"
cat > 1-allowed.json <<JSON
[ {"deploy": {}}, {"start": {}},
  {"run": {"entry_point": "/bin/wget", "args": ["-q", "-O", "-", "http://127.0.0.1:$port/allowed/hello.txt"]}} ]
JSON
cat > 2-denied-url.json <<JSON
[ {"run": {"entry_point": "/bin/wget", "args": ["-q", "-O", "-", "http://127.0.0.1:$port/secret.txt"]}} ]
JSON
cat > 3-denied-command.json <<JSON
[ {"run": {"entry_point": "/bin/cat", "args": ["/etc/passwd"]}},
  {"run": {"entry_point": "/bin/echo", "args": ["never runs: the batch stopped at the denial"]}} ]
JSON
head -n 20 1-allowed.json 2-denied-url.json 3-denied-command.json

step "Submit: negotiate, boot the VM, run the batches, terminate, keep the receipt"
set +e
run "$requestor" submit --provider "$addr" --manifest manifest.json --sig manifest.sig \
  --sig-alg sha256 --cert author.pem --constraints "(&(golem.runtime.name=vm)(golem.inf.mem.gib>=0.25))" \
  --script 1-allowed.json --script 2-denied-url.json --script 3-denied-command.json \
  --out-dir receipts | tee submit.out
code=${PIPESTATUS[0]}
set -e
echo "(requestor exit $code: 1 because commands were denied, as intended)"
grep -q "hello from the allowed upstream" submit.out
grep -q "DENIED" submit.out
! grep -q "this must not leave the host" submit.out

step "The receipt, checked offline"
receipt=$(ls receipts/receipt-*.json)
run "$requestor" receipt verify "$receipt"

step "The provider's audit log (last lines)"
tail -n 8 "$PROVIDER_DATA_DIR/audit.jsonl"

# The job benchmark (DEMO_BENCH_RUNS=N scripts/demo.sh): N more jobs of batch 1, each a
# new agreement and VM; the requestor's --timings give agreement → first command output.
if [[ "${DEMO_BENCH_RUNS:-0}" -gt 0 ]]; then
  step "Benchmark: ${DEMO_BENCH_RUNS} jobs, agreement → first command output"
  for _ in $(seq "$DEMO_BENCH_RUNS"); do
    "$requestor" --json submit --provider "$addr" --manifest manifest.json --sig manifest.sig \
      --cert author.pem --script 1-allowed.json --out-dir receipts --timings 2>&1 >/dev/null \
      | sed -n 's/^timings: //p' | tee -a timings.txt
  done
  python3 - timings.txt <<'PY'
import re, statistics, sys
rows = [l for l in open(sys.argv[1]) if l.strip()]
def col(name):
    return sorted(float(re.search(name + r" (\d+) ms", l).group(1)) for l in rows)
for name in ["connect\\+negotiate", "agreement → VM ready", "agreement → first command output", "total"]:
    v = col(name)
    print(f"{name.replace(chr(92), ''):35s} median {statistics.median(v):7.0f} ms   min {v[0]:7.0f}   max {v[-1]:7.0f}   (n={len(v)})")
PY
fi

step "Stop the provider (SIGTERM)"
kill -TERM "$daemon"
wait "$daemon" && echo "provider stopped cleanly"
