"""The training loop: one DeepSpeed ZeRO-3 engine, any method, same data and logging.

Read top to bottom: ``Trainer.__init__`` builds data, model and engine;
``Trainer.train`` runs the steps (the method's, ``sap_ds/methods/``), evaluates, logs,
checkpoints and exports; a signal or stop file ends it cleanly with a checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sap_ds.config.run import RunConfig, config_to_dict
from sap_ds.cost.throughput import Throughput
from sap_ds.data import RunData, build_run_data, collate, global_batch_indices
from sap_ds.errors import ConfigError, TrainingStopped
from sap_ds.files import atomic_write_text
from sap_ds.methods import build_method
from sap_ds.model.loading import apply_lora, load_model, load_tokenizer, resolve_model_path
from sap_ds.model.losses import forward_logits, task_loss
from sap_ds.model.packed_forward import packing_attention
from sap_ds.parallel.collectives import all_reduce
from sap_ds.parallel.distributed import barrier, device, is_main
from sap_ds.parallel.ds_config import load_ds_config, optimizer_choice
from sap_ds.parallel.zero3 import Zero3Shards
from sap_ds.timing import PhaseTimer
from sap_ds.training import checkpoint, resume, resume_optimizer
from sap_ds.training.metrics import MetricsLogger, TrainLog, record_in_train_log, step_line

log = logging.getLogger("sap_ds")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Linear warm-up, then cosine/linear decay to ``min_lr_ratio`` (or constant)."""
    t = cfg.train

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


