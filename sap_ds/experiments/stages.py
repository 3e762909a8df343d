"""Two-stage experiments, the launching side: the alignment stages (``start_stages``) of a
``sap-ds compare`` or ``sap-ds sweep`` trained, exported and evaluated once each, in
``<out_dir>/start/<name>``, before any fine-tune that starts from them.

One alignment per stage, with ``start_config``'s seed (a stage's overrides may set another):
every seed of the fine-tunes starts from the same aligned model, as a user fine-tunes the
one released model; the fine-tune seeds measure the fine-tune's spread, not the alignment's.

A stage is a run like any other (``sap_ds.experiments.runs``): reused when its
``summary.json`` is there and its saved config is the one asked for (``StaleRun``
otherwise, reported as a fine-tune's is), resumed from its checkpoint when interrupted. It
is trained under an exclusive ``flock`` on ``<out_dir>/start/<name>.lock``, so that SLURM
array tasks (``sap-ds sweep --only I``) whose points share a stage train it once: the first
to take the lock trains, exports and evaluates it, the others wait and then reuse it."""
from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional

from sap_ds.errors import ConfigError, ModelError
from sap_ds.experiments.comparison_report import scalar_metrics
from sap_ds.experiments.runs import RunError, RunSet, RunStopped, say
from sap_ds.experiments.stage_config import CONFIG_KEY, split_start

FOLDER = "start"  # <out_dir>/start/<name>: a stage's run folder (beside the start model's re-attack, start/attack)


@contextmanager
def stage_lock(path: Path, tag: str = "sap-ds") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block. ``flock``,
    not ``lockf``: it excludes threads of one process as well as other processes, and the
    kernel drops it when its holder dies (a killed array task leaves no stale lock). Across
    nodes it needs a file system whose locks are shared (NFSv4, Lustre mounted with flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{tag}: waiting for {path}: another process is training this start stage")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StartStages:
    """The alignment stages of one experiment: every stage's run config built and validated
    now (a bad override fails before step 1 of anything), its export the start model of the
    fine-tunes that name it."""

    def __init__(self, cfg, out: Path, tag: str, eval_dir: str = "eval"):
        self.tag, self.eval_dir = tag, eval_dir
        self.folder = Path(out) / FOLDER
        configs = {name: split_start(overrides, CONFIG_KEY) for name, overrides in cfg.start_stages.items()}
        plan_cfg = SimpleNamespace(train_config=cfg.start_config or next(c for c, _ in configs.values() if c), eval_config=cfg.eval_config, eval_overrides=cfg.eval_overrides,
                                   start_model=None, seeds=None, overrides=[], out_dir=str(self.folder), parallel=1,
                                   nproc=cfg.nproc, eval_nproc=cfg.eval_nproc, keep_checkpoints=cfg.keep_checkpoints)
        try:
            self.plan = RunSet(plan_cfg)
        except ModelError as exc:
            raise ModelError(f"start_config {cfg.start_config}: {exc}") from None
        self.plan.tag = tag
        from sap_ds.config.reading import find_config_file
        from sap_ds.config.run import ModelConfig, load_config
        from sap_ds.model.loading import resolve_model_path

        self.runs: dict[str, dict] = {}
        for name, (config, overrides) in configs.items():
            source = config or cfg.start_config
            try:
                source = str(find_config_file(source))
                own = load_config(source, overrides)  # the stage's own seed and model (its config's unless overridden)
                resolve_model_path(ModelConfig(path=own.model.path), f"start_stages.{name}: model.path of {source}")
                run = self.plan.add_run(self.folder / name, f"start-{name}", own.seed, overrides, start_model=own.model.path,
                                        train_config=source, stage=name)
            except ModelError:
                raise
            except (ConfigError, ValueError) as exc:
                raise ConfigError(f"start_stages.{name} (over {source}): {exc}") from None
            if not run["config"].export.enabled:
                raise ConfigError(f"start_stages.{name}: export.enabled is false, but a stage's export is the model "
                                  "its fine-tunes start from")
            self.runs[name] = run
        self._done: dict[str, object] = {}  # name -> its result, or the error it raised (a stage runs once per call)

    def model(self, name: str) -> str:
        """Where stage ``name``'s export is (or will be): the ``model.path`` of its fine-tunes."""
        return str(self.runs[name]["run_dir"] / "export" / "model")

    def ensure(self, name: str, attack_stage=None, train: bool = True) -> Optional[dict]:
        """Stage ``name``'s row: trained (unless finished), exported, evaluated and, with an
        attack stage, attacked again, all under the stage's lock. ``train=False``: evaluate a
        finished stage only (None if it is not trained). An error (a failure, a stale
        stage, a stop request) is raised, and raised again for every later fine-tune of this
        call without a second attempt."""
        key = (name, train)
        if key in self._done:
            if isinstance(self._done[key], BaseException):
                raise self._done[key]
            return self._done[key]
        run = self.runs[name]
        run_dir = run["run_dir"]
        try:
            with stage_lock(self.folder / f"{name}.lock", self.tag):
                if not train and not (run_dir / "summary.json").is_file():
                    result = None
                else:
                    result = self._run(name, run, attack_stage, train)
        except RunError as exc:
            self._done[key] = exc
            raise
        self._done[key] = result
        return result

    def _run(self, name: str, run: dict, attack_stage, train: bool) -> dict:
        run_dir = run["run_dir"]
        summary = self.plan.train(run, f"train start stage {name}")
        if summary is None:
            raise RunStopped(f"start stage {name} stopped before its last step (a stop was requested); its checkpoint "
                             f"is in {run_dir / 'checkpoints'} and the next call resumes it")
        model = self.plan.exported_model(run)
        metrics = self.plan.evaluate(model, run_dir / self.eval_dir)
        reattack = {}
        if attack_stage is not None:
            out = run_dir / attack_stage.FOLDER
            reattack = attack_stage.run(model, out, run_dir / self.eval_dir, True) if train else attack_stage.read(out)
        return {"name": name, "model": model, "run_dir": str(run_dir), "seed": run["seed"],
                "metrics": {**scalar_metrics(metrics), **reattack}}

    def read(self, name: str, attack_stage=None) -> Optional[dict]:
        """Stage ``name``'s row from disk (``--report``: nothing runs); None without its evaluation."""
        run_dir = self.runs[name]["run_dir"]
        done = run_dir / self.eval_dir / "eval.json"
        if not done.is_file():
            return None
        metrics = scalar_metrics(json.loads(done.read_text(encoding="utf-8"))["metrics"])
        if attack_stage is not None:
            metrics.update(attack_stage.read(run_dir / attack_stage.FOLDER))
        return {"name": name, "model": self.model(name), "run_dir": str(run_dir), "seed": self.runs[name]["seed"],
                "metrics": metrics}
