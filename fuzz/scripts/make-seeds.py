#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (small files, committed).

Seeds are valid or nearly valid inputs of each parser, so the fuzzers start deep: the
test vectors in ../shared/vectors/, the shapes the docs and tests use, a real TLS
ClientHello from Python's ssl module, small tarballs from tarfile. Re-run after changing
a format; files the fuzzers added later (their own corpus growth) are not committed.
"""
import base64, gzip, io, json, os, ssl, struct, sys, tarfile
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent
VECTORS = FUZZ.parent.parent / "shared" / "vectors"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors")
CORPUS = FUZZ / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def js(v):
    return json.dumps(v, separators=(",", ":"))


# manifest -------------------------------------------------------------------------
manifest = {
    "version": "0.1.0",
    "createdAt": "2024-01-01T00:00:00Z",
    "expiresAt": "2100-01-01T00:00:00Z",
    "metadata": {"name": "test", "version": "1.0.0"},
    "payload": [{
        "platform": {"arch": "x86_64", "os": "linux"},
        "urls": ["https://images.example.com/app.tar.gz"],
        "hash": "sha3:" + "ab" * 32,
    }],
    "compManifest": {"version": "0.1.0"},
}
put("manifest", "minimal.json", js(manifest))
m = json.loads(js(manifest))
m["compManifest"]["net"] = {"inet": {"out": {"protocols": ["http", "https"],
                                              "urls": ["https://api.example.com/v1/"]}}}
m["compManifest"]["script"] = {"commands": ["run /bin/date -R",
                                            {"run": {"args": "/bin/echo .*", "match": "regex"}},
                                            '{"transfer":{"from":"http://a/.*","to":"/in/x","match":"regex"}}'],
                               "match": "strict"}
put("manifest", "net-script.json", js(m))
put("manifest", "net-script.b64", base64.b64encode(js(m).encode()))
u = json.loads(js(manifest))
u["compManifest"]["net"] = {"inet": {"out": {"unrestricted": {"urls": True}}}}
put("manifest", "unrestricted.json", js(u))
for f in (VECTORS / "yagna" / "goth-outbound").glob("*.json"):
    if "manifest" in f.name:
        put("manifest", "goth-" + f.name, f.read_bytes())

# certs ----------------------------------------------------------------------------
for f in sorted((VECTORS / "yagna" / "certs").iterdir()):
    if f.suffix in (".pem", ".json") and "key" not in f.name:
        put("certs", f.name, f.read_bytes())
pem = (VECTORS / "yagna" / "certs" / "foo_req.cert.pem").read_text()
body = "".join(l for l in pem.splitlines() if not l.startswith("-----"))
put("certs", "foo_req.der", base64.b64decode(body))

# exescript_batch: [r] constraints NUL batch ----------------------------------------
batch = [{"deploy": {}}, {"start": {}},
         {"run": {"entry_point": "/bin/date", "args": ["-R"]}},
         {"run": {"entry_point": "/bin/sh", "args": ["-c", "echo hi"], "env": {"A": "b"},
                  "capture": {"stdout": {"stream": {"format": "str"}}}}},
         {"transfer": {"from": "http://a/x", "to": "container:/in/x"}},
         {"terminate": {}}, {"sign": {}}]
put("exescript_batch", "strict", js(["run /bin/date -R", "transfer http://a/x container:/in/x"])
    + "\0" + js(batch))
put("exescript_batch", "regex", "r" + js(["run /bin/.*", {"run": {"args": "/bin/sh -c .*",
                                                                   "env": {"A": "b"}}}])
    + "\0" + js(batch))
put("exescript_batch", "nogate", js(batch))

# constraints ----------------------------------------------------------------------
for i, c in enumerate([
        "(&(golem.inf.mem.gib>=0.5)(golem.runtime.name=vm)(!(golem.node.id.name=bad*)))",
        "(|(golem.com.payment.platform=erc20*)(a=*))",
        r"(golem.node.id.name=provider-a\*b)",
        "(&(golem.inf.cpu.threads<4)(golem.srv.caps.multi-activity=true)(n<=0))",
        "(golem.runtime.name=*v*m*)"]):
    put("constraints", f"c{i}", c)

# wire -----------------------------------------------------------------------------
payload = base64.b64encode(js(m).encode()).decode()
for i, msg in enumerate([
        {"type": "get-offer"},
        {"type": "demand", "properties": {"golem.srv.comp.payload": payload,
                                          "golem.srv.comp.payload.sig.algorithm": "sha256"},
         "constraints": "(golem.inf.mem.gib>=1)"},
        {"type": "agree", "proposal_id": "p-1"},
        {"type": "create", "agreement_id": "a-1"},
        {"type": "exec", "activity_id": "j-1", "batch": batch},
        {"type": "get-results", "activity_id": "j-1", "batch_id": "b-1", "from": 0, "wait_ms": 100},
        {"type": "terminate", "activity_id": "j-1"},
        {"type": "rejected", "reasons": [{"code": "manifest-invalid", "message": "x"}]},
        {"type": "results", "done": True, "results": [
            {"index": 0, "command": "run /bin/date", "outcome": "ok", "exit_code": 0,
             "stdout": "x", "stderr": "", "truncated": False, "reason": None,
             "started_at": "2024-01-01T00:00:00Z", "ended_at": "2024-01-01T00:00:01Z"}]},
        {"type": "agreement", "agreement_id": "a-1", "expires_at": "2100-01-01T00:00:00Z"},
        {"type": "error", "reason": {"code": "busy", "message": "later"}}]):
    put("wire", f"m{i}", js(msg))

# receipt (signature deliberately not valid: the target re-signs) --------------------
receipt = {"receipt": {
    "version": 1, "agreement_id": "a-1", "activity_id": "j-1",
    "provider_id": "12D3KooWAbc", "requestor_id": "12D3KooWDef",
    "manifest_sha256": "00" * 32, "image_hash": "sha3:" + "ab" * 32, "backend": "qemu",
    "started_at": "2024-01-01T00:00:00Z", "ended_at": "2024-01-01T00:01:00Z",
    "termination": "requested",
    "commands": [{"batch_id": "b-1", "index": 0, "command": "run /bin/date", "outcome": "ok",
                  "exit_code": 0, "reason": None, "started_at": "2024-01-01T00:00:00Z",
                  "ended_at": "2024-01-01T00:00:01Z", "stdout_sha256": "00" * 32,
                  "stderr_sha256": "00" * 32}],
    "egress": [{"time": "2024-01-01T00:00:00Z", "method": "GET",
                "destination": "http://192.0.2.1/", "decision": "allow", "rule": "url",
                "reason": "", "bytes_up": 1, "bytes_down": 2}],
    "usage": {"mem_mib": 512, "cpus": 1, "wall_ms": 60000, "boot_ms": 900,
              "egress_bytes": 3, "commands_run": 1}},
    "public_key": "CAESIA==", "signature": "AAAA"}
put("receipt", "unsigned.json", js(receipt))

# channel_frames --------------------------------------------------------------------
def frame(kind, stream, payload):
    return struct.pack("<IBI", len(payload), kind, stream) + payload
hello = frame(1, 0, b"PVCH" + struct.pack("<H", 1))
put("channel_frames", "hello", hello)
put("channel_frames", "session", hello + frame(3, 2, b"egress") + frame(4, 2, b"GET / HTTP/1.1\r\n\r\n")
    + frame(5, 1, struct.pack("<I", 4096)) + frame(6, 2, b"") + frame(7, 3, b"bye"))
put("channel_frames", "control-host", frame(2, 0, js({"type": "ping"}).encode()))

# egress_head ----------------------------------------------------------------------
for i, req in enumerate([
        b"GET http://192.0.2.1/api/x HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n",
        b"POST http://192.0.2.1/api/ HTTP/1.1\r\nHost: 192.0.2.1\r\nContent-Length: 3\r\n\r\nabc",
        b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n",
        b"GET ws://192.0.2.1:8080/socket HTTP/1.1\r\nHost: 192.0.2.1:8080\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET /relative HTTP/1.1\r\nHost: 192.0.2.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"]):
    put("egress_head", f"r{i}", req)

# sni: real ClientHellos -------------------------------------------------------------
def client_hello(name):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    s = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        s.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()
put("sni", "api.example.com", client_hello("api.example.com"))
put("sni", "no-sni", client_hello(None))
ch = client_hello("Mixed.Example.Org")
# The same hello split over two records.
body = ch[5:]
put("sni", "split", b"\x16\x03\x01" + struct.pack(">H", 40) + body[:40]
    + b"\x16\x03\x01" + struct.pack(">H", len(body) - 40) + body[40:])
egress_connect = b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n" + client_hello(None)
put("egress_head", "connect-hello", egress_connect)

# rootfs_tar -----------------------------------------------------------------------
def tarball(entries, gz=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.USTAR_FORMAT) as t:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if kind == "dir":
                ti.type = tarfile.DIRTYPE; ti.mode = 0o755
                t.addfile(ti)
            elif kind == "file":
                ti.size = len(data); ti.mode = 0o644
                t.addfile(ti, io.BytesIO(data))
            elif kind == "sym":
                ti.type = tarfile.SYMTYPE; ti.linkname = data
                t.addfile(ti)
            elif kind == "hard":
                ti.type = tarfile.LNKTYPE; ti.linkname = data
                t.addfile(ti)
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
                t.addfile(ti)
    return buf.getvalue()
tree = [("./", "dir", None), ("bin", "dir", None), ("bin/busybox", "file", b"\x7fELF"),
        ("bin/sh", "sym", "busybox"), ("bin/ln", "hard", "bin/busybox"),
        ("etc/", "dir", None), ("etc/passwd", "file", b"root:x:0:0::/:/bin/sh\n"),
        ("run/fifo", "fifo", None), ("lib", "sym", "/usr/lib")]
put("rootfs_tar", "tree.tar", tarball(tree))
put("rootfs_tar", "tree.tar.gz", tarball(tree, gz=True))
put("rootfs_tar", "escape.tar", tarball([("a", "dir", None), ("a/l", "sym", "../../etc")]))

# the structure-aware targets start from a few random-ish inputs -----------------------
put("script_gate", "seed0", bytes(range(64)))
put("channel_mux", "seed0", bytes(range(0, 256, 3)))
print("seeds written under", CORPUS)
