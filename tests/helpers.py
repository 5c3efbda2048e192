"""Running the real CLI from tests."""

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["workload.warmup=1", "workload.iters=3", "workload.min_time_s=0.01"]


def hstu_exp(*args, cwd=None, timeout=300, env=None, address_space=None, fresh=False):
    """Runs `python -m hstu_exp ARGS`; returns the CompletedProcess (text mode). address_space:
    a cap in bytes on the process's address space (RLIMIT_AS, as `ulimit -v` sets it).

    The process is forked from the pre-warmed launcher (tests/zygote.py: the heavy libraries
    already imported, the rest as a fresh start) unless `fresh`, a cap, or an environment that
    differs from the launcher's in a variable a library may read when imported asks for a
    plain `python` start (as does HSTU_EXP_TESTS_FRESH=1 for every call: to compare or to rule
    the launcher out)."""
    fresh = fresh or os.environ.get("HSTU_EXP_TESTS_FRESH") == "1"
    full_env = {**_base_env(), **(env or {})}
    cmd = [sys.executable, "-m", "hstu_exp", *args]
    cwd = str(cwd or ROOT)
    launcher = None if (fresh or address_space) else _launcher()
    if launcher is not None and launcher.fits(full_env):
        return launcher.run(cmd, cwd=cwd, env=full_env, timeout=timeout)

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        preexec_fn=cap if address_space else None,
    )


# Variables only read while running (not while a library is imported): a child may differ from
# the launcher's environment in these and still be what a fresh start would be.
_RUNTIME_ENV = ("HSTU_EXP_", "WANDB_", "XDG_", "SLURM_", "HOME", "PATH")


class Launcher:
    """The client of one tests/zygote.py process (one per test process, started on first use)."""

    def __init__(self, env: dict):
        import socket

        self.env = dict(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "zygote.py"), str(theirs.fileno())],
            cwd=ROOT,
            env=self.env,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        answer = self._answer(timeout=300)
        self.unsafe = None if answer.get("ready") else answer.get("why")
        if answer.get("ready") is not True and not self.unsafe:
            raise RuntimeError(f"the test launcher (tests/zygote.py) did not start: {answer}")

    def _answer(self, timeout):
        import json

        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 16)
        if not data:
            raise RuntimeError(f"the test launcher (tests/zygote.py) ended: {self.proc.wait()}")
        return json.loads(data)

    def fits(self, env: dict) -> bool:
        import torch

        runtime = _RUNTIME_ENV
        if not torch.backends.cuda.is_built():  # no CUDA to initialise: the GPU list is only read
            runtime += ("CUDA_VISIBLE_DEVICES",)
        differ = {k for k in self.env.keys() | env.keys() if self.env.get(k) != env.get(k)}
        return all(k.startswith(runtime) for k in differ)

    def run(self, cmd, cwd: str, env: dict, timeout: float):
        import json
        import socket
        import tempfile

        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            request = json.dumps({"argv": cmd[3:], "cwd": cwd, "env": env}).encode()
            socket.send_fds(self.sock, [request], [0, out.fileno(), err.fileno()])
            pid = self._answer(timeout=60)["pid"]
            try:
                status = self._answer(timeout=timeout)["status"]
            except TimeoutError:
                os.kill(pid, 9)
                self._answer(timeout=60)
                out.seek(0), err.seek(0)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read(), err.read()) from None
            out.seek(0), err.seek(0)
            return subprocess.CompletedProcess(
                cmd, os.waitstatus_to_exitcode(status), out.read(), err.read()
            )


def _base_env() -> dict:
    # A fresh CLI as a user's shell starts it: without the W&B service that an in-process test
    # started here (wandb puts its socket in WANDB_SERVICE, and a child would attach to it).
    # Nor pytest's name of the running test: it changes with every test, and a launcher started
    # in one test would then not fit the next one's calls (each would start plainly).
    unset = ("WANDB_SERVICE", "PYTEST_CURRENT_TEST")
    inherited = {k: v for k, v in os.environ.items() if k not in unset}
    return {**inherited, "PYTHONUNBUFFERED": "1"}


