#!/usr/bin/env python3
"""Write a one-layer OCI image archive without a container engine or a registry.

The archive (an OCI image layout in a tar: oci-layout, index.json, blobs/sha256/...) imports with
`ctr -n k8s.io images import --platform linux/amd64 FILE`. Its index carries the
`io.containerd.image.name` annotation, so the image lands under the name given with --name.

  oci.py --name docker.io/library/dynamo-rs:latest --out dynamo-rs.tar \
         --entrypoint /usr/local/bin/dynamo --user 65532:65532 \
         --env PATH=/usr/local/bin:/usr/bin:/bin \
         --file target/release/dynamo:/usr/local/bin/dynamo:0755 \
         --dir /tmp:1777 --text /etc/passwd:'nonroot:x:65532:65532::/home/nonroot:/sbin/nologin'

--file SRC:DST[:MODE] copies a host file (symlinks are followed), --dir DST[:MODE] makes an empty
directory, --text DST:CONTENT writes a small file. Parent directories are created 0755 and owned by
root; files are root-owned, so a non-root container user cannot change them. The layer is
reproducible: entries sorted, timestamps zero.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def fail(msg):
    print(f"oci.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def split_mode(spec, default):
    """'a:b:0755' -> (['a', 'b'], 0o755); the mode is optional."""
    parts = spec.split(":")
    if len(parts) > 1 and parts[-1].isdigit() and len(parts[-1]) in (3, 4):
        return parts[:-1], int(parts[-1], 8)
    return parts, default


def tar_info(name, kind, mode, size=0):
    ti = tarfile.TarInfo(name.lstrip("/"))
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    return ti


def build_layer(files, dirs, texts):
    """(uncompressed layer bytes) from the requested entries."""
    entries = {}  # path -> (kind, mode, data)

    def add_parents(path):
        parent = os.path.dirname(path.rstrip("/"))
        while parent not in ("", "/"):
            entries.setdefault(parent, (tarfile.DIRTYPE, 0o755, None))
            parent = os.path.dirname(parent)

    for spec in dirs:
        (dst,), mode = split_mode(spec, 0o755)
        add_parents(dst)
        entries[dst.rstrip("/")] = (tarfile.DIRTYPE, mode, None)
    for spec in files:
        parts, mode = split_mode(spec, None)
        if len(parts) != 2:
            fail(f"--file wants SRC:DST[:MODE], got {spec!r}")
        src, dst = parts
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            fail(f"--file {spec}: {e}")
        if mode is None:
            mode = os.stat(src).st_mode & 0o7777
        add_parents(dst)
        entries[dst] = (tarfile.REGTYPE, mode, data)
    for spec in texts:
        dst, sep, content = spec.partition(":")
        if not sep:
            fail(f"--text wants DST:CONTENT, got {spec!r}")
        add_parents(dst)
        entries[dst] = (tarfile.REGTYPE, 0o644, (content.rstrip("\n") + "\n").encode())

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, mode, data = entries[path]
            ti = tar_info(path, kind, mode, len(data) if data is not None else 0)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def descriptor(media_type, data, **extra):
    d = {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
    d.update(extra)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="full image name, e.g. docker.io/library/x:latest")
    ap.add_argument("--out", required=True, help="archive to write")
    ap.add_argument("--entrypoint", action="append", default=[], help="entrypoint argv element (repeat)")
    ap.add_argument("--cmd", action="append", default=[], help="cmd argv element (repeat)")
    ap.add_argument("--user", default="")
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE (repeat)")
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--text", action="append", default=[])
    a = ap.parse_args()

    layer = build_layer(a.file, a.dir, a.text)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": a.user,
            "Env": a.env,
            "Entrypoint": a.entrypoint or None,
            "Cmd": a.cmd or None,
            "WorkingDir": a.workdir,
            "Labels": {"org.opencontainers.image.source": "dynamo-rs hack/oci.py"},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "hack/oci.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor(CONFIG, config_bytes),
        "layers": [descriptor(LAYER, layer)],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            descriptor(
                MANIFEST,
                manifest_bytes,
                platform={"architecture": "amd64", "os": "linux"},
                annotations={
                    "io.containerd.image.name": a.name,
                    "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1],
                },
            )
        ],
    }
    blobs = [layer, config_bytes, manifest_bytes]
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        def put(name, data, kind=tarfile.REGTYPE, mode=0o644):
            tar.addfile(tar_info(name, kind, mode, len(data)), io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        put("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        put("index.json", json.dumps(index, sort_keys=True).encode())
        put("blobs", b"", tarfile.DIRTYPE, 0o755)
        put("blobs/sha256", b"", tarfile.DIRTYPE, 0o755)
        for b in blobs:
            put("blobs/sha256/" + hashlib.sha256(b).hexdigest(), b)
    os.replace(tmp, a.out)
    print(f"{a.out}: {a.name} ({len(layer) // 1024} KiB layer, {layer_digest[:19]})")


if __name__ == "__main__":
    main()
