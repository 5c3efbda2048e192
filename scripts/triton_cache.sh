#!/usr/bin/env bash
# Triton's compiled kernels carried from one GPU machine to the next (the box starts bare each
# time: a serving warm-up spends most of its minutes compiling with a cold cache).
#   scripts/triton_cache.sh unpack [ARCHIVE]   # ARCHIVE (default .whl/triton-cache.tar.xz), if
#                                              # there, into the cache dir; nothing if not
#   scripts/triton_cache.sh pack ARCHIVE       # the cache dir's kernels into ARCHIVE
# The cache dir is $TRITON_CACHE_DIR, /tmp/triton-cache unless set; scripts/gpu_run.sh exports it.
# It must be the same path on every machine: Triton's group files name their kernel files by
# absolute path. Only the binaries and their metadata travel (.cubin, .json: what a cache hit
# loads); the IR text stays behind (kernel_report compiles afresh when it reads it).
set -euo pipefail
dir=${TRITON_CACHE_DIR:-/tmp/triton-cache}
case ${1:-} in
  unpack)
    archive=${2:-.whl/triton-cache.tar.xz}
    [ -f "$archive" ] || exit 0
    mkdir -p "$dir"
    tar -xJf "$archive" -C "$dir"
    echo "triton_cache: $(find "$dir" -name '*.cubin' | wc -l) kernels from $archive in $dir" >&2 ;;
  pack)
    archive=${2:-}
    [ -n "$archive" ] || { echo "usage: scripts/triton_cache.sh pack ARCHIVE" >&2; exit 2; }
    [ -d "$dir" ] || { echo "triton_cache: no cache dir $dir" >&2; exit 2; }
    # Each group file is rewritten to name only what travels (Triton 3.9 misses a group with an
    # absent file; 3.6, the box's, passes over it).
    python3 - "$dir" "$archive.tmp" <<'PY'
import io, json, pathlib, sys, tarfile

root, keep = pathlib.Path(sys.argv[1]), (".cubin", ".json")
with tarfile.open(sys.argv[2], "w:xz") as tar:
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in keep):
        name = str(f.relative_to(root))
        if not f.name.startswith("__grp__"):
            tar.add(f, name)
            continue
        group = json.loads(f.read_text())
        paths = group.get("child_paths") or {}
        group["child_paths"] = {c: p for c, p in paths.items() if p.endswith(keep)}
        data = json.dumps(group).encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
PY
    mv "$archive.tmp" "$archive"
    echo "triton_cache: $(find "$dir" -name '*.cubin' | wc -l) kernels in $archive" \
         "($(du -h "$archive" | cut -f1))" >&2 ;;
  *) echo "usage: scripts/triton_cache.sh unpack [ARCHIVE] | pack ARCHIVE" >&2; exit 2 ;;
esac
