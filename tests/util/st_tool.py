#!/usr/bin/env python3
"""st_tool.py — small safetensors chores for the shell tests (tests/cli_*.sh), stdlib only (no
numpy): a safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data.

  st_tool.py gen OUT SEED NAME:D0xD1x... ...   random float32 N(0,1) tensors (Python's RNG, SEED)
  st_tool.py reseed IN OUT SEED                IN's tensors (names, shapes) with new float32
                                               values N(0, 0.2): "the same model, other weights"
  st_tool.py layout A B                        exit 0 iff A and B hold the same tensor names,
                                               dtypes and shapes (prints both on a mismatch)
  st_tool.py bitwise A B SUBSTR                exit 0 iff every tensor of A whose name contains
                                               SUBSTR is byte-identical in B (prints the count)
  st_tool.py names A [SUBSTR]                  the tensor names, those without SUBSTR
  st_tool.py shard IN DIR N [PREFIX]           a checkpoint directory: IN's tensors (renamed
                                               PREFIX + name) over N shard files
                                               model-0000i-of-0000N.safetensors and
                                               model.safetensors.index.json
"""
import json
import random
import struct
import sys


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return header, data


def write(path, tensors):
    """tensors: list of (name, dtype, shape, bytes)"""
    header, off = {}, 0
    for name, dt, shape, blob in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(blob)]}
        off += len(blob)
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj + b"".join(t[3] for t in tensors))


def blob(header, data, name):
    b, e = header[name]["data_offsets"]
    return data[b:e]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv):
    cmd = argv[1]
    if cmd == "gen":
        out, rng = argv[2], random.Random(int(argv[3]))
        ts = []
        for spec in argv[4:]:
            name, dims = spec.split(":")
            shape = [int(d) for d in dims.split("x")]
            n = numel(shape)
            ts.append((name, "F32", shape, struct.pack("<%df" % n, *[rng.gauss(0, 1) for _ in range(n)])))
        write(out, ts)
        return 0
    if cmd == "reseed":
        h, _ = read(argv[2])
        rng = random.Random(int(argv[4]))
        ts = []
        for name, e in h.items():
            assert e["dtype"] == "F32", f"{name}: reseed writes float32 only, got {e['dtype']}"
            n = numel(e["shape"])
            ts.append((name, "F32", e["shape"], struct.pack("<%df" % n, *[rng.gauss(0, 0.2) for _ in range(n)])))
        write(argv[3], ts)
        return 0
    if cmd == "layout":
        ha, _ = read(argv[2])
        hb, _ = read(argv[3])
        la = sorted((k, v["dtype"], v["shape"]) for k, v in ha.items())
        lb = sorted((k, v["dtype"], v["shape"]) for k, v in hb.items())
        if la != lb:
            print(f"{argv[2]}: {la}\n{argv[3]}: {lb}")
            return 1
        print(f"same {len(la)} tensors (names, dtypes, shapes)")
        return 0
    if cmd == "bitwise":
        ha, da = read(argv[2])
        hb, db = read(argv[3])
        names = [k for k in ha if argv[4] in k]
        bad = [k for k in names if k not in hb or blob(ha, da, k) != blob(hb, db, k)]
        if not names or bad:
            print(f"{len(names)} tensors match '{argv[4]}'; differing or missing: {bad}")
            return 1
        print(f"{len(names)} tensors matching '{argv[4]}' are byte-identical")
        return 0
    if cmd == "names":
        h, _ = read(argv[2])
        for k in h:
            if len(argv) < 4 or argv[3] not in k:
                print(k)
        return 0
    if cmd == "shard":
        h, d = read(argv[2])
        out, n = argv[3], int(argv[4])
        prefix = argv[5] if len(argv) > 5 else ""
        names = sorted(h)
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i in range(n):
            mine = names[i::n]
            write(f"{out}/{files[i]}", [(prefix + k, h[k]["dtype"], h[k]["shape"], blob(h, d, k)) for k in mine])
            for k in mine:
                weight_map[prefix + k] = files[i]
        with open(f"{out}/model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": len(d)}, "weight_map": weight_map}, f, indent=1)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
