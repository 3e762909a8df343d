"""The sbatch templates on a real SLURM cluster (two fake nodes on this machine).

The cluster (tests/support/slurm_cluster.py) is started once per session; every test is skipped
with the reason when it cannot start (no slurm-wlm/munge: run scripts/install_slurm.sh;
not root). Jobs are submitted through the REAL templates (slurm/sap_multinode.sbatch +
slurm/common.sh), 2 nodes x 1 rank, on CPU (SAP_DS_CPU=1), with MASTER_ADDR=127.0.0.1
because the fake node names do not resolve.

The real trainer (sap_ds/train.py with configs/tiny.yaml) runs a 2-node job to the end,
and a second job is preempted (USR1 to the batch shell), checkpoints, requeues, resumes
and must end at the same step with the same loss. A template copied out on its own runs
from a pip-installed package (no checkout, the working folder elsewhere, the environment
set up by SAP_DS_SETUP), and resubmitted once it has finished does nothing; a job refuses
an OUTPUT_DIR that another running job holds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import ClusterUnavailable, SlurmCluster

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "sap_multinode.sbatch"
TRAINER = REPO / "sap_ds" / "train.py"
TINY = REPO / "configs" / "tiny.yaml"

@pytest.fixture(scope="session")
def cluster():
    c = SlurmCluster(nodes=2)
    try:
        c.start()
    except ClusterUnavailable as exc:
        print(f"\nSLURM cluster unavailable: {exc}", file=sys.stderr)
        pytest.skip(f"cannot start a local SLURM cluster: {exc}")
    try:
        yield c
    finally:
        c.stop()


def _submit(cluster: SlurmCluster, tmp: Path, name: str, extra_args: str, template: Path = TEMPLATE,
            nodes: int = 2, **env) -> tuple[int, Path]:
    run = tmp / name
    run.mkdir(parents=True, exist_ok=True)
    job_env = {
        "SAP_DS_CPU": "1",
        "SAP_DS_ROOT": str(REPO),
        "LOG_ROOT": str(tmp / "logs"),
        "PYTHON": sys.executable,
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
        "EXTRA_ARGS": extra_args,
        **env,
    }
    # Part of the environment goes through --export=ALL,K=V (the documented way), the rest
    # through sbatch's own environment, which --export=ALL propagates as well.
    export = {"MASTER_ADDR": "127.0.0.1", "GPUS_PER_NODE": "1", "OUTPUT_DIR": str(run / "out"),
              "CONFIG": str(TINY)}
    # --time well above the templates' `--signal=B:USR1@900`: with a shorter limit Slurm
    # sends the warning right at the start (and again after every requeue).
    job = cluster.sbatch(template, f"--nodes={nodes}", "--time=60", f"--job-name={name}",
                         f"--output={run}/slurm-%j.out", cwd=REPO, export=export, env=job_env)
    return job, run / "out"


def _diagnostics(cluster: SlurmCluster, tmp: Path, run_dir: Path) -> str:
    parts = [cluster.logs()]
    for f in sorted(list(tmp.rglob("*.log")) + list(tmp.rglob("slurm-*.out"))):
        parts.append(f"==> {f} <==\n{f.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def _run_to_completion(cluster, tmp, name, extra_args, timeout=240.0):
    job, out = _submit(cluster, tmp, name, extra_args)
    info = cluster.wait(job, timeout)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"{info.get('JobState')} {info.get('ExitCode')}\n{_diagnostics(cluster, tmp, out)}"
    return job, out, info


def _check_completed_run(tmp: Path, name: str, job: int, out: Path, steps: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == steps
    assert (out / "checkpoints" / "latest").exists(), "no checkpoint written"
    assert not (out / "REQUEUE").exists() and not (out / "STOP").exists()
    log_dir = tmp / "logs" / f"{name}-{job}"
    assert (log_dir / "batch.log").exists(), f"no per-job log folder {log_dir}"
    # one log per node (node<index>-<host>-restart<n>.log; both fake nodes share the host name)
    node_logs = sorted(p.name.split("-")[0] + "-" + p.name.rsplit("-", 1)[1] for p in log_dir.glob("node*.log"))
    assert node_logs == ["node0-restart0.log", "node1-restart0.log"], node_logs
    return summary


def _preempt_and_compare(cluster, tmp, name, extra_args, reference: dict, timeout=300.0):
    job, out = _submit(cluster, tmp, name, extra_args)
    latest = out / "checkpoints" / "latest"
    # wait for the first checkpoint, then send the time-limit warning the way Slurm does
    # with `--signal=B:USR1@...`: to the batch shell only
    cluster.wait(job, timeout, poll=0.2, until=lambda info: latest.exists() or info.get("JobState") in cluster.FINAL)
    assert latest.exists(), f"no checkpoint before the job ended\n{_diagnostics(cluster, tmp, out)}"
    assert not (out / "summary.json").exists(), "run finished before it could be preempted: raise max_steps"
    res = cluster.scancel("--batch", "--signal=USR1", str(job))
    assert res.returncode == 0, res.stderr
    # Slurm holds a requeued batch job for ~2 minutes (BeginTime = requeue + 120 s); release
    # it earlier to keep the test short. Not at once: the nodes must first finish tearing
    # down the old instance, or the restart dies with "Job credential revoked" (that is
    # what the hold is for). Production jobs just wait.
    states, released, pending_since = [], False, None

    def requeued_and_done(i: dict) -> bool:
        nonlocal released, pending_since
        state, restarts = i.get("JobState"), int(i.get("Restarts", 0) or 0)
        if not states or states[-1] != (state, restarts, i.get("Reason")):
            states.append((state, restarts, i.get("Reason")))
        if restarts >= 1 and state == "PENDING" and not released:
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 8:
                released = cluster._run(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0
        return state in cluster.FINAL and (restarts >= 1 or state != "COMPLETED")

    info = cluster.wait(job, timeout, poll=0.2, until=requeued_and_done)
    diag = lambda: _diagnostics(cluster, tmp, out)  # noqa: E731
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{states}\n{info}\n{diag()}"
    assert int(info.get("Restarts", 0)) == 1, f"job was not requeued exactly once: {states}\n{info}\n{diag()}"
    batch_log = (tmp / "logs" / f"{name}-{job}" / "batch.log").read_text()
    assert "got SIGUSR1" in batch_log and "scontrol requeue" in batch_log, batch_log
    assert "restart 1" in batch_log, batch_log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == reference["final_step"]
    assert summary["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-5, abs=1e-7)
    assert not (out / "REQUEUE").exists() and not (out / "STOP").exists()
    log_dir = tmp / "logs" / f"{name}-{job}"
    assert list(log_dir.glob("node0-*-restart1.log")), sorted(p.name for p in log_dir.iterdir())
    return summary


# --------------------------------------------------------------------------- the real trainer

needs_trainer = pytest.mark.skipif(not (TRAINER.exists() and TINY.exists()),
                                   reason="sap_ds/train.py or configs/tiny.yaml does not exist yet")
REAL_STEPS = 12
REAL_ARGS = f"train.max_steps={REAL_STEPS} train.save_every=2 train.log_every=1"


@pytest.fixture(scope="session")
def real_reference(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_real_ref")
    job, out, _ = _run_to_completion(cluster, tmp, "tiny-ref", REAL_ARGS, timeout=300)
    return tmp, job, out


@needs_trainer
def test_multinode_template_real_trainer(real_reference):
    tmp, job, out = real_reference
    summary = _check_completed_run(tmp, "tiny-ref", job, out, REAL_STEPS)
    for key in ("final_step", "final_train_loss", "final_eval_loss", "tokens_per_s", "export_dir"):
        assert key in summary, f"summary.json lacks {key}: {summary}"
    batch_log = (tmp / "logs" / f"tiny-ref-{job}" / "batch.log").read_text()  # one rank per fake node, via 127.0.0.1
    assert "MASTER_ADDR=127.0.0.1" in batch_log and f"MASTER_PORT={20000 + job % 20000}" in batch_log


@needs_trainer
def test_multinode_preemption_requeue_real_trainer(cluster, real_reference, tmp_path):
    _, _, ref_out = real_reference
    reference = json.loads((ref_out / "summary.json").read_text())
    _preempt_and_compare(cluster, tmp_path, "tiny-preempt", REAL_ARGS, reference, timeout=400)


# --------------------------------------------------------------------------- a pip install, no checkout

# What setup.py builds the package from (a clone has these; caches and build folders left out).
PACKAGE_SOURCES = ("setup.py", "MANIFEST.in", "README.md", "sap_ds", "kernels", "configs", "ds_configs", "data", "slurm")


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory) -> Path:
    """sap-ds as pip installs it (a wheel of a copy of this checkout, unpacked into a folder
    of its own; no dependencies: this venv has them), outside the repository."""
    tmp = tmp_path_factory.mktemp("installed")
    source, site = tmp / "source", tmp / "site"
    source.mkdir()
    for name in PACKAGE_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "shipped", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (site / "sap_ds" / "shipped" / "slurm" / "common.sh").is_file(), "the templates' common.sh is not installed"
    return site


def _snapshot(root: Path) -> dict:
    """Every file of a run folder with its size and mtime, but the job claim and the console
    log, which each job start writes."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (".slurm_job", "train.log")}


