#!/usr/bin/env bash
# The operator walk-through: an app author's CA chain made with openssl, a signed
# Computation Payload Manifest, and a provider data dir whose rules decide about it.
# Everything happens in a temporary directory; nothing outside it is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p provider --bin provider
provider="$PWD/target/debug/provider"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PROVIDER_DATA_DIR="$work/provider-data"
cd "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
# `manifest check` exits 1 on a reject: show it, don't stop the walk-through.
verdict() { printf '$ %s\n' "$*"; set +e; "$@"; echo "(exit $?)"; set -e; }

step "An app author's chain: root CA → intermediate CA → author (openssl)"
cat > ca.ext <<'X'
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
X
cat > leaf.ext <<'X'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
X
openssl req -x509 -newkey rsa:2048 -nodes -keyout root.key -out root.pem -days 3650 \
  -subj "/O=Demo/CN=Demo Root CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout inter.key \
  -out inter.csr -subj "/O=Demo/CN=Demo Audit Inter" 2>/dev/null
openssl x509 -req -in inter.csr -CA root.pem -CAkey root.key -CAcreateserial \
  -out inter.pem -days 1825 -extfile ca.ext 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout author.key \
  -out author.csr -subj "/O=Demo/CN=Demo App Author" 2>/dev/null
openssl x509 -req -in author.csr -CA inter.pem -CAkey inter.key -CAcreateserial \
  -out author.pem -days 365 -extfile leaf.ext 2>/dev/null
cat author.pem inter.pem > author-chain.pem
echo "made root.pem, inter.pem, author.pem and author-chain.pem"

step "The requestor's manifest, signed over its base64 text"
cat > manifest.json <<'X'
{
  "version": "0.1.0",
  "createdAt": "2024-01-01T00:00:00Z",
  "expiresAt": "2100-01-01T00:00:00Z",
  "metadata": { "name": "weather-fetch", "version": "1.0.0" },
  "payload": [ { "platform": { "arch": "x86_64", "os": "linux" },
                 "urls": [ "https://images.example.com/weather.tar.gz" ],
                 "hash": "sha3:ab3f2e46b8d1a3d0c7a1f1c1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5" } ],
  "compManifest": { "version": "0.1.0",
    "script": { "commands": [ "run /usr/bin/curl -s https://api\\.weather\\.example\\.com/[a-z/]+" ], "match": "regex" },
    "net": { "inet": { "out": { "protocols": [ "https" ], "urls": [ "https://api.weather.example.com" ] } } } }
}
X
base64 -w0 manifest.json > manifest.json.base64
openssl dgst -sha256 -sign author.key manifest.json.base64 | base64 -w0 > manifest.sig
run ls manifest.json manifest.json.base64 manifest.sig

step "A new provider: defaults (outbound enabled, everyone = whitelist, empty whitelist)"
run "$provider" rule list
verdict "$provider" manifest check --manifest manifest.json

step "Trust the demo root CA and grant audited payloads under the intermediate"
run "$provider" keystore add root.pem
run "$provider" keystore list
run "$provider" rule set outbound audited-payload import-cert inter.pem --mode all \
  --description "payloads audited by Demo Audit"
verdict "$provider" manifest check --manifest manifest.json --sig manifest.sig \
  --sig-alg sha256 --cert author-chain.pem

step "A tampered manifest (one host changed after signing) is refused"
sed 's/api.weather.example.com/api.weather.example.org/' manifest.json > tampered.json
verdict "$provider" manifest check --manifest tampered.json --sig manifest.sig \
  --sig-alg sha256 --cert author-chain.pem

step "Unsigned, the same manifest needs its host on the whitelist (strict = whole host)"
run "$provider" whitelist add -p weather.example.com
verdict "$provider" manifest check --manifest manifest.json
run "$provider" whitelist add -p api.weather.example.com
verdict "$provider" --json manifest check --manifest manifest.json

step "Blacklisting the requestor's node wins over every grant"
peer=12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo
run "$provider" rule add blacklist identity "$peer"
verdict "$provider" manifest check --manifest manifest.json --node-id "$peer"

step "The ExeScript gate: what the manifest's script constraints allow"
cat > batch.json <<'X'
[ {"deploy": {}}, {"start": {}},
  {"run": {"entry_point": "/usr/bin/curl", "args": ["-s", "https://api.weather.example.com/today"]}},
  {"run": {"entry_point": "/usr/bin/curl", "args": ["-s", "https://api.weather.example.com/x;", "rm", "-rf", "/"]}},
  {"run": {"entry_point": "/bin/sh", "args": ["-c", "cat /etc/shadow"]}} ]
X
verdict "$provider" script check --manifest manifest.json --script batch.json

step "Done; the data dir the walk-through used:"
ls -la "$PROVIDER_DATA_DIR" "$PROVIDER_DATA_DIR/cert-dir"
