"""Write a one-layer image archive (docker-save format) from a directory, for `ctr images import`.

Why hand-rolled: no registry is reachable, and the two images the cluster itself needs (pause,
CoreDNS) are single static binaries; podman could do this too, but the cluster must not depend on
podman being configured, and this is ~40 lines of the documented archive layout.
Usage: python3 oci_archive.py ROOTDIR NAME:TAG ENTRYPOINT OUT.tar
"""

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path


def layer_bytes(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if path.is_file():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main(root: str, ref: str, entrypoint: str, out: str) -> None:
    layer = layer_bytes(Path(root))
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [entrypoint], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tar:
        add(tar, "layer.tar", layer)
        add(tar, config_name, config)
        add(tar, "manifest.json", manifest)


if __name__ == "__main__":
    main(*sys.argv[1:5])
