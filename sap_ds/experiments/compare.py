"""Entry point: ``sap-ds compare --config COMPARE_YAML [key=value ...]``.

The experiment of the paper in one command: fine-tune the same (aligned) starting model
with each method (SFT, SAP, or any other ``method:``, e.g. the safety_mix baseline) on the
same data, seed and budget, for every attack setting
and seed; evaluate the starting model and every exported model with one eval config;
write ``comparison.json``, ``comparison.md`` and ``comparison.png`` to ``out_dir``.

Training runs go through the DeepSpeed launcher (``deepspeed --num_gpus N
sap_ds/train.py``) exactly as a user would start them, in
``<out_dir>/<setting>/<method>/seed<seed>``. It is resumable: a run folder with a
``summary.json`` is not trained again (an interrupted run resumes from its checkpoint,
the trainer's ``train.resume: auto``; a run stopped on request, exit code 75, ends the
comparison with that code), and an ``eval.json`` made from the same model and
eval config is not recomputed. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, get_args

from pydantic import Field, model_validator

from sap_ds.config.reading import CONFIG_PATH
from sap_ds.config.run import MethodName
from sap_ds.evaluation.config import _Section
from sap_ds.experiments.comparison_report import aggregate, markdown, mean_std, scalar_metrics, write_outputs

METHODS = get_args(MethodName)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sap_ds/: the entry scripts (train.py, eval.py) are launched from there


class CompareConfig(_Section):
    train_config: str = Field(json_schema_extra=CONFIG_PATH, description="Base run config, e.g. configs/demo.yaml.")
    eval_config: str = Field(json_schema_extra=CONFIG_PATH, description="Eval config, e.g. configs/eval/demo.yaml.")
    start_model: Optional[str] = Field(None, description="Model every run starts from (default: the train config's model.path).")
    methods: list[str] = Field(default_factory=lambda: ["sft", "sap"],
                               description="Run config 'method:' values, e.g. [sft, safety_mix, sap], or labels of "
                               "other runs whose method_overrides name their method (sft_lr5e-4: [method=sft, "
                               "train.lr=5.0e-4]), each a row of the table.")
    seeds: Optional[list[int]] = Field(None, description="Default: the train config's seed.")
    settings: dict[str, list[str]] = Field(default_factory=lambda: {"default": []},
                                           description="Attack setting name -> train overrides.")
    nproc: int = Field(2, gt=0, description="Ranks per training run (deepspeed --num_gpus).")
    parallel: int = Field(1, gt=0, description="Training runs at once, each its own launch of nproc ranks, each "
                          "evaluated as soon as it finishes. On CPU, nproc 1 x parallel = cores beats one run of all "
                          "cores (no gloo collectives between ranks; "
                          "measured in docs/results.md). Refused on GPUs, where every launch takes devices 0..nproc-1.")
    eval_nproc: Optional[int] = Field(None, gt=0, description="Ranks per evaluation (default: nproc); 1 runs it in-process.")
    out_dir: str = "runs/compare"
    overrides: list[str] = Field(default_factory=list, description="Train overrides for every run.")
    method_overrides: dict[str, list[str]] = Field(default_factory=dict,
                                                   description="Method (or label) -> train overrides for its runs only.")
    eval_overrides: list[str] = Field(default_factory=list)
    note: Optional[str] = Field(None, description="Printed under the table (comparison.md and stdout): what the "
                                "numbers do and do not show, e.g. that one seed cannot separate two methods.")
    keep_checkpoints: bool = Field(True, description="false: delete a run's ZeRO checkpoints once it has finished "
                                   "and exported (a full training state per run otherwise stays on disk); an "
                                   "interrupted or failed run keeps its own for resuming.")

    @model_validator(mode="after")
    def _non_empty(self) -> "CompareConfig":
        if not self.methods or not self.settings or self.seeds == []:
            raise ValueError("methods, seeds and settings must each have at least one entry")
        unknown = sorted(set(self.method_overrides) - set(self.methods))
        if unknown:
            raise ValueError(f"method_overrides: {unknown} not among methods {self.methods}")
        for label in self.methods:
            if label not in METHODS and run_method(label, self.method_overrides.get(label, [])) is None:
                raise ValueError(f"methods: '{label}' is not a method ({', '.join(METHODS)}); as the label of a "
                                 f"run of its own it needs its method in method_overrides, e.g. {label}: "
                                 "[method=sft, train.lr=5.0e-4]")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods has duplicates: {self.methods}")
        return self


def run_method(label: str, overrides: list[str]) -> Optional[str]:
    """The method a row of the comparison trains with: the label itself when it is a method
    name, else the last valid ``method=`` among its overrides (None if there is none)."""
    named = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "method"]
    named = [m for m in named if m in METHODS]
    return named[-1] if named else (label if label in METHODS else None)


class CompareError(RuntimeError):
    """A training or evaluation subprocess failed; the message says which and where its log is."""


class RunStopped(CompareError):
    """A training run stopped on request before its last step (exit code 75, as a preempted
    job does): its checkpoint is on disk and the next call resumes it. Neither a crash nor
    a result."""


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


def run_logged(cmd: list[str], log_path: Path, what: str, tag: str = "sap-ds compare", echo: bool = True) -> None:
    """Run ``cmd``, its output both on the console and in ``log_path`` (only in the log with
    ``echo=False``: runs side by side would interleave their progress bars); raise on failure."""
    from sap_ds.parallel.distributed import on_cpu

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if on_cpu():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
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
        raise CompareError(f"{what} failed with exit code {code}; its output is in {log_path}")


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


# --------------------------------------------------------------------------- the plan


class StaleRun(CompareError):
    """A finished run folder whose saved config is not what its plan asks for now."""


class RunSet:
    """What a comparison and a sweep share: the start model, seeds and eval config read
    once; runs whose configs are validated before anything launches; training that reuses
    a finished run only when it was trained with the config asked for."""

    tag = "sap-ds compare"

    def __init__(self, cfg):
        from sap_ds.config.run import ModelConfig, load_config
        from sap_ds.evaluation.config import load_eval_config
        from sap_ds.model.loading import resolve_model_path
        from sap_ds.parallel.distributed import on_cpu

        if cfg.parallel > 1 and not on_cpu():
            raise CompareError(f"parallel: {cfg.parallel}: every launch takes GPUs 0..nproc-1, so runs side by side "
                               "would share the same GPUs; keep parallel: 1 on a GPU machine (nproc: the GPUs per run)")
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        base = load_config(cfg.train_config, cfg.overrides)
        self.start_model = cfg.start_model or base.model.path
        resolve_model_path(ModelConfig(path=self.start_model))  # ModelError now if it is missing
        self.seeds = cfg.seeds or [base.seed]
        self.eval_cfg = load_eval_config(cfg.eval_config, cfg.eval_overrides)
        self.runs: list[dict] = []

    def add_run(self, run_dir: Path, run_name: str, seed: int, overrides: list[str], **labels) -> dict:
        """Validate one run's config now (a bad combination fails before the first launch,
        not after an hour) and append it to ``self.runs``."""
        from sap_ds.config.run import load_config

        overrides = [*self.cfg.overrides, *overrides, f"seed={seed}", f"model.path={self.start_model}",
                     f"output_dir={run_dir}", f"run_name={run_name}"]
        run = {**labels, "seed": seed, "run_dir": run_dir, "overrides": overrides,
               "config": load_config(self.cfg.train_config, overrides)}
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
            cmd = launch_command("train.py", self.cfg.nproc) + ["--config", self.cfg.train_config, *run["overrides"]]
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


class Plan(RunSet):
    """Every training run and evaluation of one comparison: settings x methods x seeds."""

    def __init__(self, cfg: CompareConfig):
        from sap_ds.evaluation.config import to_dict

        super().__init__(cfg)
        self.eval_config = to_dict(self.eval_cfg)
        for setting, setting_overrides in cfg.settings.items():
            for method in cfg.methods:
                for seed in self.seeds:
                    self.add_run(self.out / setting / method / f"seed{seed}", f"{setting}-{method}-{seed}", seed,
                                 [*setting_overrides, *cfg.method_overrides.get(method, []),
                                  *([f"method={method}"] if method in METHODS else [])],
                                 setting=setting, method=method)

    def train(self, run: dict, what: str = "", echo: bool = True) -> dict:
        what = what or f"train {run['setting']}/{run['method']}/seed{run['seed']}"
        summary = super().train(run, what, echo)
        if summary is None:
            raise RunStopped(f"{what} stopped before its last step (a stop was requested); its checkpoint is in "
                             f"{run['run_dir'] / 'checkpoints'} and running the comparison again resumes it")
        return summary


def evaluate_model(model: str, out: Path, config_path: str, eval_cfg, eval_overrides: list[str], nproc: int,
                   tag: str = "sap-ds compare", in_process: bool = True) -> dict:
    """Evaluate ``model`` into ``out/eval.json`` and return its metrics; an ``eval.json``
    made from the same model and eval config is reused. One rank runs in this process (no
    second start-up of torch and transformers per model) unless ``in_process`` is False
    (evaluations beside other runs: each its own process, its output in its log), more
    through the launcher."""
    from sap_ds.evaluation.config import to_dict

    done = out / "eval.json"
    if done.is_file():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if previous.get("model") == model and previous.get("config") == to_dict(eval_cfg):
            return previous["metrics"]
    if nproc == 1 and in_process:
        from sap_ds.eval import evaluate
        from sap_ds.evaluation.output import write_report

        print(f"{tag}: eval {model} -> {out}", flush=True)
        result = evaluate(model, eval_cfg)
        write_report(result, out)
        return result["metrics"]
    cmd = launch_command("eval.py", nproc) + ["--model", model, "--config", config_path, "--out", str(out), *eval_overrides]
    run_logged(cmd, out / "eval.log", f"eval {model}", tag, echo=in_process)
    return json.loads(done.read_text(encoding="utf-8"))["metrics"]


# --------------------------------------------------------------------------- main


def launch_order(runs: list[dict]) -> list[int]:
    """Indices of ``runs`` longest first, so that runs side by side end together rather than
    one long run alone at the end: SAP runs first (a probe and a safety pass beside each
    step's main pass), then by steps x micro-batches. A heuristic; the table keeps the
    configured order."""
    def cost(i: int) -> tuple:
        train = runs[i]["config"].train
        return (runs[i]["config"].method == "sap", train.max_steps * train.grad_accum)

    return sorted(range(len(runs)), key=cost, reverse=True)


def _finished_run(plan: "Plan", run: dict, alone: bool) -> dict:
    """Train (or reuse) one run, then evaluate its export: one row's worth of results. A run
    that is not ``alone`` (others beside it) keeps its output to its logs and evaluates in a
    process of its own."""
    summary = plan.train(run, echo=alone)
    model = plan.exported_model(run)
    metrics = plan.evaluate(model, run["run_dir"] / "eval", in_process=alone)
    return {"setting": run["setting"], "method": run["method"], "seed": run["seed"], "run_dir": str(run["run_dir"]),
            "model": model, "metrics": scalar_metrics(metrics), "eval": metrics,
            "train": {k: summary.get(k) for k in ("tokens_per_s", "final_train_loss", "final_eval_loss",
                                                   "final_step", "wall_time_s", "harmful_examples", "train_examples")}}


def run_all(plan: "Plan") -> tuple[dict, list[dict]]:
    """The start model's metrics and every run's results, in the plan's order. With
    ``parallel: N`` N runs train at once (longest first); a failure stops new launches, lets
    the running ones finish (their results stay on disk for the next call) and is raised."""
    start_out = plan.out / "eval" / "start"
    if plan.cfg.parallel == 1:
        start = plan.evaluate(plan.start_model, start_out)
        return start, [_finished_run(plan, run, alone=True) for run in plan.runs]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=plan.cfg.parallel) as pool:
        jobs = {i: pool.submit(_finished_run, plan, plan.runs[i], alone=False) for i in launch_order(plan.runs)}
        start_job = pool.submit(plan.evaluate, plan.start_model, start_out, False)
        done, _ = wait([*jobs.values(), start_job], return_when=FIRST_EXCEPTION)
        failed = [job for job in done if job.exception() is not None]
        if failed:
            pool.shutdown(wait=True, cancel_futures=True)
            raise failed[0].exception()
    return start_job.result(), [jobs[i].result() for i in range(len(plan.runs))]


def compare(cfg: CompareConfig, source: str) -> dict:
    plan = Plan(cfg)
    start_metrics, runs = run_all(plan)
    start = {"metrics": scalar_metrics(start_metrics)}
    start_row = {"model": "start", "setting": None, "method": None, "seeds": [],
                 "columns": {k: mean_std([v]) for k, v in start["metrics"].items()}}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source,
              "config": cfg.model_dump(mode="json"), "start_model": plan.start_model, "eval_config": plan.eval_config,
              "start": start, "runs": runs, "rows": [start_row] + aggregate(runs)}
    write_outputs(report, plan.out)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sap-ds compare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="compare config (YAML), e.g. configs/compare_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. nproc=1 'seeds=[1,2]'")
    args = parser.parse_args(argv)
    from sap_ds.config.reading import read_config_file, validate_tree
    from sap_ds.errors import EXIT_STOPPED_RESUMABLE, USER_ERRORS, report_user_error

    try:
        cfg = validate_tree(CompareConfig, read_config_file(args.config, schema=CompareConfig), args.overrides, args.config)
        report = compare(cfg, args.config)
    except USER_ERRORS as exc:
        return report_user_error(exc)
    except RunStopped as exc:
        print(f"sap-ds compare: stopped: {exc}", file=sys.stderr, flush=True)
        return EXIT_STOPPED_RESUMABLE
    except CompareError as exc:
        print(f"sap-ds compare: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(markdown(report), flush=True)
    print(f"sap-ds compare: wrote {Path(cfg.out_dir) / 'comparison.json'}, comparison.md, comparison.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
