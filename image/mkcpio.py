#!/usr/bin/env python3
"""Pack a staging directory into a reproducible, gzipped cpio "newc" archive.

Written for AgentLab's initramfs: it needs no root, because ownership, timestamps and
device nodes are set in the archive rather than on disk.

* every entry is owned by uid/gid 0 and carries the same mtime (SOURCE_DATE_EPOCH, or 0);
* entries are sorted by path, parents before their children; inode numbers are
  assigned in that order and hard links are stored as separate files;
* modes: directories 0755, symlinks 0777, regular files 0755 if the staged file has
  any execute bit and 0644 otherwise, unless overridden with --mode;
* extra directories, symlinks and device nodes can be added with --dir, --symlinks
  (a file of "PATH TARGET" lines, cheaper than staging hundreds of links) and --dev;
* gzip output has no name and a zero timestamp, so equal inputs give equal bytes.

Usage:
  mkcpio.py STAGING OUTPUT [--mode PATH=OCTAL]... [--dir PATH[:OCTAL]]...
            [--symlinks FILE]... [--dev PATH:c|b:MAJOR:MINOR[:OCTAL]]... [--level N]

PATH is relative to the archive root, e.g. `dev/console` or `/dev/console`.
"""

import argparse
import gzip
import os
import stat
import sys

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class Writer:
    def __init__(self, out, mtime):
        self.out = out
        self.mtime = mtime
        self.ino = 0
        self.offset = 0

    def _write(self, data):
        self.out.write(data)
        self.offset += len(data)

    def _pad(self):
        rem = self.offset % 4
        if rem:
            self._write(b"\0" * (4 - rem))

    def entry(self, name, mode, data=b"", rdev=(0, 0), ino=None):
        if ino is None:
            self.ino += 1
            ino = self.ino
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            self.mtime,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._write(NEWC_MAGIC + b"".join(b"%08X" % f for f in fields))
        self._write(encoded)
        self._pad()
        if data:
            self._write(data)
            self._pad()

    def trailer(self):
        self.entry(TRAILER, 0, ino=0)
        # Pad the archive to a 512-byte block, as cpio(1) does.
        rem = self.offset % 512
        if rem:
            self._write(b"\0" * (512 - rem))


def norm(path):
    path = path.strip("/")
    if not path or ".." in path.split("/"):
        sys.exit(f"mkcpio: bad archive path {path!r}")
    return path


def parse_mode(text):
    try:
        return int(text, 8)
    except ValueError:
        sys.exit(f"mkcpio: bad octal mode {text!r}")


def collect(staging):
    """Returns {archive path: (kind, permission bits, payload)} for the staging tree."""
    entries = {}
    for root, dirs, files in os.walk(staging):
        dirs.sort()
        rel_root = os.path.relpath(root, staging)
        for name in dirs + sorted(files):
            full = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = (stat.S_IFLNK, 0o777, os.readlink(full).encode())
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = (stat.S_IFDIR, 0o755, b"")
            elif stat.S_ISREG(st.st_mode):
                perm = 0o755 if st.st_mode & 0o111 else 0o644
                with open(full, "rb") as f:
                    entries[rel] = (stat.S_IFREG, perm, f.read())
            else:
                sys.exit(f"mkcpio: unsupported file type: {full}")
    return entries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("staging")
    ap.add_argument("output")
    ap.add_argument("--mode", action="append", default=[], metavar="PATH=OCTAL")
    ap.add_argument("--dir", action="append", default=[], metavar="PATH[:OCTAL]")
    ap.add_argument("--dev", action="append", default=[], metavar="PATH:c|b:MAJ:MIN[:OCTAL]")
    ap.add_argument("--symlinks", action="append", default=[], metavar="FILE")
    ap.add_argument("--level", type=int, default=6, help="gzip level (default 6)")
    args = ap.parse_args()

    entries = collect(args.staging)
    rdevs = {}
    for spec in args.dir:
        path, _, mode = spec.partition(":")
        entries[norm(path)] = (stat.S_IFDIR, parse_mode(mode) if mode else 0o755, b"")
    for list_file in args.symlinks:
        with open(list_file) as f:
            for line in f:
                if not line.strip():
                    continue
                path, sep, target = line.strip().partition(" ")
                if not sep or not target:
                    sys.exit(f"mkcpio: bad line in {list_file}: {line!r}")
                entries[norm(path)] = (stat.S_IFLNK, 0o777, target.encode())
    for spec in args.dev:
        parts = spec.split(":")
        if len(parts) not in (4, 5) or parts[1] not in ("c", "b"):
            sys.exit(f"mkcpio: bad --dev {spec!r}")
        path = norm(parts[0])
        kind = stat.S_IFCHR if parts[1] == "c" else stat.S_IFBLK
        perm = parse_mode(parts[4]) if len(parts) == 5 else 0o600
        entries[path] = (kind, perm, b"")
        rdevs[path] = (int(parts[2]), int(parts[3]))
    for spec in args.mode:
        path, sep, mode = spec.partition("=")
        path = norm(path)
        if not sep or path not in entries:
            sys.exit(f"mkcpio: bad --mode {spec!r} (no such entry?)")
        kind, _, data = entries[path]
        entries[path] = (kind, parse_mode(mode), data)

    # Every parent directory must precede its children; add missing ones.
    for path in list(entries):
        parent = os.path.dirname(path)
        while parent and parent not in entries:
            entries[parent] = (stat.S_IFDIR, 0o755, b"")
            parent = os.path.dirname(parent)

    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                           compresslevel=args.level) as gz:
            w = Writer(gz, mtime)
            # Sorting on path components puts "a" before "a/b" before "a.b".
            for path in sorted(entries, key=lambda p: p.split("/")):
                kind, perm, data = entries[path]
                w.entry(path, kind | perm, data, rdevs.get(path, (0, 0)))
            w.trailer()
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
