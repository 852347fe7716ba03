"""CPU time of this process's threads by name, for the pipeline benchmarks (which thread of the extracting
process is saturated: on many cores, a main thread near one CPU-second a second is the GIL-bound ceiling)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

# The sampler is a process of its own: a thread of this one would need the GIL to read /proc, and a process whose
# threads fight over the GIL starves it (measured: a thread sampling every 20 ms saw nothing for ~0.4 s while two
# threads spun, and lost up to two thirds of their CPU).
_SAMPLER = r"""
import json, os, select, sys
pid, every = int(sys.argv[1]), float(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
first, last = {}, {}
def take(start=False):
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        first.setdefault(tid, cpu if start else 0.0)
        last[tid] = cpu
take(start=True)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], every)[0]:
    take()
take()
print(json.dumps({tid: [first[tid], last[tid]] for tid in last}), flush=True)
"""


class ThreadCPU:
    """CPU seconds of this process's threads while the block runs, by Python thread name (numbered pools folded:
    `convcache-decode_N`), in `seconds`. Read from /proc/PID/task every `every` seconds by a sampler process (a
    thread that ends loses what it used after the last sample: at most `every`); threads there on entry count
    from then, later ones from their start. Linux only."""

    def __init__(self, every: float = 0.05):
        self.every, self.seconds = every, {}

    def __enter__(self):
        self._names: dict = {}
        self._note_names()
        self._proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid()), str(self.every)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._proc.stdout.readline()  # "ready": threads there now are counted from here
        self._stop = threading.Event()
        self._namer = threading.Thread(target=self._name_threads, daemon=True, name="threadcpu-names")
        self._namer.start()
        return self

    def _note_names(self) -> None:
        for t in threading.enumerate():
            if t.native_id is not None:
                self._names[str(t.native_id)] = re.sub(r"_\d+$", "_N", t.name)

    def _name_threads(self) -> None:  # names only: a late look costs no CPU figure, only a short thread's name
        while not self._stop.wait(0.1):
            self._note_names()

    def __exit__(self, *exc):
        self._stop.set()
        self._namer.join()
        self._note_names()
        out, _ = self._proc.communicate("")  # EOF: the sampler reads once more and answers
        self.seconds = {}
        for tid, (first, last) in json.loads(out).items():
            name = self._names.get(tid, "other")
            if name != "threadcpu-names" and last > first:
                self.seconds[name] = round(self.seconds.get(name, 0.0) + last - first, 3)
