"""A real, throw-away SLURM cluster on this machine, for the template tests.

Debian's ``slurm-wlm`` (22.05) + ``munge``: one ``munged`` on a private socket, one
``slurmctld`` and two ``slurmd`` that pretend to be nodes ``n1`` and ``n2`` on 127.0.0.1
(multiple-slurmd support), all started in the foreground from a temporary folder with
their own ports and spool/state/log paths, so nothing in /etc/slurm or systemd is used
and several test sessions can run side by side. ``SLURM_CONF`` points every client
command (sbatch, scontrol, scancel, squeue) at the generated slurm.conf.

``SlurmCluster.start()`` raises ``ClusterUnavailable`` with the reason when it cannot
start (binaries missing, not root, a daemon dies); the pytest fixture turns that into a
skip. ``stop()`` kills exactly the processes it started (by pid) and removes the folder.
"""
from __future__ import annotations

import grp
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class ClusterUnavailable(RuntimeError):
    pass


def _which(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports, consecutive when possible (slurm.conf wants Port=[a-b])."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ClusterUnavailable("no block of free TCP ports found")


class SlurmCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: Optional[int] = None):
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node or max(1, os.cpu_count() or 1)
        self.root: Optional[Path] = None
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        for b in ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue"):
            if not _which(b):
                raise ClusterUnavailable(f"'{b}' not found: run scripts/install_slurm.sh (Debian slurm-wlm + munge)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("needs root: slurmd must run jobs and munged must run as the munge user")
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sapds-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must traverse it
        ports = _free_ports(len(self.nodes) + 1)
        ctld_port, node_ports = ports[0], ports[1:]

        # munge: a private daemon on a private socket, as the munge user (the key is munge:munge 0400)
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o755)
        try:
            uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        except KeyError:
            raise ClusterUnavailable("no 'munge' user: the munge package is not installed properly") from None
        os.chown(mdir, uid, gid)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            raise ClusterUnavailable("/etc/munge/munge.key missing: run scripts/install_slurm.sh")
        self.munge_socket = mdir / "munge.socket"
        munged = [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                  f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                  f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"]

        def as_munge():
            os.setgid(gid)
            os.setgroups([gid])
            os.setuid(uid)

        self._spawn("munged", munged, preexec_fn=as_munge)
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket", mdir / "munged.log")

        # slurm.conf
        user = pwd.getpwuid(os.geteuid()).pw_name
        for d in ("state", "spool", "log", "jobs", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir()
        conf = self.root / "slurm.conf"
        last = node_ports[-1]
        conf.write_text(f"""\
ClusterName=sapds
# random first job id: the templates derive MASTER_PORT from it, so concurrent test
# sessions (each with its own cluster) do not pick the same rendezvous port
FirstJobId={random.randint(1000, 19000)}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
JobRequeue=1
KillWait=10
MinJobAge=600
MessageTimeout=20
InactiveLimit=0
NodeName={self._nodelist()} NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_ports[0]}-{last}] CPUs={self.cpus} RealMemory=2000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes={self._nodelist()} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # 8 fake GPUs per node so the templates' `#SBATCH --gpus-per-node=8` is accepted as-is.
        # slurmd drops file-less GPUs and wants character devices: clones of /dev/null (1,3).
        dev = self.root / "dev"
        dev.mkdir()
        try:
            for i in range(8):
                os.mknod(dev / f"fakegpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as exc:
            raise ClusterUnavailable(f"cannot create fake GPU device nodes (mknod: {exc})") from None
        (self.root / "gres.conf").write_text(f"NodeName={self._nodelist()} Name=gpu Count=8 File={dev}/fakegpu[0-7]\n")
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        for var in list(self.env):
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and var != "SLURM_CONF":
                del self.env[var]

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        self._wait_for(lambda: self._run(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld",
                       self.root / "log" / "slurmctld.log")
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n])

        def nodes_idle() -> bool:
            out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout
            states = dict(line.split()[:2] for line in out.splitlines() if line.strip())
            return all(states.get(n, "").startswith(("idle", "mix", "alloc")) for n in self.nodes)

        self._wait_for(nodes_idle, timeout, "slurmd nodes idle", self.root / "log" / f"slurmd-{self.nodes[0]}.log")

    def stop(self) -> None:
        """Kill the daemons this object started (by pid), then remove the folder."""
        if self.env.get("SLURM_CONF") and any(p.poll() is None for name, p in self.procs if name == "slurmctld"):
            subprocess.run(["scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name],
                           env=self.env, capture_output=True, timeout=20)
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []
        if self.root and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _nodelist(self) -> str:
        return f"n[1-{len(self.nodes)}]" if len(self.nodes) > 1 else self.nodes[0]

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb") if (self.root / "log").exists() else subprocess.DEVNULL
        env = self.env or dict(os.environ)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, **kw)
        self.procs.append((name, proc))

    def _wait_for(self, cond, timeout: float, what: str, log: Path) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                             f"{self._tail(log)}{self._tail(self.root / 'log' / (name + '.stdout'))}")
            try:
                if cond():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}:\n{self._tail(log)}")

    @staticmethod
    def _tail(path: Path, n: int = 15) -> str:
        try:
            return "".join(path.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    def _run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=kw.pop("timeout", 30), **kw)

    # ------------------------------------------------------------------ job API

    def sbatch(self, script: str | Path, *args: str, cwd: str | Path, export: dict[str, str] | None = None,
               env: dict[str, str] | None = None) -> int:
        """Submit; returns the job id. ``export`` becomes ``--export=ALL,K=V,...`` (no commas in
        values); ``env`` is added to sbatch's own environment, which --export=ALL propagates."""
        cmd = ["sbatch", "--parsable", "--export=ALL"]
        if export:
            bad = [k for k, v in export.items() if "," in str(v)]
            if bad:
                raise ValueError(f"--export values cannot contain commas: {bad}")
            cmd[-1] = "--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items())
        cmd += [*args, str(script)]
        out = self._run(cmd, cwd=str(cwd), env={**self.env, **(env or {})})
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)])
        if out.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", out.stdout))

    FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}

    def wait(self, job_id: int, timeout: float, poll: float = 0.5, until=None) -> dict[str, str]:
        """Poll ``scontrol show job`` until the job is in a final state, or, when given, until
        ``until(info)`` holds (then final states are up to ``until``: a requeued job passes
        through states that look final)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_info(job_id)
            if until is not None:
                if until(info):
                    return info
            elif info.get("JobState") in self.FINAL:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {info.get('JobState')} "
                           f"{info.get('Reason')}\n{self._tail(self.root / 'log' / 'slurmctld.log')}")

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return self._run(["scancel", *args])

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"==> {f.name} <==\n{self._tail(f, 20)}")
        return "\n".join(parts)
