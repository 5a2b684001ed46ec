"""Sample completions from a LoopMDM (Hugging Face directory or megatron checkpoint).

    python tools/generate.py --load hf_model --prompt "Once upon a time" \
        --gen-length 32 --steps 32 --block-length 8 \
        [--num-loops S | --loop-schedule 1,2,4,2 | --loop-budget N |
         --adaptive-loops [--loop-stop state|kl|argmax] [--loop-per batch|sample|position]
         [--loop-threshold 0.01] [--loop-patience 1] --min-loops 1 --max-loops 8]
        [--no-loop-schedule] [--temperature 0] [--seed 0] \
        [--remasking low_confidence|random|ancestral] [--cfg-scale 0] [--suppress-eos] \
        [--threshold 0.9 | --factor 1.0] [--cache none|prefix|dual] [--cache-refresh block] \
        [--cache-refresh-every K] \
        [--loop-warm-start] [--prompts-file prompts.jsonl] [--tokenizer DIR] [--device cpu] \
        [--output out.jsonl]

Prints each completion, then a summary: steps, loops per step, loop evaluations, model FLOPs,
tokens/s, time (and the key/value cache's memory with --cache). `--prompts-file` is JSON lines
with a `prompt` (or `text`) field. With no loop flag, a calibrated `loop_schedule.json` in the
--load directory is used (`--no-loop-schedule`: the model's S_max).

    python tools/generate.py --load hf_model --calibrate-loops validation.jsonl \
        [--calibration-target 0.99] [--calibration-parts 4] [--overwrite-loop-schedule] ...

measures the fewest loops per part of the steps that keep S_max's predictions on the prompts
of a validation file (never the test split) and writes `loop_schedule.json` into --load.
"""

import argparse
import json
import sys
from pathlib import Path

import megatron_loopmdm  # noqa: F401  (before torch/megatron imports)
from megatron_loopmdm.inference import REMASKINGS, SCHEDULE_FILE, SamplerConfig, generate
from megatron_loopmdm.inference.arguments import (
    add_loop_policy_arguments,
    add_speed_arguments,
    loop_policy_from_args,
)

import torch

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="HF directory or megatron --save directory")
    parser.add_argument("--iteration", type=int, help="megatron checkpoint iteration")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: the --load dir)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="JSON lines with a 'prompt' or 'text' field")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument(
        "--allow-longer-than-trained",
        action="store_true",
        help="RoPE models: generate past the trained sequence length",
    )
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--remasking", choices=REMASKINGS, default="low_confidence")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--cfg-scale", type=float, default=0.0)
    parser.add_argument("--suppress-eos", action="store_true")
    add_speed_arguments(parser)
    add_loop_policy_arguments(parser)
    parser.add_argument("--calibrate-loops", metavar="VALID.jsonl",
                        help=f"write a calibrated {SCHEDULE_FILE} into --load from these prompts")
    parser.add_argument("--calibration-target", type=float, default=0.99,
                        help="least argmax agreement with S_max per part of the steps")
    parser.add_argument("--calibration-parts", type=int, default=4)
    parser.add_argument("--overwrite-loop-schedule", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="write JSON lines of prompts and completions here")
    return parser.parse_args(argv)


def _read_jsonl_prompts(path) -> list:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if row.get("prompt", row.get("text")) is None:
                    raise ValueError(f"{path}:{n}: no 'prompt' or 'text' field.")
                prompts.append(row.get("prompt", row.get("text")))
    return prompts


def read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_jsonl_prompts(args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts-file FILE.jsonl.")
    return prompts


def load_tokenizer(args):
    from megatron_loopmdm.data.tokenizers import HuggingFaceTokenizer

    path = args.tokenizer or args.load
    if not any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS):
        raise ValueError(
            f"{path} holds no tokenizer: pass --tokenizer DIR (a Hugging Face tokenizer "
            "directory), or convert with tools/convert_checkpoint_to_hf.py --tokenizer DIR."
        )
    return HuggingFaceTokenizer(str(path))


