"""vLLM's own benchmark client (`vllm bench serve`, the judge no one here wrote) against several
OpenAI-compatible servers, alternated round by round, with each figure's median over the rounds.

    python -m scripts.vllm_bench --target bare=http://127.0.0.1:8001 \\
        --target gateway=http://127.0.0.1:8000 --rounds 3 --concurrency 1 --num-prompts 100

`--setup NAME="COMMAND"` runs a shell command before each of that target's runs (for example a
`serve deploy` of live settings, to compare two settings of one gateway). The workload is vLLM's
`random` dataset (`--input-len`, `--output-len`, exact output lengths), streaming chat
completions; each run's JSON goes to `--result-dir`. The `vllm` command itself looks up the
package named `vllm`, which the CPU build is not called, so this calls its module directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = {
    "output tok/s": "output_throughput",
    "TTFT p50 ms": "median_ttft_ms",
    "TTFT p99 ms": "p99_ttft_ms",
    "ITL p50 ms": "median_itl_ms",
}
RUNNER = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def run_once(args: argparse.Namespace, name: str, url: str, round_: int) -> dict:
    filename = f"{name}-c{args.concurrency}-{round_}.json"
    command = [
        sys.executable, "-c", RUNNER,
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url, "--model", args.model, "--tokenizer", args.tokenizer,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
        "--num-warmups", str(min(args.concurrency, 8)), "--percentile-metrics", "ttft,itl,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", args.result_dir,
        "--result-filename", filename,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(args.result_dir) / filename).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", action="append", required=True, help="NAME=URL; the first is the baseline"
    )
    parser.add_argument("--setup", action="append", default=[], help='NAME="shell command"')
    parser.add_argument("--model", default="tiny-chat")
    parser.add_argument("--tokenizer", default="models/tiny-chat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--result-dir", default="results")
    parser.add_argument("--out", help="also write the medians as JSON here")
    args = parser.parse_args()
    targets = dict(target.split("=", 1) for target in args.target)
    setups = dict(setup.split("=", 1) for setup in args.setup)
    Path(args.result_dir).mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    for round_ in range(args.rounds):
        # A, B, ... then ..., B, A: neither target always runs first on a warmer machine.
        order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
        for name in order:
            if name in setups:
                subprocess.run(setups[name], shell=True, check=True)
            runs[name].append(run_once(args, name, targets[name], round_))
    medians = {
        name: {figure: statistics.median(r[key] for r in results) for figure, key in FIGURES.items()}
        for name, results in runs.items()
    }
    baseline = next(iter(targets))
    print(f"concurrency {args.concurrency}, {args.rounds} rounds, medians:")
    for name, figures in medians.items():
        cells = ", ".join(f"{figure} {value:.1f}" for figure, value in figures.items())
        ratio = figures["output tok/s"] / medians[baseline]["output tok/s"]
        delta = figures["TTFT p50 ms"] - medians[baseline]["TTFT p50 ms"]
        print(f"  {name}: {cells}; tok/s {ratio:.2f}x, TTFT p50 {delta:+.1f} ms vs {baseline}")
    for name, results in runs.items():
        print(f"  {name} runs: " + "; ".join(
            f"{r['output_throughput']:.0f} tok/s, TTFT p50 {r['median_ttft_ms']:.1f} ms" for r in results
        ))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"medians": medians, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