class Trainer:
    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.train_log = TrainLog(self.out, enabled=is_main())  # first: the data and model messages below go there too
        self.train_log.open()
        self.device = device()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        model_path = resolve_model_path(cfg.model)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        self.method = build_method(cfg)
        self.data: RunData = build_run_data(cfg.data, self.tokenizer, cfg.seed, need_safety=self.method.needs_safety,
                                            safety_mix=self.method.safety_mix)
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
        if cfg.train.max_steps:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.train.epochs * len(self.data.train) / self.global_batch))

        ds_config = load_ds_config(cfg, world_size)
        previous = checkpoint.peek_meta(self.ckpt_root) if cfg.train.resume == "auto" else None
        if previous is not None and previous.get("world_size", world_size) != world_size:
            # Written on another number of ranks: load through DeepSpeed's universal format
            # (checkpoint.load converts it first); the flag must be set when the engine is built.
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self._hf_ds = HfDeepSpeedConfig(ds_config)  # keeps zero.Init active while the model loads
        model = load_model(cfg.model, model_path)
        if cfg.data.packing:
            packing_attention(model)  # a model that cannot keep packed examples apart fails here, before step 1
        if cfg.lora.enabled:
            torch.manual_seed(cfg.seed)  # LoRA init depends only on the seed, not on loading
            model = apply_lora(model, cfg.lora)
        self.hidden_size = model.config.hidden_size
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.lr_factor = lr_lambda(cfg, self.total_steps)
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)  # noqa: E731
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config, lr_scheduler=scheduler
        )
        if is_main():
            log.info("optimizer: %s; %s", type(self.engine.basic_optimizer).__name__, optimizer_choice(cfg, ds_config)[1])
        self.shards = Zero3Shards(self.engine)
        self.method.setup(self)
        self.timer = PhaseTimer(self.method.phases)
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.stop_requested = False
        self.metrics = MetricsLogger(self.out, enabled=is_main(), logging_cfg=cfg.logging,
                                     run_config=config_to_dict(cfg), run_name=cfg.run_name)
        self.throughput = Throughput(cfg, model_path, world_size)

    def _start_header(self) -> str:
        """train.log's line for this start: what ran, from where, from which code, how."""
        from sap_ds.version import version_line

        return (f"start at step {self.step} of {self.total_steps}: {version_line()}; method {self.cfg.method}; "
                f"{self.world} rank(s); command: {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")

    # ------------------------------------------------------------------ batches

    def task_micro_batches(self, step: int) -> list[dict]:
        t = self.cfg.train
        idx = global_batch_indices(len(self.data.train), self.global_batch, step, self.cfg.seed, self.cfg.data.shuffle)
        per_rank = t.micro_batch_size * t.grad_accum
        mine = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        pad = self.tokenizer.pad_token_id
        return [
            self._to_device(collate([self.data.train[i] for i in mine[m * t.micro_batch_size : (m + 1) * t.micro_batch_size]], pad))
            for m in range(t.grad_accum)
        ]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ steps

    def main_pass(self, micro_batches: list[dict], before_step=None, after_backward=None, loss_fn=None) -> list[float]:
        """Forward/backward of the task loss per micro-batch, then one optimizer step;
        ``before_step()`` runs between the two when the step is finite (a method's edit of
        the reduced gradients, e.g. Lisa's proximal term); ``after_backward(m)`` after
        micro-batch m's backward (SAP reads the probe's gradient there); ``loss_fn(m, batch)``
        replaces the task loss of micro-batch m (a method with a loss of its own: RepNoise)."""
        losses = []
        for m, batch in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(m == len(micro_batches) - 1)
            if loss_fn is not None:
                loss = loss_fn(m, batch)
            else:
                loss = task_loss(forward_logits(self.engine, batch), batch["labels"])
            self.engine.backward(loss)
            if after_backward is not None:
                after_backward(m)
            losses.append(loss.detach().float())
        finite = self._all_finite(torch.stack(losses), self.shards.local_grads_finite())
        if finite:
            if before_step is not None:
                before_step()
            self.engine.step()
        else:
            self.shards.drop_grads()
        self.engine.set_gradient_accumulation_boundary(None)
        self._last_step_finite = finite
        return [x.item() for x in losses]

    def _all_finite(self, values: torch.Tensor, grads_ok: torch.Tensor) -> bool:
        """Losses and gradients finite on every rank (one verdict for all ranks)."""
        flag = torch.tensor([0.0 if torch.isfinite(values).all() and grads_ok else 1.0], device=self.device)
        return all_reduce(flag).item() == 0

    def train_step(self, step: int) -> list[float]:
        return self.method.step(self, step, self.task_micro_batches(step))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean task loss on the held-out set, over all ranks."""
        if not self.data.eval:
            return None
        mine = self.data.eval[self.rank :: self.world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        mb = self.cfg.train.micro_batch_size
        # Every rank runs the same number of forwards: ZeRO-3 gathers are collective.
        n_batches = math.ceil(math.ceil(len(self.data.eval) / self.world) / mb)
        for b in range(n_batches):
            items = mine[b * mb : (b + 1) * mb] or self.data.eval[:1]
            batch = self._to_device(collate(items, self.tokenizer.pad_token_id))
            logits = forward_logits(self.engine, batch)
            n_tokens = (batch["labels"][:, 1:] != -100).sum()
            if mine[b * mb : (b + 1) * mb]:
                total += torch.stack([task_loss(logits, batch["labels"]).double() * n_tokens, n_tokens.double()])
        all_reduce(total)
        return (total[0] / total[1]).item()

    # ------------------------------------------------------------------ state

    def checkpoint_identity(self) -> dict:
        trainable = sum(p.ds_numel for p in self.engine.module.parameters() if p.requires_grad)
        return {**checkpoint.config_identity(self.cfg), "trainable_params": trainable}

    def save_checkpoint(self) -> Path:
        # world_size and the global batches are not part of the identity: another number of
        # ranks may resume the run (resume.check_batch_on_new_world says on what terms).
        state = self.method.state_dict()
        section = self.cfg.method_section
        # the global sizes of the method's own batches (SAP's safety batch): resume keeps them (resume.py)
        kept = {b.meta_key: getattr(section, b.size_key) * self.world for b in section.rank_batches}
        meta = {**self.checkpoint_identity(), "world_size": self.world, "global_batch": self.global_batch,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps, **kept, **state["meta"]}
        return checkpoint.save(self.engine, self.ckpt_root, self.step, meta, state["tensors"], self.cfg.train.save_total_limit)

    def maybe_resume(self, previous: dict | None = None) -> None:
        """Load the latest checkpoint, if any, and put the run config's optimizer settings over
        the ones it restored (sap_ds/training/resume_optimizer.py). ``previous``: the earlier start's
        config.json (rank 0), to name the changed settings in the log."""
        if self.cfg.train.resume == "never":
            return
        found = checkpoint.read_meta(self.ckpt_root)
        if found is not None:
            checkpoint.check_identity(*found, self.checkpoint_identity())  # another model's: refused before anything
            if found[1].get("world_size", self.world) != self.world:
                resume.check_batch_on_new_world(found[1], self.cfg, self.world, found[0])
        loaded = checkpoint.load(self.engine, self.ckpt_root, self.checkpoint_identity(), self.world)
        if loaded is None:
            return
        meta, tensors, resharded = loaded
        lr_restored = self.engine.get_lr()[0]
        applied = resume_optimizer.apply_optimizer_settings(self.engine, self.cfg)
        self.step = meta["step"]
        if self.step > self.total_steps:  # else the run would "finish" past its schedule and export those weights
            raise ConfigError(
                f"{checkpoint.latest_tag(self.ckpt_root)} in {self.ckpt_root} is at step {self.step}, past this config's "
                f"{self.total_steps} steps (train.max_steps / train.epochs): a run cannot be shortened below what it "
                f"has trained. Set train.max_steps >= {self.step}, or train.resume=never to start over"
            )
        self.tokens_seen = meta.get("tokens_seen", 0)
        self.skipped_steps = meta.get("skipped_steps", 0)
        if resharded:
            # Per-rank RNG streams cannot be mapped onto another number of ranks: every rank
            # starts a new one from (seed, step, rank), the same on every resume of this kind.
            torch.manual_seed(hash((self.cfg.seed, self.step, self.rank)) % 2**63)
        self.method.load_state_dict({"meta": meta, "tensors": tensors}, resharded)
        self.shards.zero_padding()
        self.shards.refresh_gathered()
        if is_main():
            how = f" (written on {meta.get('world_size')} ranks, re-sharded for {self.world})" if resharded else ""
            log.info("resumed from %s at step %d%s", checkpoint.latest_tag(self.ckpt_root), self.step, how)
            changed = resume_optimizer.changed_settings(previous, self.cfg, applied)
            if changed:
                log.info("optimizer settings changed since the checkpoint, applied from step %d on (the Adam moments are "
                         "kept): %s; next step's lr %g (the checkpoint's schedule gave %g)", self.step + 1,
                         "; ".join(changed), self.engine.get_lr()[0], lr_restored)

    def preflight(self) -> None:
        """Checks before step 1 that need the engine, the method's (SAP: whether the working
        dtype can hold its perturbation; ConfigError on every rank alike)."""
        if self.step == 0:
            self.method.preflight(self)

    # ------------------------------------------------------------------ rank consistency

    def check_rank_consistency(self) -> None:
        """Fail loudly if ranks disagree on what must be replicated: the step and the
        method's replicated state (``Method.replicated_values``: SAP's probe and direction
        scale); a silent divergence would train a different model on every rank."""
        if not dist.is_initialized() or self.world == 1:
            return
        parts = [torch.tensor([float(self.step)], device=self.device)]
        parts += [v.detach().reshape(-1).to(self.device) for v in self.method.replicated_values()]
        local = torch.cat([p.double() for p in parts])
        high, low = all_reduce(local.clone(), "max"), all_reduce(local.clone(), "min")
        if not torch.equal(high, low):
            bad = (high != low).nonzero().flatten().tolist()
            raise RuntimeError(
                f"rank {self.rank}: ranks disagree at step {self.step} on {len(bad)} replicated values "
                f"(the step counter, then the method's replicated state; first index {bad[0]}): a rank diverged"
            )

    # ------------------------------------------------------------------ stopping

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def _stop_file(self) -> Path:
        return resume.stop_file(self.out)

    def close(self) -> None:
        """Tear the engine down so that another Trainer in this process starts clean (bench
        variants, the GPU check, the shipped-config runner): what the method attached (SAP's
        probe hooks), the metrics files, the engine, and DeepSpeed's module-level references
        to it. The caller drops its reference and collects."""
        from sap_ds.parallel.zero3 import release_deepspeed_globals

        self.method.close()
        self.metrics.close()
        self.train_log.close()
        self.engine.destroy()
        release_deepspeed_globals()

    def should_stop(self) -> bool:
        """All ranks agree: one rank's signal stops every rank at the same step."""
        local = self.stop_requested or self._stop_file().exists()
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return all_reduce(flag).item() > 0

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        done = resume.finished_run(cfg)  # sap_ds/train.py checks this before building anything
        if done is not None:
            return {**done, "already_done": True, "output_dir": str(self.out)}
        self._install_signal_handlers()
        if cfg.train.resume == "never" and is_main():
            resume.clear_previous_run(self.out)
        barrier()
        previous = resume.saved_config(self.out) if is_main() else None
        self.maybe_resume(previous)
        self.preflight()  # before config.json, metrics or checkpoints are written: a refused run records nothing
        if is_main():
            resume.record_config(self.out, cfg, previous, self.step)
        self.metrics.open()
        self.train_log.start(self._start_header())  # the run is under way: train.log gets what was logged so far
        if is_main() and (left := checkpoint.remove_interrupted_saves(self.ckpt_root)):  # before this start's first save
            log.warning("removed %s/%s/%s: the unfinished write of a checkpoint save that was interrupted (the "
                        "checkpoints beside it are complete)", self.ckpt_root, checkpoint.STAGING, ", ".join(left))
        # A progress bar only on a terminal: written to a file or pipe (a SLURM job, `| tee`) it
        # becomes one ever-growing line; there the console gets train.log's plain per-step lines.
        plain_console = not sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not is_main() or plain_console,
                   desc=f"{cfg.method}", dynamic_ncols=True)
        last_loss, eval_loss, preempted = float("nan"), None, False
        final_eval, final_evaluated = None, False
        run_start, run_tokens, start_step = time.perf_counter(), 0, self.step
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            losses = self.train_step(self.step)
            task_lengths = self.method.trained_lengths(self, self.step)
            tokens = sum(task_lengths)
            self.tokens_seen += tokens
            run_tokens += tokens
            elapsed = time.perf_counter() - step_start
            if self._last_step_finite:
                self.bad_steps = 0
                last_loss = sum(losses) / len(losses)
            else:
                self.bad_steps += 1
                self.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.bad_steps)
            self.step += 1
            record = {"step": self.step, "loss": last_loss, "lr": self.engine.get_lr()[0], "tokens_per_s": tokens / elapsed,
                      "step_time_s": elapsed, "skipped_steps": self.skipped_steps}
            record.update(self.throughput.step(task_lengths, self.method.extra_passes(self, self.step - 1), elapsed))
            last_step = self.step == self.total_steps
            # The final eval is the last step's: one record, at that step, with its loss and eval loss.
            evaluating = (bool(cfg.train.eval_every and self.step % cfg.train.eval_every == 0)
                          or (last_step and bool(self.data.eval)))
            if self.step % cfg.train.log_every == 0 or evaluating:
                # Device reads (phase times, the method's statistics) only on the steps that are logged.
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update({f"time/{k}": v for k, v in self.timer.pop().items() if v})
                record.update(self.method.log_stats(self))
                if evaluating:
                    eval_loss = record["eval_loss"] = self.evaluate()
                    if last_step:
                        final_eval, final_evaluated = eval_loss, True
                self.metrics.log(record)
                self.train_log.write(step_line(record, self.total_steps), echo=plain_console)
            else:
                self.timer.discard()
            bar.update(1)
            bar.set_postfix({"loss": f"{last_loss:.4f}", **({"eval": f"{eval_loss:.4f}"} if eval_loss is not None else {}),
                             "tok/s": f"{record['tokens_per_s']:.0f}"})
            if self.bad_steps >= cfg.train.max_bad_steps:
                self.save_checkpoint()
                stopped = TrainingStopped(
                    f"{self.bad_steps} non-finite steps in a row (train.max_bad_steps={cfg.train.max_bad_steps}); "
                    f"checkpoint saved at step {self.step} in {self.ckpt_root}. Lower train.lr or check the data."
                )
                record_in_train_log(f"sap-ds: stopped: {stopped}")  # the console gets it from sap_ds/train.py
                raise stopped
            if cfg.train.check_ranks_every and self.step % cfg.train.check_ranks_every == 0:
                self.check_rank_consistency()
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if self.step < self.total_steps and self.should_stop():
                preempted = True
                break
        bar.close()
        wall = time.perf_counter() - run_start
        if preempted:
            folder = self.save_checkpoint()
            if is_main():
                atomic_write_text(self.out / "REQUEUE", f"{folder.name}\n")
                # Every rank has agreed to stop (should_stop's all-reduce): the request is honoured and
                # removed, so that the next start trains on instead of stopping after one step.
                consumed = resume.consume_stop_file(self.out)
                log.warning("stop requested%s: checkpoint %s written; exiting for a resume (requeue marker %s)",
                            f" ({consumed} removed)" if consumed else " (signal)", folder, self.out / "REQUEUE")
            self.metrics.close()
            return {"preempted": True, "step": self.step, "checkpoint": str(folder)}
        if not final_evaluated:  # this start ran no step: the last one, and its checkpoint, are an earlier start's
            final_eval = self.evaluate()
            self.metrics.log_final_eval(self.step, final_eval)
        self.save_checkpoint()
        export_dir = None
        if cfg.export.enabled:
            from sap_ds.training.export import export_model

            export_dir = export_model(self)
        summary = {
            "method": cfg.method,
            "final_step": self.step,
            "steps_this_run": self.step - start_step,
            "final_train_loss": last_loss,
            "final_eval_loss": final_eval,
            "tokens_per_s": run_tokens / wall if wall > 0 else None,
            **self.throughput.summary(),
            "wall_time_s": wall,
            "skipped_steps": self.skipped_steps,
            "train_examples": len(self.data.examples),
            "harmful_examples": self.data.n_harmful,
            "data": self.data.summary(),
            "export_dir": str(export_dir) if export_dir else None,
            "checkpoint_dir": str(self.ckpt_root),
        }
        if is_main():
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
            self.metrics.summary(summary)
            stale = self.out / "REQUEUE"
            if stale.exists():
                stale.unlink()
        self.metrics.close()
        if is_main():
            written = ["summary.json", "metrics.jsonl", *(["curves.png"] if self._write_curves() else []),
                       *([str(export_dir)] if export_dir else [])]
            self.train_log.write(f"finished at step {self.step}: train loss {_fmt(last_loss)}, eval loss {_fmt(final_eval)}; "
                                 f"wrote {', '.join(written)}")  # the console gets train.py's summary instead
        self.train_log.close()
        barrier()
        return summary

    def _write_curves(self) -> bool:
        """curves.png (rank 0): a plot must never fail a run that trained, so a failure is a warning."""
        from sap_ds.training.curves import write_curves

        try:
            write_curves(self.out, f"{self.cfg.run_name}: {self.cfg.method}, {self.step} steps")
        except Exception as exc:  # noqa: BLE001 - matplotlib, fonts, a full disk: the run's results are written
            log.warning("curves.png not written (%s: %s); metrics.jsonl has the same numbers", type(exc).__name__, exc)
            return False
        return True

    def _global_tokens(self, step: int) -> int:
        """Real (non-padding) tokens in this step's global task batch (examples or packs)."""
        return sum(self._task_lengths(step))

    def _task_lengths(self, step: int) -> list[int]:
        """Real (non-padding) length of every sequence (an example, or a pack of them) in this
        step's global task batch, from the lengths the data cache keeps (no rows read)."""
        idx = global_batch_indices(len(self.data.train), self.global_batch, step, self.cfg.seed, self.cfg.data.shuffle)
        return [int(self.data.train.lengths[i]) for i in idx]
