#!/usr/bin/env python3
"""Differential oracle: qimg against qemu-img on fuzzed images.

Every input file (a fuzz corpus entry, minus --skip leading bytes) is written to an image file and given to both
tools: `info --output=json`, `map --output=json`, `convert -O raw` and `check`. They must agree on whether the
image opens, on the info fields and the map, on the converted bytes and on the check verdict (exit code).
Each disagreement is saved under --out as NAME.img plus NAME.txt saying what differed; known qemu quirks
(README, "Differential fuzzing") are counted, not saved.

With --mutate, once every input has been tried, the rest of the time goes to mutants of them: one to four
header fields or bytes anywhere set to boundary values (0, 1, all ones, the file length, cluster-aligned
offsets inside the file, random bytes), drawn from a seeded generator so a run replays.

Usage: fuzz/differential.py [--qimg target/release/qimg] [--skip 8] [--minutes 30] [--out fuzz/disagreements]
                            [--mutate] [--seed N] CORPUS_DIR_OR_FILE...
Exit status: 0 when every image agreed, 1 when a disagreement was saved.
"""
import argparse
import hashlib
import json
import os
import random
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


HEADER_FIELDS = [(8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4), (60, 4),
                 (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1)]


def mutant(rng, data):
    """`data` with one to four fields or bytes set to boundary values."""
    d = bytearray(data)
    cs = 1 << min(max(d[23], 9), 21) if len(d) > 23 else 65536
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            off, width = rng.choice(HEADER_FIELDS)
        else:
            off, width = rng.randrange(len(d)), rng.choice([1, 4, 8])
        if off + width > len(d):
            continue
        v = rng.choice([0, 1, (1 << (8 * width)) - 1, (1 << (8 * width - 1)) - 1, len(d), len(d) - 1,
                        rng.randrange(max(1, len(d) // cs)) * cs, rng.getrandbits(8 * width)])
        d[off:off + width] = (v % (1 << (8 * width))).to_bytes(width, "big")
    return bytes(d)


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
    ap.add_argument("--mutate", action="store_true", help="after the inputs, try mutants of them until the time is up")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("paths", nargs="+")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    end = time.time() + a.minutes * 60
    seen = agreed = saved = 0
    kinds = {}
    pool = []
    rng = random.Random(a.seed)

    def candidates():
        for path in inputs(a.paths):
            data = open(path, "rb").read()[a.skip:]
            if len(data) >= 104:
                if a.mutate and len(pool) < 20000:
                    pool.append(data)
                yield path, data
        while a.mutate and pool:
            yield "mutant", mutant(rng, rng.choice(pool))

    with tempfile.TemporaryDirectory() as work:
        img = os.path.join(work, "img.qcow2")
        for path, data in candidates():
            if time.time() > end:
                break
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
