"""Launching local multi-process runs for the tests (no pytest fixtures).

`run_commands(cmds, timeout_s)` starts every command at once (e.g. the two
processes of a `jax.distributed` run on 127.0.0.1 next to a 1-process
reference run), waits for all of them within one timeout, kills what is
left on failure and returns their outputs; a non-zero exit status fails the
test with the tail of that process's output. The children get one CPU
device each unless they set their own (`XLA_FLAGS` removed) and import this
checkout's `kd_jax` first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Optional, Sequence

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
  """A free TCP port on 127.0.0.1 for a coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env() -> dict:
  """The environment of a child: no `XLA_FLAGS`, this checkout first."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def distributed_flags(port: int, num_processes: int) -> List[List[str]]:
  """`experiments.main` flags of each process of a local run."""
  return [[f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={pid}"]
          for pid in range(num_processes)]


def run_commands(cmds: Sequence[Sequence[str]], timeout_s: float, *,
                 cwd: Optional[str] = ROOT,
                 separate_stderr: bool = False) -> List:
  """Runs `cmds` concurrently; returns each one's output (stdout with
  stderr merged in, or `(stdout, stderr)` with `separate_stderr`)."""
  err = subprocess.PIPE if separate_stderr else subprocess.STDOUT
  procs = [subprocess.Popen(list(c), cwd=cwd, env=child_env(),
                            stdout=subprocess.PIPE, stderr=err, text=True)
           for c in cmds]
  outs, deadline = [], time.monotonic() + timeout_s
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1)))
  except subprocess.TimeoutExpired:
    pytest.fail(f"{len(cmds)} processes did not finish within {timeout_s} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, (out, errs)) in enumerate(zip(procs, outs)):
    if p.returncode != 0:
      pytest.fail(f"command {i} ({' '.join(cmds[i][-3:])}) exited with "
                  f"{p.returncode}:\n{(out + (errs or ''))[-3000:]}")
  return [(o, e) if separate_stderr else o for o, e in outs]


def main_command(*flags_: str) -> List[str]:
  """`python -m experiments.main FLAGS...` with this interpreter."""
  return [sys.executable, "-m", "experiments.main", *flags_]
