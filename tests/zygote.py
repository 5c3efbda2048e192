"""A pre-warmed launcher of `python -m hstu_exp` for the tests (the client is helpers.hstu_exp).

The CLI spends seconds importing torch, torchrec, Hydra, wandb and the plotting libraries
before it reads its first argument, and the tests start it hundreds of times. This process
imports those libraries once, then forks a child per request; the child becomes what
`python -m hstu_exp ARGS` would be: its own process with the argv, cwd, environment and
stdin/stdout/stderr the test gave, hstu_exp itself imported fresh (its module state is never
shared), and the interpreter's own exit path (SystemExit, an uncaught traceback, threads
joined, atexit, the standard streams flushed) deciding its exit code. Only what follows that
path is skipped: the child ends with os._exit after the last atexit handler instead of tearing
down the modules it inherited. That teardown (a last collection and a decref of every object
torch, Triton and the rest made) wrote to nearly every page the child shared with this process
and cost each call more than the CLI's own work did; a fresh `python -m hstu_exp` decides
nothing there (the exit code is set before it; HSTU_EXP_TESTS_FRESH=1 runs every call fresh).
The preloaded objects are frozen (gc.freeze) for the same reason: a child's collections pass
over them and leave their pages shared.

Forking is safe only while this process has one thread and has run no torch op (no OpenMP
pool): checked after the imports, which fails the start rather than a test later.

    python tests/zygote.py FD      # FD: a Unix SOCK_SEQPACKET socket to the test process
Request: one JSON message {"argv": [...], "cwd": str, "env": {...}} with the child's stdin,
stdout and stderr as passed file descriptors. Answers: {"pid": n} once forked, then
{"status": wait status} when it has ended.
"""

import atexit
import gc
import importlib
import json
import os
import socket
import sys

# The third-party libraries the CLI imports; hstu_exp's own modules are left to each child.
PRELOAD = (
    *("torch", "triton", "hydra", "omegaconf", "torchrec", "wandb", "numpy"),
    *("pandas", "matplotlib.pyplot", "seaborn", "mlperf_loadgen"),  # close-out, figures, serving
)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())  # a SOCK_SEQPACKET pair: one message a send


def serve(sock: socket.socket) -> dict:
    """Answers requests until the test process goes away (then exits); returns only in a
    forked child, with its request."""
    for name in PRELOAD:
        importlib.import_module(name)
    if _threads() != 1:  # a CUDA build's imports start threads (seen on the GPU box): say so
        why = f"{_threads()} threads after importing {PRELOAD}; forking would be unsafe"
        _send(sock, {"ready": False, "why": why})
        sys.exit(0)
    gc.freeze()
    _send(sock, {"ready": True})
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 3)
        if not data:  # the test process went away; nothing here to flush or tear down
            os._exit(0)
        request = json.loads(data)
        pid = os.fork()
        if pid == 0:
            sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            return request
        for fd in fds:
            os.close(fd)
        _send(sock, {"pid": pid})
        _send(sock, {"status": os.waitpid(pid, 0)[1]})


def become(request: dict) -> None:
    """Turns this forked child into `python -m hstu_exp ARGV` started in request's cwd and env."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["-m", *request["argv"]]
    sys.path[0] = os.getcwd()  # what `python -m` puts first (this script's dir for the zygote)
    ending = {"status": 0}
    atexit.register(_end, ending)  # registered first, so it runs after every other handler
    try:
        runpy.run_module("hstu_exp", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        ending["status"] = code if isinstance(code, int) else int(code is not None)
        raise
    except KeyboardInterrupt:
        ending["sigint"] = True  # the interpreter ends itself with SIGINT after its traceback
        raise
    except BaseException:
        ending["status"] = 1
        raise


def _end(ending: dict) -> None:
    """The end of the interpreter's exit path, as Py_RunMain has it, without the teardown."""
    import signal

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - what the interpreter answers for a failed flush
        ending["status"] = 120
    if ending.get("sigint"):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(ending["status"])


if __name__ == "__main__":
    become(serve(socket.socket(fileno=int(sys.argv[1]))))
