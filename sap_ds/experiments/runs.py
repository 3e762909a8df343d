"""Launching training and evaluation runs, what ``sap-ds compare`` and ``sap-ds sweep`` share.

Training runs go through the DeepSpeed launcher (``deepspeed --num_gpus N
sap_ds/train.py``) exactly as a user would start them, each in its own folder, its output
in ``launch.log`` there. A ``RunSet`` reads the start model, seeds and eval config once,
validates every run's config before anything launches, reuses a finished run only when it
was trained with the config asked for (``StaleRun`` otherwise) and an ``eval.json`` made
from the same model and eval config. ``parallel: N`` runs N at once, longest first
(``run_side_by_side``).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sap_ds/: the entry scripts (train.py, eval.py) are launched from there


class RunError(RuntimeError):
    """A training or evaluation subprocess failed (the message says which and where its log
    is), or runs that cannot be launched as configured."""


class RunStopped(RunError):
    """A training run stopped on request before its last step (exit code 75, as a preempted
    job does): its checkpoint is on disk and the next call resumes it. Neither a crash nor
    a result."""


def ended_early(tag: str, exc: RunError) -> int:
    """The exit code of a command (compare, sweep, attack) whose runs ended early, with its
    line on stderr: a RunStopped (a stop request; the next call resumes) is "<tag>: stopped:"
    and 75, as `sap-ds train` exits; any other RunError is "<tag>: error:" and 1."""
    from sap_ds.errors import EXIT_STOPPED_RESUMABLE

    stopped = isinstance(exc, RunStopped)
    print(f"{tag}: {'stopped' if stopped else 'error'}: {exc}", file=sys.stderr, flush=True)
    return EXIT_STOPPED_RESUMABLE if stopped else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: str, nproc: int) -> list[str]:
    """``deepspeed --num_gpus N script`` (the launcher next to this Python), or plain
    ``python script`` for one rank."""
    if nproc == 1:
        return [sys.executable, str(PACKAGE_DIR / script)]
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(PACKAGE_DIR / script)]


_CONSOLE = threading.Lock()  # runs side by side (``parallel``) print from threads: whole lines only


def say(line: str) -> None:
    with _CONSOLE:
        print(line, flush=True)


def run_logged(cmd: list[str], log_path: Path, what: str, tag: str = "sap-ds", echo: bool = True) -> None:
    """Run ``cmd``, its output both on the console and in ``log_path`` (only in the log with
    ``echo=False``: runs side by side would interleave their progress bars); raise on failure."""
    from sap_ds.parallel.distributed import cpu_process_env, on_cpu

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if on_cpu():
        env = cpu_process_env(env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"{tag}: {what}: {' '.join(cmd)}" + ("" if echo else f" (output in {log_path})"))
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    if not echo:
        say(f"{tag}: {what}: finished in {time.perf_counter() - start:.0f} s (exit code {code})")
    from sap_ds.errors import EXIT_STOPPED_RESUMABLE

    if code == EXIT_STOPPED_RESUMABLE:
        raise RunStopped(f"{what} stopped on request before its last step (exit code {code}); its checkpoint is "
                         f"on disk and running the same command again resumes it; its output is in {log_path}")
    if code != 0:
        raise RunError(f"{what} failed with exit code {code}; its output is in {log_path}")


def config_drift(cfg, run_dir: Path) -> list[str]:
    """How the config a finished run in ``run_dir`` was trained with differs from ``cfg``
    (the RunConfig its plan gives now), one ``key: old → new`` line each.

    Runs are reused by their folder, so an edit of the train config or of a point's
    overrides after a run finished would otherwise mix two settings under one name; a run
    resumed under a changed config (the trainer keeps the earlier one as
    ``config.before_step{N}.json``) was trained under two and is reported too."""
    from sap_ds.config.run import config_changes

    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return []
    earlier = [f"steps before {path.stem.removeprefix('config.before_step')} were trained under another config ({path.name})"
               for path in sorted(run_dir.glob("config.before_step*.json"))]
    return earlier + config_changes(json.loads(saved_path.read_text(encoding="utf-8")), cfg)


class StaleRun(RunError):
    """A finished run folder whose saved config is not what its plan asks for now."""


class RunSet:
    """What a comparison and a sweep share: the start model, seeds and eval config read
    once; runs whose configs are validated before anything launches; training that reuses
    a finished run only when it was trained with the config asked for."""

    tag = "sap-ds"  # the command the console lines name

    def __init__(self, cfg):
        from sap_ds.config.run import ModelConfig, load_config
        from sap_ds.evaluation.config import load_eval_config
        from sap_ds.evaluation.judges import check_judges
        from sap_ds.model.loading import resolve_model_path
        from sap_ds.parallel.distributed import on_cpu

        if cfg.parallel > 1 and not on_cpu():
            raise RunError(f"parallel: {cfg.parallel}: every launch takes GPUs 0..nproc-1, so runs side by side "
                           "would share the same GPUs; keep parallel: 1 on a GPU machine (nproc: the GPUs per run)")
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        base = load_config(cfg.train_config, cfg.overrides)
        self.start_model = cfg.start_model or base.model.path
        # ModelError now if it is missing, naming the key that gave it
        resolve_model_path(ModelConfig(path=self.start_model), "start_model" if cfg.start_model else
                           f"model.path of {cfg.train_config}")
        self.seeds = cfg.seeds or [base.seed]
        self.eval_cfg = load_eval_config(cfg.eval_config, cfg.eval_overrides)
        check_judges(self.eval_cfg.scorer)  # a judge that cannot judge fails before the first training run
        self.runs: list[dict] = []

    def add_run(self, run_dir: Path, run_name: str, seed: int, overrides: list[str], start_model: Optional[str] = None,
                train_config: Optional[str] = None, **labels) -> dict:
        """Validate one run's config now (a bad combination fails before the first launch,
        not after an hour) and append it to ``self.runs``. ``start_model``: the model this run
        starts from when it is not the set's (an alignment stage's export, which need not
        exist yet: the stage trains first); ``${start_model}`` in an override becomes that
        model (SafeLoRA's ``export.safelora.aligned_model=${start_model}``). ``train_config``: this
        run's base config when it is not the set's (an alignment stage's own config)."""
        from sap_ds.config.run import load_config
        from sap_ds.experiments.stage_config import START_MODEL_TOKEN

        start_model = start_model or self.start_model
        overrides = [o.replace(START_MODEL_TOKEN, start_model) for o in [*self.cfg.overrides, *overrides]]
        overrides = [*overrides, f"seed={seed}", f"model.path={start_model}", f"output_dir={run_dir}", f"run_name={run_name}"]
        train_config = train_config or self.cfg.train_config
        run = {**labels, "seed": seed, "run_dir": run_dir, "overrides": overrides, "train_config": train_config,
               "config": load_config(train_config, overrides)}
        self.runs.append(run)
        return run

    def train(self, run: dict, what: str, echo: bool = True) -> Optional[dict]:
        """The run's ``summary.json``, training it through the launcher first unless it has
        one; None when training stopped before its last step (a stop request: the
        checkpoint is on disk and the next call resumes it). StaleRun when the finished run
        was trained with another config: reusing it would report one setting under
        another's name."""
        run_dir = run["run_dir"]
        summary = run_dir / "summary.json"
        if summary.is_file():
            drift = config_drift(run["config"], run_dir)
            if drift:
                raise StaleRun(f"{run_dir} was trained with another config, not reused:\n  " + "\n  ".join(drift)
                               + "\nMove the folder away to retrain it, or restore the settings it was trained with.")
        else:
            cmd = launch_command("train.py", self.cfg.nproc) + ["--config", run["train_config"], *run["overrides"]]
            try:
                run_logged(cmd, run_dir / "launch.log", what, self.tag, echo)
            except RunStopped:
                return None
        if not summary.is_file():
            return None
        return json.loads(summary.read_text(encoding="utf-8"))

    def exported_model(self, run: dict) -> str:
        """The finished run's exported model; with ``keep_checkpoints: false`` its ZeRO
        checkpoints are deleted here, once the export that replaces them is on disk."""
        model = run["run_dir"] / "export" / "model"
        checkpoints = run["run_dir"] / "checkpoints"
        if not self.cfg.keep_checkpoints and checkpoints.is_dir() and model.is_dir():
            shutil.rmtree(checkpoints)
        return str(model)

    def evaluate(self, model: str, out: Path, in_process: bool = True) -> dict:
        return evaluate_model(model, out, self.cfg.eval_config, self.eval_cfg, self.cfg.eval_overrides,
                              self.cfg.eval_nproc or self.cfg.nproc, self.tag, in_process)


def reusable_evaluation(out: Path, model: str, eval_cfg) -> Optional[dict]:
    """``out/eval.json`` when it was made from ``model`` with ``eval_cfg`` (it is reused, not
    recomputed), else None. The one test every reuse of an evaluation goes by."""
    from sap_ds.evaluation.config import to_dict

    done = Path(out) / "eval.json"
    if done.is_file():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if previous.get("model") == model and previous.get("config") == to_dict(eval_cfg):
            return previous
    return None


def evaluate_model(model: str, out: Path, config_path: str, eval_cfg, eval_overrides: list[str], nproc: int,
                   tag: str = "sap-ds", in_process: bool = True) -> dict:
    """Evaluate ``model`` into ``out/eval.json`` and return its metrics; an ``eval.json``
    made from the same model and eval config is reused. One rank runs in this process (no
    second start-up of torch and transformers per model) unless ``in_process`` is False
    (evaluations beside other runs: each its own process, its output in its log), more
    through the launcher."""
    previous = reusable_evaluation(out, model, eval_cfg)
    if previous is not None:
        return previous["metrics"]
    if nproc == 1 and in_process:
        from sap_ds.evaluation.evaluate import evaluate
        from sap_ds.evaluation.output import write_report

        print(f"{tag}: eval {model} -> {out}", flush=True)
        result = evaluate(model, eval_cfg)
        write_report(result, out)
        return result["metrics"]
    cmd = launch_command("eval.py", nproc) + ["--model", model, "--config", config_path, "--out", str(out), *eval_overrides]
    run_logged(cmd, out / "eval.log", f"eval {model}", tag, echo=in_process)
    return json.loads((out / "eval.json").read_text(encoding="utf-8"))["metrics"]


def launch_order(runs: list[dict]) -> list[int]:
    """Indices of ``runs`` longest first, so that runs side by side end together rather than
    one long run alone at the end: the costliest steps first (``MethodSection.relative_step_cost``:
    SAP's probe and safety passes beside each step's main pass), then by steps x
    micro-batches. A heuristic; the table keeps the configured order."""
    def cost(i: int) -> tuple:
        cfg = runs[i]["config"]
        return (cfg.method_section.relative_step_cost, cfg.train.max_steps * cfg.train.grad_accum)

    return sorted(range(len(runs)), key=cost, reverse=True)


def run_side_by_side(run_set: RunSet, runs: list[dict], work: Callable[[dict], Any], start_out: Path,
                     progress: Optional[Callable[[Optional[Any], dict[int, Any]], None]] = None) -> tuple[Any, dict[int, Any]]:
    """``parallel: N``: ``work(run)`` for every run, N at once, longest first (``launch_order``),
    then the start model's evaluation into ``start_out`` (short: it fills the tail); returns
    the start model's metrics and each run's result by its position in ``runs``.
    ``progress(start, results)`` is called as each run ends (a report rewritten as it goes;
    ``start`` is None until the start model's metrics are in). The first error stops new
    launches, lets the running ones finish (their results stay on disk for the next call)
    and is raised."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results: dict[int, Any] = {}
    pool = ThreadPoolExecutor(max_workers=run_set.cfg.parallel)
    try:
        jobs = {pool.submit(work, runs[i]): i for i in launch_order(runs)}
        start_job = pool.submit(run_set.evaluate, run_set.start_model, start_out, False)
        for job in as_completed([*jobs, start_job]):
            result = job.result()  # the first error is raised here
            if job is not start_job:
                results[jobs[job]] = result
                if progress is not None:
                    progress(start_job.result() if start_job.done() else None, results)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return start_job.result(), results
