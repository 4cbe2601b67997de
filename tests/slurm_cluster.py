"""A real one-node SLURM cluster on localhost, for tests: munged, slurmctld and slurmd.

Everything lives in one temporary directory: the munge key and socket, slurm.conf, state,
spool and logs, on free ports, so it does not touch /etc/slurm or a system cluster. Needs
root (slurmd launches jobs) and Debian's slurm-wlm and munge. Without systemd there are no
cgroups, so process tracking is proctrack/linuxproc and there is no task plugin.

    with SlurmCluster(tmp) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)   # SLURM_CONF points at our conf

Run by hand: python tests/slurm_cluster.py DIR   (starts it, prints the env, waits for Ctrl-C)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def why_not_available() -> str | None:
    """None when a cluster can be started here, else the reason."""
    missing = [d for d in DAEMONS if shutil.which(d) is None
               and not Path("/usr/sbin", d).exists()]
    if missing:
        return (f"no SLURM: {', '.join(missing)} not installed (apt-get install slurm-wlm "
                "munge; ./dev.sh test does it as root)")
    if os.geteuid() != 0:
        return "not root: slurmd must run as root to launch jobs"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "plugstack.conf").write_text("")
        self.conf.write_text(f"""\
ClusterName=gbtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MaxArraySize=10001
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, *cmd: str, log: str) -> None:
        with open(self.root / "log" / log, "ab") as out:  # the process keeps its own copy
            self.procs.append(subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))

    def start(self, timeout: float = 60) -> Self:
        self._write_conf()
        m = self.root / "munge"
        key = m / "munge.key"
        subprocess.run([_exe("mungekey"), "--create", "--force", f"--keyfile={key}"],
                       check=True, capture_output=True)
        key.chmod(0o400)
        m.chmod(0o700)
        self._start(_exe("munged"), "--foreground", "--force", f"--socket={m}/munge.socket",
                    f"--key-file={key}", f"--pid-file={m}/munged.pid",
                    f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
                    log="munged.out")
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged")
        self._start(_exe("slurmctld"), "-D", "-i", "-f", str(self.conf), log="slurmctld.out")
        self._start(_exe("slurmd"), "-D", "-f", str(self.conf), "-N", self.host,
                    log="slurmd.out")
        self._wait(self._node_idle, timeout, "the node to become idle")
        return self

    def _node_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see "
                                   f"{self.root / 'log'}:\n{self.logs()}")
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                           capture_output=True, text=True, check=False)  # read below
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 20) -> str:
        text = []
        for p in sorted((self.root / "log").glob("*")):
            lines = p.read_text(errors="replace").splitlines()[-tail:]
            text.append(f"== {p.name}\n" + "\n".join(lines))
        return "\n".join(text)

    def wait_idle(self, timeout: float = 600) -> None:
        """Until no job is pending or running."""
        def empty() -> bool:
            r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env,
                               capture_output=True, text=True, check=False)  # read below
            return r.returncode == 0 and not r.stdout.strip()
        self._wait(empty, timeout, "the queue to drain")

    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs[1:]):
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True,
                           timeout=30, check=False)  # the waits below see whether it stopped
        for p in reversed(self.procs):
            if p is self.procs[0]:  # munged does not stop with the cluster
                p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    with SlurmCluster(Path(sys.argv[1])) as c:
        print(f"export SLURM_CONF={c.conf}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
