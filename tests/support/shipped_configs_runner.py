"""Every shipped config, run for a step as a user's run, in one launch (tests/test_shipped_configs.py).

``deepspeed --num_gpus 2 tests/support/shipped_configs_runner.py --results R --model M --alpaca A``,
from a working directory outside the checkout. Each config under configs/ is found by
globbing (sap_ds.resources.shipped_configs) and loaded by its shipped name (``demo``,
``70b/llama2_70b_chat_lora``), then, by kind:

* run configs (and a bench config's base run): data loading, harmful mixing, validation,
  the first step, the final eval, checkpoint and export, through ``Trainer.train`` exactly as
  ``sap_ds/train.py`` runs them, with only the overrides a test must make: one step, fp32,
  the CPU DeepSpeed config, task and safety micro-batches of at most 2 (the CPU's budget),
  and where the config names a model or data file that is not here, ``M`` (a tiny random
  Llama with enough layers for the configs' probe layers) or a stand-in file of the same
  format. Before that, the error a user gets for those missing
  files must name the override to pass;
* compare configs: every run they would launch (setting x method x seed) is validated, and
  the distinct ones run; sweep configs: every point is validated (their train config runs
  as a shipped config of its own);
* attack configs: every attack run validated (attack x lr x steps x seed), the first grid
  point of each attack run;
* bench configs: every variant validated, the base run run;
* eval configs: validated, and ``sap_ds.evaluation.evaluate.evaluate`` run on the tiny model with a few
  prompts and examples of each set.

One Trainer after another in this process (as sap_ds/bench.py does): the start-up of a
launch is paid once. Rank 0 writes ``R`` after every config: {name: {status, error,
checks, seconds}}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

STEPS = 1  # data loading, mixing, validation, the first step, the final eval, a checkpoint and the export
# The final eval loss on 2 held-out examples, one per rank (the configs' 16-256 at up to 512
# tokens would cost more than the rest of the run on the tiny model, whose 49k-word lm_head
# dominates; the eval path is the same for 2 or 256).
TEST_OVERRIDES = [f"train.max_steps={STEPS}", "model.dtype=fp32", "deepspeed_config=zero3_cpu.json",
                  "data.eval_max_examples=2"]
# Batches of at most 2 (task and safety) per rank: the configs' 4-10 sequences of up to 512
# tokens through the 49k-word lm_head made most of this launch's CPU time, and the batch
# size is a number on the same path (mixing, padding, the micro-batch split, the DeepSpeed
# batch keys are computed from it either way).
MAX_TEST_BATCH = 2


class Runner:
    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.results: dict = {}
        self.done: dict[str, str] = {}  # config fingerprint -> the config name that ran it
        self.stand_ins = {"alpaca": args.alpaca}

    # ------------------------------------------------------------------ kinds

    def run_config(self, name: str, overrides=(), tree=None, label: str = "") -> list[str]:
        """The first step of one run config; returns the checks it made."""
        from sap_ds.config.run import build_config, config_to_dict, load_config

        load = (lambda extra: build_config(tree, extra, source=name)) if tree is not None else \
            (lambda extra: load_config(name, extra))
        checks = []
        extra = [*overrides, *TEST_OVERRIDES]
        as_given = load(extra)
        extra += self._stand_ins(as_given, checks) + self._small_batches(as_given)
        cfg = load(extra)
        key = json.dumps({k: v for k, v in config_to_dict(cfg).items() if k not in ("run_name", "output_dir")}, sort_keys=True)
        if key in self.done:
            return checks + [f"same run as {self.done[key]}: not run twice"]
        self.done[key] = label or name
        out = Path(cfg.output_dir).resolve()
        assert out.is_relative_to(Path.cwd().resolve()), f"output_dir {out} is not under the working directory"
        checks += self._train(cfg)
        return checks + [f"output in {os.path.relpath(out)}"]

    @staticmethod
    def _small_batches(cfg) -> list[str]:
        """Overrides that cap the task and safety micro-batches at MAX_TEST_BATCH."""
        small = []
        if cfg.train.micro_batch_size > MAX_TEST_BATCH:
            small.append(f"train.micro_batch_size={MAX_TEST_BATCH}")
        if cfg.sap.safety_batch_size > MAX_TEST_BATCH:
            small.append(f"sap.safety_batch_size={MAX_TEST_BATCH}")
        return small

    def _stand_ins(self, cfg, checks: list) -> list[str]:
        """Overrides for the model and data files the config names that are not here, after
        checking that the user's error message names exactly those overrides."""
        from sap_ds.config.run import EMBEDDED_MODEL, missing_inputs
        from sap_ds.errors import ConfigError, ModelError
        from sap_ds.model.loading import resolve_model_path
        from sap_ds.train import check_inputs

        overrides, model_missing = [], False
        if cfg.model.path == EMBEDDED_MODEL:
            # Available, but a step of the 135M model costs ~100x the tiny one's on a CPU; its
            # loading is tests/test_embedded.py's. Same family (Llama), same tokenizer.
            overrides.append(f"model.path={self.args.model}")
        else:
            try:
                resolve_model_path(cfg.model)
            except ModelError:
                model_missing = True
                overrides.append(f"model.path={self.args.model}")
        safelora = cfg.export.safelora
        if safelora.enabled and safelora.base_model == EMBEDDED_MODEL:
            # The unaligned base of the stand-in: the aligned model (runs/align, trained from
            # M by the align config earlier in this loop) then differs from it by a step.
            overrides.append(f"export.safelora.base_model={self.args.model}")
        missing = [line.split(".path:")[0] for line in missing_inputs(cfg)]
        if model_missing or missing:
            try:
                check_inputs(cfg)
                raise AssertionError("missing files, yet check_inputs raised nothing")
            except ConfigError as exc:
                wanted = (["model.path="] if model_missing else []) + [f"{key}.path=" for key in missing]
                absent = [w for w in wanted if w not in str(exc)]
                assert not absent, f"the error does not name the overrides {absent}: {exc}"
                checks.append(f"missing files named with their overrides: {', '.join(wanted)}")
        sources = {f"data.{part}.{i}": s for part in ("train", "eval", "safety") for i, s in enumerate(getattr(cfg.data, part))}
        sources["data.harmful"] = cfg.data.harmful
        for key in missing:
            fmt = sources[key].format
            assert fmt in self.stand_ins, f"{key}: no stand-in file for format '{fmt}' (add one in the test)"
            overrides.append(f"{key}.path={self.stand_ins[fmt]}")
        return overrides

    def _train(self, cfg) -> list[str]:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from sap_ds.train import check_run
        from sap_ds.training.trainer import Trainer

        check_run(cfg, self.world)  # sap_ds.train.fail_fast's checks, on every rank: a refusal stops them all alike
        trainer = Trainer(cfg, self.rank, self.world)
        try:
            summary = trainer.train()
        finally:
            trainer.close()
            del trainer
            unset_hf_deepspeed_config()  # a later eval must load a whole model, not a ZeRO-3 partitioned one
            # no gc.collect: the next engine's set-up collects (deepspeed.runtime.zero.utils.defragment)
        assert summary.get("final_step") == STEPS, f"trained to step {summary.get('final_step')}, not {STEPS}"
        records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r][-1] == STEPS
        assert all(r.get("model_tflops_per_s") and r.get("mfu") for r in records), "a step without model TFLOP/s or MFU"
        checks = [f"{STEPS} steps, final train loss {summary['final_train_loss']:.3f}, "
                  f"{summary['train_examples']} examples ({summary['harmful_examples']} harmful)"]
        if cfg.export.enabled:
            assert Path(summary["export_dir"]).is_dir()
            checks.append("exported")
        return checks

    def compare(self, name: str, path: Path) -> list[str]:
        from sap_ds.config.reading import read_config_file, validate_tree
        from sap_ds.evaluation.config import load_eval_config
        from sap_ds.experiments.compare import METHODS, CompareConfig

        cfg = validate_tree(CompareConfig, read_config_file(path, schema=CompareConfig), [], name)
        load_eval_config(cfg.eval_config)
        from sap_ds.experiments.stage_config import START_MODEL_TOKEN

        # ${start_model} (SafeLoRA's aligned model: the start every run fine-tunes) becomes the
        # start model as in RunSet.add_run; one that is not here stands in as runs/align's export,
        # the aligned model this loop trained from M with the align config (its model.path is M)
        start = cfg.start_model if cfg.start_model and Path(cfg.start_model).is_dir() else "runs/align/export/model"
        runs = []  # the overrides sap-ds compare gives each run (compare.RunSet.add_run)
        for setting, overrides in cfg.settings.items():
            for method in cfg.methods:
                for seed in cfg.seeds or [None]:
                    method_overrides = [o.replace(START_MODEL_TOKEN, start) for o in cfg.method_overrides.get(method, [])]
                    runs.append([*cfg.overrides, *overrides, *method_overrides,
                                 *([f"method={method}"] if method in METHODS else []),  # a label names its own
                                 *([f"seed={seed}"] if seed is not None else []), *self._start_model(cfg.start_model),
                                 f"output_dir={cfg.out_dir}/{setting}/{method}/seed{seed}"])
        # every run validated; each method's run of the first setting and seed runs (the other
        # settings and seeds change data keys and the seed, which the validation covers)
        first = [r for r in runs if r[-1].startswith(f"output_dir={cfg.out_dir}/{next(iter(cfg.settings))}/")
                 and r[-1].endswith(f"/seed{(cfg.seeds or [None])[0]}")]
        return self._validate_and_run(cfg.train_config, runs, "setting x method x seed", name, run=first)

    def sweep(self, name: str, path: Path) -> list[str]:
        from sap_ds.config.reading import read_config_file, validate_tree
        from sap_ds.config.run import load_config
        from sap_ds.evaluation.config import load_eval_config
        from sap_ds.experiments.sweep_config import SweepConfig, expand_points

        cfg = validate_tree(SweepConfig, read_config_file(path, schema=SweepConfig), [], name)
        load_eval_config(cfg.eval_config)
        points = expand_points(cfg).values()
        from sap_ds.experiments.stage_config import split_start

        for point in points:  # start=<stage> picks the point's start model (an alignment stage's export), not a train key
            load_config(cfg.train_config, [*cfg.overrides, *split_start(point)[1], *self._start_model(cfg.start_model)])
        # Every point is validated; its train config runs as a shipped config of its own (the
        # sweeps' is demo.yaml), and the points change SAP and data keys that other configs run.
        return [f"{len(points)} points validated against {os.path.relpath(cfg.train_config, REPO)}"]

    def _start_model(self, start_model) -> list[str]:
        return [f"model.path={start_model}"] if start_model else []

    def _validate_and_run(self, train_config: str, runs: list[list[str]], what: str, name: str,
                          run: Optional[list[list[str]]] = None) -> list[str]:
        """Validate every run's overrides, then run those of ``run`` (default: all)."""
        from sap_ds.config.run import load_config

        for overrides in runs:
            load_config(train_config, overrides)
        checks = [f"{len(runs)} runs ({what}) validated"]
        for overrides in runs if run is None else run:
            folder = next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1]
            checks += self.run_config(train_config, overrides, label=f"{name} ({folder})")
        return checks

    def attack(self, name: str, path: Path) -> list[str]:
        from sap_ds.experiments.attack import AttackPlan, load_attack_config

        cfg = load_attack_config(name)
        # every attack run's config built and validated as `sap-ds attack` does, against M
        plan = AttackPlan(cfg, self.args.model, Path("runs") / name, name)
        first = {}  # each attack's first grid point runs: the data it mixes (pure bad: harmful only) is built
        for run in plan.runs:
            first.setdefault(run["attack"], run["overrides"])
        return [f"{len(plan.runs)} attack runs validated"] + \
            self._validate_and_run(cfg.train_config, list(first.values()), "the first grid point of each attack", name)

    def bench(self, name: str, path: Path) -> list[str]:
        from sap_ds.config.run import build_config
        from sap_ds.experiments.bench_runs import load_bench_config

        bench, _, tree = load_bench_config(str(path), [])
        for variant in bench.variants:
            build_config(tree, variant.overrides, source=f"{name} variant {variant.name}")
        return [f"{len(bench.variants)} variants validated"] + self.run_config(name, tree=tree)

    def evaluation(self, name: str, path: Path) -> list[str]:
        from sap_ds.evaluation.config import load_eval_config
        from sap_ds.evaluation.evaluate import evaluate

        cfg = load_eval_config(name)
        small = ["generation.max_new_tokens=4"]
        small += [f"harmful.{i}.limit=4" for i in range(len(cfg.harmful))]
        for j, task in enumerate(cfg.tasks):
            small += [f"tasks.{j}.limit=2"] + ([f"tasks.{j}.max_new_tokens=4"] if task.kind != "test_loss" else [])
        result = evaluate("tiny-random", load_eval_config(name, small))
        metrics = result["metrics"]
        if cfg.harmful:
            assert metrics["harmful"]["n"] > 0
        assert set(metrics["tasks"]) == {t.label for t in cfg.tasks}
        return [f"evaluated: {len(cfg.harmful)} prompt sets, {len(cfg.tasks)} tasks"]

    # ------------------------------------------------------------------ loop

    def kind(self, path: Path) -> str:
        from sap_ds.config.reading import read_config_file
        from sap_ds.configs_cli import config_kind

        kind = config_kind(path, read_config_file(path))
        return "evaluation" if kind == "eval" else kind

    def run_all(self) -> None:
        from sap_ds.resources import config_name, shipped_configs

        for path in shipped_configs():
            name = config_name(path)
            if self.args.only and name not in self.args.only:
                continue
            start = time.perf_counter()
            try:
                kind = self.kind(path)
                runner = {"run": lambda n, p: self.run_config(n)}.get(kind) or getattr(self, kind)
                result = {"status": "ok", "kind": kind, "checks": runner(name, path)}
            except BaseException as exc:  # noqa: BLE001 - record it and go on with the next config
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - start, 1)
            self.results[name] = result
            if self.rank == 0:
                print(f"shipped config {name}: {result['status']} ({result['seconds']} s)", flush=True)
                tmp = Path(self.args.results).with_suffix(".tmp")
                tmp.write_text(json.dumps(self.results, indent=1))
                os.replace(tmp, self.args.results)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", required=True)
    parser.add_argument("--model", required=True, help="stand-in for model paths that are not here")
    parser.add_argument("--alpaca", required=True, help="stand-in for alpaca-format data files that are not here")
    parser.add_argument("--only", nargs="*", default=None, help="config names (default: all)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = parser.parse_args()
    from sap_ds.parallel.distributed import init_distributed, shutdown_distributed

    rank, _, world = init_distributed()
    Runner(args, rank, world).run_all()
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
