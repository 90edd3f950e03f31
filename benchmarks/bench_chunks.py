"""A generate worker's chunks one at a time against all in one engine run (``vocabtrim.chunk_stream``).

    python benchmarks/bench_chunks.py                      # target alone
    python benchmarks/bench_chunks.py --drafter-layers 4   # with the bundled model's 4-layer truncation
    python benchmarks/bench_chunks.py --engine vllm        # vLLM's CPU build, target alone

The worker's own code on the bundled SmolLM2-135M, without Ray: the shipped chat prompts cut into chunks of
``--rows-per-task`` rows (generate's default: 4 batches), fed as the driver feeds an actor (``IN_FLIGHT`` chunks
out at a time, the next sent as one comes back). ``one at a time``: each chunk its own engine call, as workers
ran before; ``one run``: the chunks' rows in one run (``ChunkStream``). Each setting runs in its own process
(``--threads`` torch threads), the settings interleaved, ``--rounds`` times; the table gives ranges over rounds.
Tokens/s are over the whole job; the completions must be identical ("same").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ("one at a time", "one run")


def run_setting(spec: dict) -> dict:
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, os.path.dirname(HERE))
    from vocabtrim.chunk_stream import ChunkStream
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.generate import IN_FLIGHT, _is_out_of_memory, _release_memory, generate_chunk
    from vocabtrim.models import load_pair

    pair = load_pair("smollm2-135m", None, drafter_layers=spec["drafter_layers"], dtype="float32", device="cpu",
                     need_drafter=spec["drafter_layers"] is not None)
    tok = pair.tokenizer
    rows = pq.read_table(resources.files("vocabtrim") / "data" / "prompts.parquet").to_pylist()[: spec["prompts"]]
    prompts = [r["messages"] for r in rows]
    keys = [f"row-{i}" for i in range(len(prompts))]
    if spec["engine"] == "vllm":
        from vocabtrim.models import resolve_model
        from vocabtrim.vllm_backend import VllmEngine

        engine = VllmEngine(resolve_model("smollm2-135m"), None, temperature=0.0, eos_token_ids=(tok.eos_token_id,),
                            max_new_tokens=spec["max_new_tokens"], dtype="float32", max_num_seqs=spec["batch_size"])
    else:
        engine = make_engine(pair.target, pair.drafter, None, sampling=SamplingParams(temperature=0),
                             batch_size=spec["batch_size"], eos_token_ids=(tok.eos_token_id,),
                             max_new_tokens=spec["max_new_tokens"])
    engine.generate([[1, 2, 3]] * 2, [0, 1], max_new_tokens=4)  # warm-up
    stream = ChunkStream(engine, spec["batch_size"], spec["threads"], _is_out_of_memory, _release_memory) \
        if spec["setting"] == "one run" else None
    step = spec["rows_per_task"]
    pieces = [(prompts[i : i + step], keys[i : i + step]) for i in range(0, len(prompts), step)]

    lock = threading.Lock()  # the tokenizer, used from one thread at a time (as the worker's)

    def one(piece):
        return generate_chunk(engine, tok, piece[0], piece[1], seed=0, max_prompt_tokens=4096, stream=stream,
                              encode_lock=lock)

    start = time.perf_counter()
    if stream is None:
        results = [one(p) for p in pieces]
    else:  # IN_FLIGHT chunks out at a time, as the driver keeps them
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            results = list(pool.map(one, pieces))
    seconds = time.perf_counter() - start
    completions = [c for r in results for c in r["columns"]["completion"]]
    tokens = sum(t for r in results for t in r["columns"]["completion_tokens"])
    stepped = sum(r["stats"]["target_rows_stepped"] for r in results)
    slots = sum(r["stats"]["slot_passes"] for r in results)
    if hasattr(engine, "close"):
        engine.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "occupancy": stepped / slots if stepped else None,  # vLLM does not report its batches
            # vLLM's are per row, from its token counts: not its batched passes
            "target_passes": None if spec["engine"] == "vllm" else sum(r["stats"]["target_passes"] for r in results),
            "completions": completions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--rows-per-task", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--drafter-layers", type=int, default=None)
    p.add_argument("--engine", choices=("native", "vllm"), default="native", help="vllm: target alone only")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.setting:
        print(json.dumps(run_setting(json.loads(args.setting))))
        return
    base = {"prompts": args.prompts, "rows_per_task": args.rows_per_task, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "drafter_layers": args.drafter_layers, "threads": args.threads,
            "engine": args.engine}
    if args.engine == "vllm" and args.drafter_layers is not None:
        p.error("--engine vllm runs the target alone here")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--setting", json.dumps({**base, "setting": setting})],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}, {setting}: {runs[setting][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    what = "target alone" if args.drafter_layers is None else f"{args.drafter_layers}-layer drafter, gamma auto"
    what += ", vLLM" if args.engine == "vllm" else ", native engine"
    print(f"\n{args.prompts} shipped prompts in chunks of {args.rows_per_task}, batch {args.batch_size}, up to "
          f"{args.max_new_tokens} new tokens (EOS ends a row), greedy, {what}; {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds\n")
    print("| setting | tokens/s | ratio | occupancy | target passes | same completions |")
    print("|---|---|---|---|---|---|")
    ref = runs[SETTINGS[0]]
    for setting in SETTINGS:
        rs = runs[setting]
        tps = [x["tokens_per_s"] for x in rs]
        ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(rs, ref)]
        same = all(x["completions"] == ref[0]["completions"] for x in rs)
        occupancy = [x["occupancy"] for x in rs if x["occupancy"] is not None]
        occupancy = f"{min(occupancy):.2f}–{max(occupancy):.2f}" if occupancy else "–"
        passes = [x["target_passes"] for x in rs if x["target_passes"] is not None]
        passes = f"{min(passes)}–{max(passes)}" if passes else "–"
        print(f"| {setting} | {min(tps):.1f}–{max(tps):.1f} | {min(ratios):.2f}–{max(ratios):.2f}× | {occupancy} | "
              f"{passes} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
