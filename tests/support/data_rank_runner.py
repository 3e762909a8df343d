"""Two gloo ranks prepare the same data, as the trainer's ranks do after init_distributed:

    python tests/support/data_rank_runner.py OUT_DIR CACHE_DIR GOOD_FILE BAD_FILE

Rank 0 (the node's first rank) writes the cache while rank 1 waits and then reads it; a
bad file fails both ranks with the builder's message (rank 1 is never left waiting).
Writes OUT_DIR/rank{r}.json. The workers are forked after the imports, so the two ranks
cost one interpreter start.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

import torch.distributed as dist  # noqa: E402

from sap_ds.config.run import DataConfig, DataSource  # noqa: E402
from sap_ds.data import DataError, build_run_data  # noqa: E402
from sap_ds.data import run as run_module  # noqa: E402
from sap_ds.model.embedded import tiny_model_dir  # noqa: E402
from sap_ds.model.loading import load_tokenizer  # noqa: E402


def worker(rank: int, port: int, out: str, cache: str, good: str, bad: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    builds = []
    real = run_module.build
    run_module.build = lambda *a, **k: builds.append(1) or real(*a, **k)
    tokenizer = load_tokenizer(tiny_model_dir())
    cfg = DataConfig(train=[DataSource(path=good, format="gsm8k")], max_length=64, cache_dir=cache)
    data = build_run_data(cfg, tokenizer, 0, need_safety=False)
    digest = hashlib.sha256(json.dumps([[t.input_ids, t.labels] for t in data.train]).encode()).hexdigest()
    result = {"tokens": digest, "n": len(data.train), "builds": len(builds), "error": None}
    try:
        build_run_data(cfg.model_copy(update={"train": [DataSource(path=bad, format="gsm8k")]}), tokenizer, 0, False)
    except DataError as exc:
        result["error"] = str(exc)
    result["builds"] = len(builds)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    out, cache, good, bad = sys.argv[1:5]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=worker, args=(r, port, out, cache, good, bad)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max(p.exitcode for p in procs)


if __name__ == "__main__":
    sys.exit(main())
