"""A real single-node Slurm in a temporary dir, for the launcher tests.

    cluster = LocalSlurm(tmp_dir)     # LocalSlurm.unavailable() says why it cannot run here
    cluster.start()                   # slurmctld, slurmd; waits for the node to be idle
    subprocess.run([...], env={**os.environ, **cluster.env()})
    cluster.stop()                    # every daemon it started, by PID

Nothing is installed: Debian's slurmctld, slurmd, slurm-client and plugin packages are fetched
with `apt-get download` (into HSTU_EXP_SLURM_DEBS, default ~/.cache/hstu-exp/slurm-debs, with
any library they need that the system lacks) and unpacked into the cluster's own dir; slurmd is
told where its slurmstepd is (-d), the daemons where the plugins are (PluginDir), and every
client runs through a wrapper that finds its library. No munge: the cluster authenticates with
auth/none and cred/none (Slurm 22.05, Debian 12; a test cluster on loopback only). Needs root
(slurmd starts jobs for any user; the fake GPUs are device nodes). The ports are picked free,
so it never meets a Slurm already running on the host. Without accounting `sacct`
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

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurm-wlm-basic-plugins")
CLIENTS = ("sinfo", "squeue", "sbatch", "scancel", "scontrol", "srun")
PLUGINS = "usr/lib/x86_64-linux-gnu/slurm-wlm"
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debs_dir() -> Path:
    default = Path.home() / ".cache" / "hstu-exp" / "slurm-debs"
    return Path(os.environ.get("HSTU_EXP_SLURM_DEBS") or default)


def _installed(package: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.stdout.strip() == "install ok installed"


def fetch_debs(dest: Path) -> None:
    """Downloads the packages (and the libraries they depend on that this system lacks) into
    dest, once; `apt-get download` needs no root, only the package lists."""
    if sorted(dest.glob("*.deb")):
        return
    out = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", *PACKAGES],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    libs = {
        line.split(":", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("Depends:") and line.split(":", 1)[1].strip().startswith("lib")
    }
    wanted = [*PACKAGES, *sorted(p for p in libs if not _installed(p))]
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    done = subprocess.run(["apt-get", "download", *wanted], cwd=part, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(wanted)}: {done.stderr.strip()[-500:]}")
    shutil.rmtree(dest, ignore_errors=True)
    part.rename(dest)


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
        if os.geteuid() != 0:
            return "slurmd needs root"
        if not sorted(debs_dir().glob("*.deb")):
            for tool in ("apt-get", "apt-cache", "dpkg-query", "dpkg-deb"):
                if shutil.which(tool) is None:
                    return f"no Slurm packages in {debs_dir()} and no {tool} to fetch them"
        return None

    # -- start / stop ---------------------------------------------------------------------
    def env(self) -> dict:
        return {
            "SLURM_CONF": str(self.conf),
            "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _unpack(self) -> None:
        """The packages unpacked into root/prefix; a wrapper per client command in root/bin."""
        fetch_debs(debs_dir())
        prefix = self.root / "prefix"
        for deb in sorted(debs_dir().glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(prefix)], check=True)
        libs = [prefix / PLUGINS, prefix / "usr/lib/x86_64-linux-gnu", prefix / "lib/x86_64-linux-gnu"]
        self.libs = os.pathsep.join(str(d) for d in libs if d.is_dir())
        for name in CLIENTS:
            wrapper = self.root / "bin" / name
            wrapper.write_text(
                f'#!/bin/sh\nLD_LIBRARY_PATH={self.libs} exec {prefix / "usr/bin" / name} "$@"\n'
            )
            wrapper.chmod(0o755)

        # The daemons under their own names: Debian ships them as NAME-wlm, and slurmctld run
        # under that name does not take the node's Gres from slurm.conf.
        (self.root / "sbin").mkdir(exist_ok=True)
        for name in ("slurmctld", "slurmd", "slurmstepd"):
            (self.root / "sbin" / name).symlink_to(prefix / "usr" / "sbin" / f"{name}-wlm")

    def _sbin(self, name: str) -> str:
        return str(self.root / "sbin" / name)

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
        r = self.root
        for sub in ("etc", "bin", "log", "state", "spool", "dev"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)
        self._unpack()
        daemon_env = {**os.environ, **self.env(), "LD_LIBRARY_PATH": self.libs}

        gres = []
        for i in range(FAKE_GPUS):
            dev = r / "dev" / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(_NVIDIA_MAJOR, i))
        gres.append(f"NodeName={self.host} Name=gpu File={r / 'dev'}/fakegpu[0-{FAKE_GPUS - 1}]")
        (r / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")

        hw = subprocess.run(
            [self._sbin("slurmd"), "-C"], capture_output=True, text=True, check=True, env=daemon_env
        ).stdout.splitlines()[0]
        hw = " ".join(f for f in hw.split() if not f.startswith(("NodeName=", "UpTime=")))
        self.conf.write_text(f"""# written by tests/slurm_cluster.py
ClusterName=hstuexp
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
PluginDir={r / "prefix" / PLUGINS}
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

        conf = ["-D", "-f", str(self.conf)]
        self._spawn("slurmctld", [self._sbin("slurmctld"), *conf, "-i"], env=daemon_env)
        stepd = ["-d", self._sbin("slurmstepd")]
        self._spawn("slurmd", [self._sbin("slurmd"), *conf, "-N", self.host, *stepd], env=daemon_env)
        env = {**os.environ, **self.env()}

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
        """Stops every daemon this object started, by PID (slurmd first)."""
        pids = self.pids or json.loads((self.root / "pids.json").read_text())
        self._cancel_jobs(timeout)  # slurmstepd outlives slurmd: end the jobs first
        for name in ("slurmd", "slurmctld"):
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
