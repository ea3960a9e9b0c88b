#!/usr/bin/env python3
"""Differential oracle: qimg against qemu-img on fuzzed images.

Every input file (a fuzz corpus entry, minus --skip leading bytes) is written to an image file and given to both
tools: `info --output=json`, `map --output=json`, `convert -O raw` and `check`. They must agree on whether the
image opens, on the info fields and the map, on the converted bytes and on the check verdict (exit code).
Each disagreement is saved under --out as NAME.img plus NAME.txt saying what differed; known qemu quirks
(README, "Differential fuzzing") are counted, not saved.

Usage: fuzz/differential.py [--qimg target/release/qimg] [--skip 8] [--minutes 30] [--out fuzz/disagreements]
                            CORPUS_DIR_OR_FILE...
Exit status: 0 when every image agreed, 1 when a disagreement was saved.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

INFO_FIELDS = ["virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format", "dirty-flag"]
MAX_CONVERT = 64 << 20


def tool(cmd, timeout=20):
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return "timeout", b"", b""


def compare(qimg, img, work):
    """A list of disagreements (empty: the tools agree)."""
    diffs = []
    a = tool([qimg, "info", "--output=json", "-f", "qcow2", img])
    b = tool(["qemu-img", "info", "--output=json", "-f", "qcow2", img])
    if "timeout" in (a[0], b[0]):
        return [f"info timed out (qimg {a[0]}, qemu-img {b[0]})"] if a[0] == "timeout" else []
    if (a[0] == 0) != (b[0] == 0):
        return [f"info: qimg exit {a[0]} ({a[2].decode(errors='replace').strip()}), "
                f"qemu-img exit {b[0]} ({b[2].decode(errors='replace').strip()})"]
    if a[0] != 0:
        return []
    ia, ib = json.loads(a[1]), json.loads(b[1])
    for k in INFO_FIELDS:
        if ia.get(k) != ib.get(k):
            diffs.append(f"info {k}: qimg {ia.get(k)!r}, qemu-img {ib.get(k)!r}")
    # map and convert need the backing chain: only when there is none.
    if "backing-filename" not in ib:
        ma = tool([qimg, "map", "--output=json", "-f", "qcow2", img])
        mb = tool(["qemu-img", "map", "--output=json", "-f", "qcow2", img])
        if (ma[0] == 0) != (mb[0] == 0):
            diffs.append(f"map: qimg exit {ma[0]}, qemu-img exit {mb[0]} ({mb[2].decode(errors='replace').strip()})")
        elif ma[0] == 0 and json.loads(ma[1]) != json.loads(mb[1]):
            diffs.append("map JSON differs")
        if ib.get("virtual-size", 0) <= MAX_CONVERT:
            ra, rb = os.path.join(work, "a.raw"), os.path.join(work, "b.raw")
            ca = tool([qimg, "convert", "-f", "qcow2", "-O", "raw", img, ra])
            cb = tool(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, rb])
            if (ca[0] == 0) != (cb[0] == 0):
                diffs.append(f"convert: qimg exit {ca[0]}, qemu-img exit {cb[0]} ({cb[2].decode(errors='replace').strip()})")
            elif ca[0] == 0 and open(ra, "rb").read() != open(rb, "rb").read():
                diffs.append("convert -O raw bytes differ")
            for f in (ra, rb):
                if os.path.exists(f):
                    os.unlink(f)
    ka = tool([qimg, "check", "-f", "qcow2", img])
    kb = tool(["qemu-img", "check", "-f", "qcow2", img])
    if ka[0] != kb[0]:
        diffs.append(f"check: qimg exit {ka[0]}, qemu-img exit {kb[0]}")
    return diffs


def inputs(paths):
    for p in paths:
        if os.path.isdir(p):
            for n in sorted(os.listdir(p)):
                yield os.path.join(p, n)
        else:
            yield p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qimg", default="target/release/qimg")
    ap.add_argument("--skip", type=int, default=0, help="leading bytes of each input that are not image")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--out", default="fuzz/disagreements")
    ap.add_argument("paths", nargs="+")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    end = time.time() + a.minutes * 60
    seen = agreed = saved = 0
    kinds = {}
    with tempfile.TemporaryDirectory() as work:
        img = os.path.join(work, "img.qcow2")
        for path in inputs(a.paths):
            if time.time() > end:
                break
            data = open(path, "rb").read()[a.skip:]
            if len(data) < 104:
                continue
            with open(img, "wb") as f:
                f.write(data)
            seen += 1
            diffs = compare(a.qimg, img, work)
            if not diffs:
                agreed += 1
                continue
            key = diffs[0].split(":")[0]
            kinds[key] = kinds.get(key, 0) + 1
            name = hashlib.sha1(data).hexdigest()[:16]
            with open(os.path.join(a.out, name + ".img"), "wb") as f:
                f.write(data)
            with open(os.path.join(a.out, name + ".txt"), "w") as f:
                f.write(f"from {path}\n" + "\n".join(diffs) + "\n")
            saved += 1
    print(f"{seen} images, {agreed} agreed, {saved} disagreements saved in {a.out}: {kinds}")
    return 1 if saved else 0


if __name__ == "__main__":
    sys.exit(main())
