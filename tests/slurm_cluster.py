"""A real single-node Slurm in a temporary dir, for the launcher tests.

    cluster = LocalSlurm(tmp_dir)     # LocalSlurm.unavailable() says why it cannot run here
    cluster.start()                   # munged, slurmctld, slurmd; waits for the node to be idle
    subprocess.run([...], env={**os.environ, **cluster.env()})
    cluster.stop()                    # every daemon it started, by PID

Needs root and Debian's `slurmctld slurmd slurm-client munge` (.ci/run installs them). Slurm
listens on fixed ports (6817/6818), so one such cluster per host. Without accounting `sacct`
cannot tell submitit that a job died without writing its result (the sweep would wait for
ever), so a small stand-in answering from `squeue` goes first on PATH; finished jobs stay in
squeue for MinJobAge. Two fake GPUs (character devices listed in gres.conf) let a preset ask for
`gpus_per_node: 1`; Slurm then sets CUDA_VISIBLE_DEVICES per job as on a real GPU node.

Also a command line, to try the launcher presets by hand on one machine:
    python tests/slurm_cluster.py start /tmp/slurm   # prints the `export SLURM_CONF=... PATH=...`
    python tests/slurm_cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "munged", "munge", "unmunge", "setpriv")
PORTS = (6817, 6818)
PARTITION = "debug"
FAKE_GPUS = 2
_NVIDIA_MAJOR = 195

SACCT_STANDIN = """#!/bin/sh
# sacct stand-in for a Slurm without accounting (test helper): answers submitit's
# `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from squeue.
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) ids="$ids,$2"; shift 2 ;; *) shift ;; esac
done
echo "JobID|State|NodeList"
exec squeue -h -r --states=all -o "%i|%T|%N" -j "${ids#,}"
"""


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # -- checks ---------------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why a local Slurm cannot run on this machine, or None."""
        if not sys.platform.startswith("linux"):
            return "needs Linux"
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            return (
                f"Slurm/munge binaries missing ({', '.join(missing)}); install with "
                "`apt-get install slurmctld slurmd slurm-client munge` (.ci/run does)"
            )
        if os.geteuid() != 0:
            return "slurmd and munged need root"
        try:
            import pwd

            pwd.getpwnam("munge")
        except KeyError:
            return "no 'munge' user (the munge package creates it)"
        busy = [p for p in PORTS if _port_in_use(p)]
        if busy:
            return f"Slurm ports {busy} already in use (one Slurm per host)"
        return None

    # -- start / stop ---------------------------------------------------------------------
    def env(self) -> dict:
        return {
            "SLURM_CONF": str(self.conf),
            "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _which(self, name: str) -> str:
        return shutil.which(name) or str(Path("/usr/sbin", name))

    def _spawn(self, name: str, argv: list, **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw
        )
        self.pids[name] = self._procs[name].pid
        (self.root / "pids.json").write_text(json.dumps(self.pids))

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            log = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log}")

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        import pwd

        munge_user = pwd.getpwnam("munge")
        r = self.root
        for sub in ("etc", "bin", "log", "state", "spool", "dev", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)
        munge_dir = r / "munge"
        munge_dir.chmod(0o755)
        os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
        self.munge_socket = munge_dir / "munge.socket.2"

        # munged as the munge user (it refuses a root-owned key); the PID we keep is its own.
        self._spawn(
            "munged",
            [
                self._which("setpriv"),
                f"--reuid={munge_user.pw_uid}",
                f"--regid={munge_user.pw_gid}",
                "--init-groups",
                self._which("munged"),
                "-F",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={munge_dir / 'munged.log'}",
            ],
        )
        self._wait(
            lambda: (
                subprocess.run(
                    f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}",
                    shell=True,
                    capture_output=True,
                ).returncode
                == 0
            ),
            timeout,
            "munged",
            "munge -n | unmunge",
        )

        gres = []
        for i in range(FAKE_GPUS):
            dev = r / "dev" / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(_NVIDIA_MAJOR, i))
        gres.append(f"NodeName={self.host} Name=gpu File={r / 'dev'}/fakegpu[0-{FAKE_GPUS - 1}]")
        (r / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")

        hw = subprocess.run(
            [self._which("slurmd"), "-C"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        hw = " ".join(f for f in hw.split() if not f.startswith(("NodeName=", "UpTime=")))
        self.conf.write_text(f"""# written by tests/slurm_cluster.py
ClusterName=hstuexp
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 {hw} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        sacct = r / "bin" / "sacct"
        sacct.write_text(SACCT_STANDIN)
        sacct.chmod(0o755)

        env = {**os.environ, **self.env()}
        self._spawn("slurmctld", [self._which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=env)
        self._spawn(
            "slurmd", [self._which("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)], env=env
        )

        def idle():
            for name in ("slurmctld", "slurmd"):
                self._check_alive(name)
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        self._wait(idle, timeout, "slurmd", "node idle in sinfo")
        return self

    def _wait(self, ready, timeout: float, name: str, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            if ready():
                return
            time.sleep(0.2)
        logs = "\n".join(
            p.read_text(errors="replace")[-1500:]
            for p in sorted((self.root / "log").glob("*"))
            if p.is_file()
        )
        raise RuntimeError(f"local Slurm: no '{what}' after {timeout:.0f} s\n{logs}")

    def _cancel_jobs(self, timeout: float) -> None:
        env = {**os.environ, **self.env()}
        try:
            subprocess.run(
                ["scancel", "--full", "-p", PARTITION], env=env, capture_output=True, timeout=timeout
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = subprocess.run(
                    ["squeue", "-h", "-o", "%i"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
                if out.returncode != 0 or not out.stdout.strip():
                    return
                time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stops every daemon this object started, by PID (slurmd first, munged last)."""
        pids = self.pids or json.loads((self.root / "pids.json").read_text())
        self._cancel_jobs(timeout)  # slurmstepd outlives slurmd: end the jobs first
        for name in ("slurmd", "slurmctld", "munged"):
            pid = pids.get(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            proc = self._procs.get(name)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc is not None:
                    if proc.poll() is not None:
                        break
                elif not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if proc is not None:
                    proc.wait(timeout)
        self.pids = {}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    cluster = LocalSlurm(Path(argv[1]).resolve())
    if argv[0] == "start":
        reason = LocalSlurm.unavailable()
        if reason:
            print(f"local Slurm cannot run here: {reason}", file=sys.stderr)
            return 1
        cluster.start()
        env = cluster.env()
        print(f"export SLURM_CONF={env['SLURM_CONF']} PATH={env['PATH']}")
        print(f"# partition: {PARTITION}; stop with: python {__file__} stop {argv[1]}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