@needs_trainer
def test_a_copied_template_runs_from_a_pip_install_and_a_finished_job_is_not_retrained(
        cluster, installed_package, tmp_path, tiny_model_path):
    """A user with sap-ds pip-installed copies sap_single_node.sbatch alone into a folder of
    their own and submits it from there with the default OUTPUT_DIR: SAP_DS_SETUP (a script,
    standing in for `module load` and activating the environment) runs first, so the
    template finds common.sh inside the installed package and the trainer runs as `python -m
    sap_ds.train` from it. The same submission again finds the run finished (the default
    OUTPUT_DIR holds no job id) and changes nothing."""
    work = tmp_path / "work"
    work.mkdir()
    template = work / "my_job.sbatch"
    shutil.copy2(REPO / "slurm" / "sap_single_node.sbatch", template)
    setup = work / "site_env.sh"
    setup.write_text(f"export PYTHONPATH={installed_package}\n")
    env = {"SAP_DS_CPU": "1", "SAP_DS_SETUP": str(setup), "SAP_DS_ROOT": "", "PYTHON": sys.executable,
           "LOG_ROOT": str(tmp_path / "logs"), "EXTRA_ARGS": "train.max_steps=2 train.eval_every=0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    export = {"MASTER_ADDR": "127.0.0.1", "GPUS_PER_NODE": "1", "CONFIG": "tiny", "MODEL_PATH": str(tiny_model_path)}
    out = work / "runs" / "pip-user-tiny"

    def submit() -> tuple[int, str, str]:
        job = cluster.sbatch(template, "--job-name=pip-user", cwd=work, export=export, env=env)
        info = cluster.wait(job, 300)
        log_dir = tmp_path / "logs" / f"pip-user-{job}"
        logs = {p.name: p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log"))} if log_dir.is_dir() else {}
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
            f"{info.get('JobState')} {info.get('ExitCode')}\n{logs}\n{_diagnostics(cluster, work, out)}"
        nodes = "".join(text for name, text in logs.items() if name.startswith("node"))
        return job, logs["batch.log"], nodes

    _, batch, _ = submit()
    assert json.loads((out / "summary.json").read_text())["final_step"] == 2
    assert f"sap_ds from {installed_package / 'sap_ds'}" in batch, batch
    assert f"common.sh {installed_package / 'sap_ds' / 'shipped' / 'slurm' / 'common.sh'}" in batch, batch
    assert f"working folder {work}" in batch and "-m sap_ds.train --config tiny" in batch, batch
    before = _snapshot(out)

    job, batch, nodes = submit()
    assert f"{out.relative_to(work)} holds this run, finished at step 2" in nodes, nodes
    assert _snapshot(out) == before, "a resubmitted finished job changed its run folder"
    assert (out / ".slurm_job").read_text().strip() == str(job)


def test_a_job_refuses_an_output_dir_that_a_running_job_holds(cluster, tmp_path):
    """Without a job id in the default OUTPUT_DIR, two submissions of one job would train into
    one folder: the second refuses it while the first runs (here a stand-in holding the
    folder), before anything is written. Submitted as the README says, from the checkout's
    root with the repository's template (common.sh from the submit folder)."""
    holder = cluster._run(["sbatch", "--parsable", "--nodes=1", "--ntasks=1", f"--output={tmp_path}/holder.out",
                           "--wrap=sleep 600"], cwd=str(tmp_path))
    assert holder.returncode == 0, holder.stderr
    holder_id = int(holder.stdout.strip().split(";")[0])
    try:
        assert cluster.wait(holder_id, 60, until=lambda i: i.get("JobState") == "RUNNING").get("JobState") == "RUNNING"
        out = tmp_path / "held" / "out"
        out.mkdir(parents=True)
        (out / ".slurm_job").write_text(f"{holder_id}\n")
        job, out = _submit(cluster, tmp_path, "held", "train.max_steps=2", template=REPO / "slurm" / "sap_single_node.sbatch",
                           nodes=1, SAP_DS_ROOT="")
        info = cluster.wait(job, 120)
        batch = (tmp_path / "logs" / f"held-{job}" / "batch.log").read_text()
        assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "1:0", f"{info}\n{batch}"
        assert f"OUTPUT_DIR={out} is in use by job {holder_id} (RUNNING)" in batch, batch
        assert f"common.sh {REPO / 'slurm' / 'common.sh'}" in batch, batch
        assert sorted(p.name for p in out.iterdir()) == [".slurm_job"] and (out / ".slurm_job").read_text().strip() == str(holder_id)
    finally:
        cluster.scancel(str(holder_id))


# --------------------------------------------------------------------------- static checks (no cluster)


def test_templates_parse_and_declare_requeue():
    import subprocess
    for path in sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh"]:
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, f"{path}: {res.stderr}"
    for name in ("sap_single_node", "sap_multinode", "sft_baseline"):
        text = (REPO / "slurm" / f"{name}.sbatch").read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text, name
        for var in ("CONFIG", "MODEL_PATH", "OUTPUT_DIR", "GPUS_PER_NODE", "EXTRA_ARGS"):
            assert f'{var}="${{{var}:-' in text, f"{name}: {var} is not overridable"
    assert 'BENCH_CMD="${BENCH_CMD:-' in (REPO / "slurm" / "bench.sbatch").read_text()


def test_every_template_sets_up_the_environment_before_it_finds_common_sh(tmp_path):
    """One preamble in every template (SAP_DS_SETUP, venv/conda, then common.sh from the
    checkout or the installed package; the cluster test above runs it), the trainer as a
    module, not as a checkout's file; `sap-ds configs slurm` writes the shipped folder out
    as it is, and does not overwrite a copy without --force."""
    from sap_ds.configs_cli import copy_slurm_templates
    from sap_ds.errors import ConfigError

    start, end = "# ---- environment, first", 'source "$SAPDS_COMMON"\n'
    blocks = {}
    for path in sorted((REPO / "slurm").glob("*.sbatch")):
        text = path.read_text()
        assert start in text and end in text, path.name
        blocks[path.name] = text[text.index(start):text.index(end)]
        assert text.index(start) < text.index("sapds_setup\n"), path.name
    assert len(blocks) == 5 and len(set(blocks.values())) == 1, "the templates' preambles differ"
    common = (REPO / "slurm" / "common.sh").read_text()
    assert "set -- -m sap_ds.train" in common and "sap_ds/train.py}" not in common

    target = copy_slurm_templates(tmp_path)
    shipped = sorted(p.name for p in (REPO / "slurm").iterdir() if p.suffix in (".sbatch", ".sh", ".md"))
    assert sorted(p.name for p in target.iterdir()) == shipped
    assert all((target / name).read_bytes() == (REPO / "slurm" / name).read_bytes() for name in shipped)
    with pytest.raises(ConfigError, match="exist; give another destination or --force"):
        copy_slurm_templates(tmp_path)
    copy_slurm_templates(tmp_path, force=True)


def test_baseline_template_takes_any_method():
    """sft_baseline.sbatch puts method=sft before EXTRA_ARGS, so EXTRA_ARGS=method=safety_mix
    (or lisa) runs that baseline from the same template (a later override wins), and every
    70B config is a valid safety_mix run (it has data.safety)."""
    from sap_ds.config.run import load_config

    assert 'EXTRA_ARGS="method=sft $EXTRA_ARGS"' in (REPO / "slurm" / "sft_baseline.sbatch").read_text()
    for path in sorted((REPO / "configs" / "70b").glob("*.yaml")):
        assert load_config(path, ["method=sft", "method=safety_mix"]).method == "safety_mix", path.name


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "70b").glob("*.yaml")), ids=lambda p: p.name)
def test_70b_configs_take_every_method(path):
    """The templates pass EXTRA_ARGS through: "method=<m>" must give a valid run of every
    method from each shipped 70B config (its data.safety serves SAP, Lisa and the mixes)."""
    import typing

    from sap_ds.config.run import MethodName, load_config
    for method in typing.get_args(MethodName):
        assert load_config(path, [f"method={method}"]).method == method


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "70b").glob("*.yaml")), ids=lambda p: p.name)
def test_70b_configs_validate(path):
    from sap_ds.config.run import load_config
    cfg = load_config(path)
    assert cfg.method == "sap" and cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert (REPO / cfg.deepspeed_config).exists(), cfg.deepspeed_config
    assert cfg.train.save_every > 0  # preemption-safe
    for src in [*cfg.data.train, *cfg.data.eval, *cfg.data.safety, cfg.data.harmful]:
        assert (REPO / src.path).exists(), src.path
    assert cfg.lora.enabled == path.name.endswith("_lora.yaml")


def test_70b_ds_configs_prefetch_a_whole_layer_and_nccl_proto_is_not_forced():
    """Issue 17: the 70B DeepSpeed files prefetch one Llama-70B decoder layer ahead (5e8 was
    below one layer), and common.sh leaves NCCL's protocol choice alone but keeps Triton's
    cache on node-local disk."""
    h, inter, kv_dim = 8192, 28672, 8 * 128
    layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h
    for name in ("zero3_bf16.json", "zero3_offload.json"):
        zero = json.loads((REPO / "ds_configs" / name).read_text())["zero_optimization"]
        assert zero["stage3_prefetch_bucket_size"] >= layer, name
        assert zero["stage3_max_live_parameters"] >= 2 * layer, name
    common = (REPO / "slurm" / "common.sh").read_text()
    assert ":=simple" not in common and 'NCCL_PROTO:=' not in common
    assert 'export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-' in common
