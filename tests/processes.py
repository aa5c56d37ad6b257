"""`python -m <module> <args>` for the tests, in a process forked from the test process.

Starting Python and importing torch, Lightning, timm and the rest costs about 8 s of CPU, more than most
of the commands the tests run. A forked child already holds those imports; it is still a process of its
own: it runs the module as `__main__` with its own argv, working directory, environment, stdout and
stderr (to files), and exit status, and whatever it does to global state dies with it. The parent
imports `sfseg.train` (and so the whole stack) once.

A fork cannot train once this process has run a compiled backward (torch.compile traces it on the meta
device, and autograd then refuses to run in a forked child): from then on the commands start fresh.

What a fork cannot show is a fault of a fresh interpreter: an import that fails, a module-level side
effect, a variable read at import time (HF_HUB_OFFLINE, HF_HUB_CACHE: such a change in `env` starts a
fresh interpreter). Every entry point keeps at least one test that starts it with `sys.executable -m`
(`fresh=True`), and DDP, whose launcher starts the other ranks with that command line, starts fresh.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch

import sfseg.train  # noqa: F401  (the imports every forked child inherits)

# Variables that the stack reads when it is imported: a child forked from this process would not see them.
READ_AT_IMPORT = ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "PYTHONPATH", "OMP_NUM_THREADS")


class Forked:
    """A running `python -m <module> <args>` forked from this process: `communicate` waits for it and
    returns (stdout, stderr); `returncode` is its exit status (None while it runs)."""

    def __init__(self, module: str, args: list[str], cwd: Path, env: Mapping[str, str] | None) -> None:
        self.args = [sys.executable, "-m", module, *args]
        self.returncode: int | None = None
        self._outputs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]  # noqa: SIM115  (closed in communicate)
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            self._run_child(module, args, cwd, env)

    def _run_child(self, module: str, args: list[str], cwd: Path, env: Mapping[str, str] | None) -> None:
        code = 1
        try:
            os.setpgrp()  # its own process group, so that a timeout also stops its loader workers
            for fd, output in zip((1, 2), self._outputs, strict=True):
                os.dup2(output.fileno(), fd)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.chdir(cwd)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()  # the test process may have composed configs
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except BaseException:  # what the interpreter prints for an uncaught exception
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        """The exit status once the process has ended, else None (as subprocess.Popen.poll)."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def communicate(self, timeout: float = 600) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise subprocess.TimeoutExpired(self.args, timeout)
            else:
                time.sleep(0.05)
        texts = []
        for output in self._outputs:
            output.seek(0)
            texts.append(output.read().decode(errors="replace"))
            output.close()
        return texts[0], texts[1]


def forked_children_can_train() -> bool:
    """Whether autograd runs in a child forked from this process (it stops doing so for good once this
    process has run a compiled backward): a child forked to try one backward."""
    global _forks_train
    if _forks_train:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                torch.ones(1, requires_grad=True).sum().backward()
                code = 0
            except RuntimeError:
                pass
            finally:
                os._exit(code)
        _forks_train = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return _forks_train


_forks_train = True


def start_module(
    module: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None, fresh: bool = False
) -> Forked | subprocess.Popen:
    """Start `python -m module args` in `cwd`: forked, or with `fresh` (or a variable that the stack reads
    at import time changed in `env`, or forked children that cannot train) a new interpreter. Both have
    `communicate()` and `returncode`."""
    changed = {key for key in READ_AT_IMPORT if (env or os.environ).get(key) != os.environ.get(key)}
    if fresh or changed or not forked_children_can_train():
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return Forked(module, list(args), cwd, env)


def run_module(
    module: str,
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    fresh: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m module args` to its end (see start_module): its exit status, stdout and stderr."""
    process = start_module(module, *args, cwd=cwd, env=env, fresh=fresh)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
