"""Preparing N synthetic chat examples on 2 ranks: wall time and peak RSS per rank, the
list-based pipeline of an older checkout against this one, cold and cached.

    python scripts/bench_data_prep.py --n 100000 --old-code ../old --out runs/bench_data/prep.json

``--old-code`` is a checkout of an earlier commit (``git worktree add ../old f77f176``: every
rank reads the file, turns it into Python lists and tokenizes it in a loop). That code has
no ``messages`` format, so it reads the same examples as ``instruction`` rows (prompt,
response); this checkout reads them both ways (``messages`` is the format of the issue,
``instruction`` the like-for-like comparison). Cases, each a fresh pair of processes
(gloo, world size 2, spawned):

    old          the older checkout, instruction rows
    new          this checkout, messages rows, empty cache: rank 0 tokenizes, rank 1 waits
    new_cached   the same again: both ranks memory-map the cache
    new_instr    this checkout, instruction rows, empty cache

Per rank: ``wall_s`` (build_run_data, between two barriers: the same on both ranks;
``datasets`` is imported before), ``rss_before`` (after imports and the tokenizer), ``peak_rss`` (VmHWM, reset before the
build) and ``workers_peak_rss`` (the largest ``datasets.map`` worker process, if any).
Timings on a shared machine are inflated; the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from this be are or an it his which have had not but "
         "were they all one there their been has more if will when would who so no she other its time than into "
         "only some could these two may first then do any like my now over such our man me even most made after "
         "also did many before must through back years where much your way well down should because each just "
         "those people how too little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old year off come since "
         "against go came right used take three").split()


def write_data(folder: Path, n: int) -> dict[str, Path]:
    """``n`` one-turn chats (prompt 10-80 words, answer 20-250), as messages and as
    instruction rows; about 60-450 tokens each with the chat template."""
    rng = random.Random(0)
    messages, instruction = folder / "messages.jsonl", folder / "instruction.jsonl"
    with open(messages, "w") as m, open(instruction, "w") as i:
        for k in range(n):
            prompt = f"Question {k}: " + " ".join(rng.choices(WORDS, k=rng.randint(10, 80))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(20, 250))) + "."
            m.write(json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}) + "\n")
            i.write(json.dumps({"prompt": prompt, "response": answer}) + "\n")
    return {"messages": messages, "instruction": instruction}


def _status(key: str) -> int:
    for line in open("/proc/self/status", encoding="utf-8"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def rank_main(rank: int, port: int, code_root: str, data: dict, out: str) -> None:
    sys.path.insert(0, code_root)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    import datasets  # noqa: F401  (both pipelines read with datasets: its import is not data preparation)

    from sap_ds.config.run import DataConfig
    from sap_ds.data import build_run_data
    from sap_ds.model.embedded import tiny_model_dir
    from sap_ds.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir())
    cfg = DataConfig(**data)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM
    before = _status("VmRSS:")
    start = time.perf_counter()
    prepared = build_run_data(cfg, tokenizer, 0, need_safety=False)
    dist.barrier()
    wall = time.perf_counter() - start
    result = {"rank": rank, "wall_s": wall, "rss_before": before, "peak_rss": _status("VmHWM:"),
              "workers_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
              "examples": len(prepared.train), "cache_hit": getattr(prepared, "cache_hit", None)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_case(code_root: Path, data: dict, folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, port, str(code_root), data, str(folder))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed ({[p.exitcode for p in procs]}), code {code_root}")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="synthetic examples")
    parser.add_argument("--old-code", required=True, help="checkout of the older commit (its repository root)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--cases", default="old,new,new_cached,new_instr")
    parser.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_data_prep-"))
    files = write_data(work, args.n)
    cache = str(work / "cache")
    old, new = Path(args.old_code).resolve(), HERE
    instr = [{"path": str(files["instruction"]), "format": "instruction"}]
    cases = {
        "old": (old, {"train": instr, "max_length": args.max_length}),
        "new": (new, {"train": [{"path": str(files["messages"]), "format": "messages"}], "max_length": args.max_length,
                      "cache_dir": cache}),
        "new_instr": (new, {"train": instr, "max_length": args.max_length, "cache_dir": cache}),
    }
    cases["new_cached"] = cases["new"]
    results = {"n": args.n, "max_length": args.max_length, "world_size": 2, "cpu_count": os.cpu_count(),
               "command": " ".join(["python", *sys.argv]), "cases": {}}
    for name in args.cases.split(","):
        load = os.getloadavg()[0]
        ranks = run_case(cases[name][0], cases[name][1], work / name)
        results["cases"][name] = {"ranks": ranks, "load_avg_1m_before": load}
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        print(f"{name:11s} wall {ranks[0]['wall_s']:7.1f} s   peak RSS GiB rank0 {gib(ranks[0]['peak_rss'])} "
              f"(+{gib(ranks[0]['peak_rss'] - ranks[0]['rss_before'])}, map workers {gib(ranks[0]['workers_peak_rss'])})  "
              f"rank1 {gib(ranks[1]['peak_rss'])} (+{gib(ranks[1]['peak_rss'] - ranks[1]['rss_before'])})  "
              f"examples {ranks[0]['examples']}  load {load:.1f}", flush=True)
        out = Path(args.out)  # after every case: a long run keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(f"written: {out} (data and cache in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
