#!/usr/bin/env python3
"""Run a command and report the peak memory of its whole process tree: the largest *sum* of resident set sizes
over the command and every process it started, sampled from /proc (what the kernel's OOM killer weighs), and
the largest single process. `/usr/bin/time -v` reports only the latter, taken over every descendant ever
waited for, so a short-lived child can set it.

    python3 .ci/peak_rss.py [--interval S] [--json FILE] -- make test

Exits with the command's status. Linux only (reads /proc); stdlib only, so it runs before any venv exists."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return " ".join(a.decode(errors="replace") for a in f.read().split(b"\0")[:4] if a)[:200]
    except OSError:
        return "?"


def tree_rss(root: int) -> tuple[int, int, int, int]:
    """(sum of RSS over `root` and its descendants, the largest one, how many processes, the largest's pid)."""
    kids, todo, seen = _children(), [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(kids.get(pid, []))
    sizes = [_rss(p) for p in seen]
    largest = max(range(len(seen)), key=sizes.__getitem__)
    return sum(sizes), sizes[largest], len(seen), seen[largest]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("no command given")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak = {"tree_bytes": 0, "process_bytes": 0, "processes": 0, "largest_process": ""}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total, largest, n, pid = tree_rss(proc.pid)
            peak["tree_bytes"] = max(peak["tree_bytes"], total)
            if largest > peak["process_bytes"]:  # which process it was: its command line's first words
                peak["process_bytes"], peak["largest_process"] = largest, _cmdline(pid)
            peak["processes"] = max(peak["processes"], n)
            stop.wait(a.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    peak.update(seconds=round(time.monotonic() - t0, 1), exit=code, command=" ".join(cmd))
    print(f"peak_rss: tree {peak['tree_bytes'] / 2**30:.2f} GiB, largest process {peak['process_bytes'] / 2**30:.2f} "
          f"GiB ({peak['largest_process']}), up to {peak['processes']} processes, {peak['seconds']:.0f} s, "
          f"exit {code}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(peak, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