def completion_text(tokenizer, ids: list) -> str:
    if tokenizer.eod is not None and tokenizer.eod in ids:
        ids = ids[: ids.index(tokenizer.eod)]
    return tokenizer.detokenize(ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_loopmdm.hf import load_for_inference
    from megatron_loopmdm.hf.input_checks import check_sequence_length, check_tokenizer_matches

    try:
        prompts = [] if args.calibrate_loops else read_prompts(args)
        tokenizer = load_tokenizer(args)
        config = SamplerConfig(
            gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
            remasking=args.remasking, temperature=args.temperature, cfg_scale=args.cfg_scale,
            suppress_eos=args.suppress_eos, eos_token_id=tokenizer.eod,
            loops=loop_policy_from_args(args),
            threshold=args.threshold, factor=args.factor, cache=args.cache,
            cache_refresh=args.cache_refresh, cache_refresh_every=args.cache_refresh_every,
            loop_warm_start=args.loop_warm_start,
        )  # fmt: skip
        model = load_for_inference(args.load, device=args.device, iteration=args.iteration)
        check_tokenizer_matches(model.config, tokenizer)
        if args.calibrate_loops:
            return calibrate(args, model, tokenizer, config)
        longest = max(len(tokenizer.tokenize(p)) for p in prompts) + args.gen_length
        check_sequence_length(model.config, longest, args.allow_longer_than_trained)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    generator = torch.Generator().manual_seed(args.seed)
    records, results = [], []
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        result = generate(
            model, [tokenizer.tokenize(p) for p in batch], config,
            pad_token_id=tokenizer.pad if tokenizer.pad is not None else tokenizer.eod,
            generator=generator,
        )  # fmt: skip
        results.append(result)
        for prompt, ids in zip(batch, result.generated.tolist()):
            text = completion_text(tokenizer, ids)
            records.append({"prompt": prompt, "completion": text, "token_ids": ids})
            print(f"=== prompt: {prompt!r}\n{prompt}{text}\n")
    loops = [n for r in results for n in r.loops_per_step]
    seconds = sum(r.seconds for r in results)
    evaluations = sum(r.loop_evaluations for r in results)
    flops = sum(r.model_flops or 0.0 for r in results)
    tokens = len(prompts) * args.gen_length
    print(f"loops: {results[0].loop_policy}")
    steps_run = sum(r.steps_run for r in results)
    print(f"steps: {args.steps} per batch, {len(results)} batch(es), {steps_run} run")
    print(f"loops per step: {','.join(map(str, loops))}")
    print(f"loop evaluations: {evaluations} (mean {evaluations / max(len(loops), 1):.2f} per pass)")
    per_sample = sum(int(r.loops_per_row.sum()) for r in results) / len(prompts)
    print(f"loop evaluations per sample: {per_sample:.2f} "
          f"({per_sample / args.gen_length:.3f} per generated token)")  # fmt: skip
    positions = sum(r.active_position_loops for r in results)
    probes = sum(r.probe_evaluations for r in results)
    print(f"active position-loops: {positions}, probes: {probes}")
    print(f"model FLOPs: {flops:.4g}")
    print(f"tokens/s: {tokens / max(seconds, 1e-9):.1f}")
    print(f"time: {seconds:.2f} s")
    if args.cache != "none":
        per_entry = results[0].cache_bytes_per_token_per_layer_per_loop
        most = max(r.cache_bytes for r in results)
        print(f"kv cache: {most} bytes ({per_entry} per token per layer per loop)")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return 0


def calibrate(args, model, tokenizer, config) -> int:
    """Writes the calibrated loop schedule of --calibrate-loops' prompts into --load."""
    from megatron_loopmdm.inference.calibration import calibrate_loop_schedule
    from megatron_loopmdm.inference.loops import write_loop_schedule

    target = Path(args.load) / SCHEDULE_FILE
    if not (Path(args.load) / "config.json").is_file():
        raise ValueError(
            f"--calibrate-loops writes {SCHEDULE_FILE} next to a Hugging Face model: convert "
            f"{args.load} with tools/convert_checkpoint_to_hf.py first."
        )
    if target.exists() and not args.overwrite_loop_schedule:
        raise ValueError(f"{target} exists: pass --overwrite-loop-schedule to replace it.")
    if Path(args.calibrate_loops).stem.lower().startswith("test"):
        raise ValueError(
            f"--calibrate-loops {args.calibrate_loops}: calibrate on a validation split, "
            "never on the test split."
        )
    prompts = [tokenizer.tokenize(p) for p in _read_jsonl_prompts(args.calibrate_loops)]
    record = calibrate_loop_schedule(
        model, prompts, config, num_parts=args.calibration_parts,
        target=args.calibration_target, max_loops=args.max_loops or args.num_loops,
        batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    record["calibration_file"] = str(args.calibrate_loops)
    write_loop_schedule(args.load, record)
    print(f"calibrated schedule {','.join(map(str, record['schedule']))} "
          f"(target {record['target']}, S_max {record['max_loops']}) -> {target}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
