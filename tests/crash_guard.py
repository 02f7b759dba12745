"""Process isolation for tests whose subject may kill the interpreter (a segfault, an abort) or
hang: ``CrashGuard("module:function").run(spec)`` calls ``function(spec)`` in a persistent child
process and returns its answer; a death or a timeout becomes an AssertionError naming the spec (and
``rerun``, a command to rerun it in-process), and the next call gets a fresh child.

The child imports the target from this folder and the parent's ``sys.path`` (so both see the same
package); specs and answers are length-prefixed pickles on its stdin and stdout, its own output goes
to stderr, whose tail a failure quotes. ``{"crash_guard": "segfault" | "hang" | "fail" | "pass"}``
is answered by the guard itself, so that a test can check the guard in front of its real target.
"""

import importlib
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile


class CrashGuard:
    def __init__(self, target, timeout=120.0, rerun=None):
        """``target``: "module:function"; ``timeout``: seconds a call may take; ``rerun``: a command
        with ``{spec}`` (the spec as JSON) that reruns one call in-process, quoted on a failure."""
        self.target, self.timeout, self.rerun = target, timeout, rerun
        self.proc = self.stderr = None

    def _start(self):
        self.stderr = tempfile.TemporaryFile()
        path = os.pathsep.join(
            [os.path.dirname(os.path.abspath(__file__)), *filter(None, sys.path)]
        )
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path),
        )

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, spec, timeout=None):
        """The target's answer for ``spec``; AssertionError if the child died or outlived ``timeout``."""
        timeout = self.timeout if timeout is None else timeout
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        payload = pickle.dumps(spec)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            header = self.proc.stdout.read(8) if ready else None
        except BrokenPipeError:
            header = b""
        if header is not None and len(header) == 8:
            (size,) = struct.unpack("<Q", header)
            return pickle.loads(self.proc.stdout.read(size))
        if header is None:
            self.proc.kill()
        code = self.proc.wait()
        self.proc = None
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace")[-3000:]
        what = f"hung for more than {timeout:.0f} s" if header is None else _describe_exit(code)
        rerun = (
            f"rerun it in-process: {self.rerun.format(spec=json.dumps(spec))}\n"
            if self.rerun
            else ""
        )
        raise AssertionError(
            f"the worker process {what} on example {json.dumps(spec)}\n{rerun}"
            f"worker stderr (tail):\n{tail}"
        )


def _describe_exit(code):
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"died of {signal.Signals(-code).name}"
    except ValueError:
        return f"died of signal {-code}"


def _planted(action):
    """The guard's own test actions."""
    if action == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "hang":
        signal.pause()
    return "planted failure" if action == "fail" else None


def serve(target):
    """The child: answers specs from stdin on stdout until stdin closes; C++ output goes to stderr."""
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    src = sys.stdin.buffer
    while len(header := src.read(8)) == 8:
        spec = pickle.loads(src.read(struct.unpack("<Q", header)[0]))
        planted = isinstance(spec, dict) and "crash_guard" in spec
        answer = pickle.dumps(_planted(spec["crash_guard"]) if planted else function(spec))
        out.write(struct.pack("<Q", len(answer)) + answer)
        out.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