@functools.cache
def _launcher():
    """This test process's launcher, started on first use with the environment it has then; None
    where it cannot fork safely (it says why once, and every call starts plainly)."""
    launcher = Launcher(_base_env())
    if launcher.unsafe:
        print(f"tests: plain CLI starts: {launcher.unsafe}", file=sys.stderr)
        return None
    return launcher


def failing_pool():
    """(overrides, address-space cap) for a point that fails at run time: a CPU pool of model=tiny
    that fits the machine's memory, which is all the preflight's memory check sees, but not the
    cap, a limit on the process (`ulimit -v`, a batch scheduler's) that only the allocation
    meets. The cap is this process's size (torch imported, as in the child) plus 1.5 GB of
    headroom, so the point beside it (64 pages) runs."""
    size = next(
        int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:")
    )
    cap = size + 1_500_000_000
    page_bytes = 32 * 2 * 2 * 64 * 4  # page_size x (K, V) x layers x heads*head_dim x float32
    pages = (cap + 1_000_000_000) // page_bytes  # a pool 1 GB past the cap by itself
    return ["model=tiny", "device=cpu", "cache=paged", f"cache.num_pages={pages},64"], cap


def spec_block(block, x, history: int):
    """DESIGN §2 written out in float64 with explicit loops over heads: the independent oracle
    for the block. x: one user's whole sequence [length, hidden]; rows from `history` on are
    candidates (each sees the history and itself)."""
    import math

    import torch
    import torch.nn.functional as F

    x = x.double()
    length = x.shape[0]
    mask = torch.zeros(length, length, dtype=torch.float64)
    for i in range(length):
        if i < history:
            mask[i, : i + 1] = 1
        else:
            mask[i, :history] = 1
            mask[i, i] = 1
    for layer in block.layers:
        H, D = layer.num_heads, layer.head_dim
        p = {n: t.double() for n, t in layer.named_parameters()}
        n = F.layer_norm(x, (x.shape[1],), p["norm.weight"], p["norm.bias"], 1e-5)
        u, v, q, k = F.silu(n @ p["uvqk.weight"].T + p["uvqk.bias"]).split(H * D, dim=-1)
        heads = []
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            s = F.silu(q[:, sl] @ k[:, sl].T / math.sqrt(D)) * block.inv_n
            heads.append((s * mask) @ v[:, sl])
        a = F.layer_norm(
            torch.cat(heads, -1), (H * D,), p["attn_norm.weight"], p["attn_norm.bias"], 1e-5
        )
        x = x + (u * a) @ p["out.weight"].T
    return x


def read_run(run_dir):
    """Everything an offline W&B run holds, read back from its .wandb file (wandb's own record
    protobufs, framed as its log format says: wandb_sink.log_records): id, name, group, tags,
    job type, config, summary, history rows, metric definitions, exit code, logged artifacts."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    from hstu_exp.tracking.wandb_sink import log_records

    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {
        "id": None,
        "config": {},
        "summary": {},
        "history": [],
        "metrics": {},
        "exit_code": None,
        "artifacts": [],
        "group": None,
        "tags": [],
        "job_type": None,
        "name": None,
    }

    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    for data in log_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(
                id=rec.run.run_id,
                group=rec.run.run_group,
                tags=list(rec.run.tags),
                job_type=rec.run.job_type,
                name=rec.run.display_name,
                git_commit=rec.run.git.commit,
                host=rec.run.host,
            )
            out["config"].update(items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
        elif kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "metric":
            out["metrics"][rec.metric.name] = rec.metric.step_metric
        elif kind == "environment":
            out["environment"] = True
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif kind == "artifact":
            out["artifacts"].append(
                {
                    "name": rec.artifact.name,
                    "type": rec.artifact.type,
                    "files": [e.path for e in rec.artifact.manifest.contents],
                    "local_paths": [e.local_path for e in rec.artifact.manifest.contents],
                }
            )
    return out


def offline_runs(root):
    """{run id: [run dirs]} of every offline W&B run under root (a resumed run has several)."""
    runs = {}
    for d in sorted(Path(root).rglob("offline-run-*")):
        runs.setdefault(d.name.rsplit("-", 1)[-1], []).append(d)
    return runs


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mounted at `path` (mount options such as "size=16m" or "ro,size=1m") for the
    duration; the test is skipped where mounting is not permitted (not root)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
