"""Arguments of %fineinfer and %%generate: the one place that turns a magic's line (and cell)
into a request, or into a one-line FineInferError."""

from __future__ import annotations

import argparse
import shlex

from .client import FineInferError

HELP = """\
%fineinfer status                      engine state, model, adapters
%fineinfer tune NAME --data PATH|VAR [--epochs N] [--max-steps N] [--rank R] [--alpha A]
           [--lr X] [--batch-size N] [--micro-batch-size N] [--max-length N] [--val-fraction F]
           [--warmup-steps N] [--eval-every N] [--checkpoint-every N] [--seed N]
           [--target-modules a,b]      start training at once; shows a live job widget
           --data: a .jsonl, .txt, .json, .csv or .parquet file, a datasets save_to_disk
           folder, or a variable: a DataFrame, a Dataset/DatasetDict, a list of dicts
           (--records VAR: the same, always a variable)
           [--text-column C] [--prompt-column C] [--completion-column C] [--messages-column C]
           without --epochs or --max-steps a small data set trains several epochs
%fineinfer eval NAME [--data PATH|VAR] [--compare base,OTHER] [--limit N] [--max-new-tokens N]
                                       held-out loss, perplexity, exact-match and contains
                                       rates, side by side (default data: the examples its
                                       job held out with --val-fraction)
%fineinfer jobs                        every job and its progress
%fineinfer wait NAME_OR_ID [--timeout S]   block until the job has finished
%fineinfer stop | resume | cancel NAME_OR_ID
%fineinfer adapters                    loaded adapters
%fineinfer load NAME PATH              load a saved PEFT adapter folder
%fineinfer save NAME PATH              write an adapter to a new folder (PEFT format)
%fineinfer delete NAME                 unload an adapter and delete its saved files
%fineinfer export NAME [--to gguf|vllm] [PATH]
                                       for llama.cpp / Ollama (a LoRA .gguf) or vLLM (checked);
                                       prints the commands that use it
%fineinfer export-job NAME_OR_ID [PATH] [--processes N]
                                       a folder that trains the job again on many GPUs or
                                       nodes (accelerate / torchrun); prints the commands
%fineinfer dashboard                   live engine dashboard
%fineinfer connect URL [--token T]     use another server (found on its own otherwise)
%fineinfer restart [--timeout S]       shut the engine down, load the model again, wait for it
%fineinfer help

%%generate [--adapter NAME | --compare base,NAME,...] [--max-new-tokens N] [--temperature T]
           [--top-p P] [--top-k K] [--seed S] [--stop TEXT] [--system TEXT] [--raw]
           [--ttft S] [--tpot S]
<prompt: the cell body; sent as a user message through the chat template, or as is with --raw>"""


def modules(text: str) -> str | list[str]:
    """--target-modules: "all-linear" as is (PEFT's keyword), else a list of module names."""
    return text if text == "all-linear" else [m for m in text.split(",") if m]


TRAIN_OPTIONS = {  # flag -> (TrainParams field, type)
    "--epochs": ("epochs", float),
    "--max-steps": ("max_steps", int),
    "--rank": ("r", int),
    "--alpha": ("lora_alpha", float),
    "--lr": ("learning_rate", float),
    "--batch-size": ("batch_size", int),
    "--micro-batch-size": ("micro_batch_size", int),
    "--max-length": ("max_length", int),
    "--val-fraction": ("val_fraction", float),
    "--warmup-steps": ("warmup_steps", int),
    "--eval-every": ("eval_every", int),
    "--checkpoint-every": ("checkpoint_every", int),
    "--seed": ("seed", int),
    "--target-modules": ("target_modules", modules),
}
COLUMN_OPTIONS = {  # flag -> the part of a record it names (engine/sources.py)
    "--text-column": "text",
    "--prompt-column": "prompt",
    "--completion-column": "completion",
    "--messages-column": "messages",
}
SAMPLING_OPTIONS = {
    "--max-new-tokens": ("max_new_tokens", int),
    "--temperature": ("temperature", float),
    "--top-p": ("top_p", float),
    "--top-k": ("top_k", int),
    "--seed": ("seed", int),
    "--ttft": ("ttft", float),
    "--tpot": ("tpot", float),
}


class HelpShown(Exception):
    """argparse printed help (-h): nothing else to do."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises FineInferError instead of printing usage and exiting."""

    def error(self, message):
        name = self.prog.removeprefix("%fineinfer").strip().lstrip("%")
        raise FineInferError(f"{name}: {message}" if name else message)

    def exit(self, status=0, message=None):
        if status:
            raise FineInferError((message or "bad arguments").strip())
        raise HelpShown


def _line_parser() -> tuple[_Parser, dict]:
    parser = _Parser(prog="%fineinfer", add_help=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for command in ("status", "jobs", "adapters", "dashboard", "help"):
        sub.add_parser(command, prog=f"%fineinfer {command}")
    tune = sub.add_parser("tune", prog="%fineinfer tune")
    tune.add_argument("name")
    evaluate = sub.add_parser("eval", prog="%fineinfer eval")
    evaluate.add_argument("name")
    evaluate.add_argument("--compare", default="base", help="comma-separated; 'none' for none")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    for parser_, required in ((tune, True), (evaluate, False)):
        source = parser_.add_mutually_exclusive_group(required=required)
        source.add_argument(
            "--data", help="a file or folder (relative to the notebook), or a variable"
        )
        source.add_argument("--records", help="a variable: a DataFrame, Dataset or list of dicts")
        for flag, part in COLUMN_OPTIONS.items():
            parser_.add_argument(flag, dest=f"column_{part}", metavar="COLUMN")
    for flag, (dest, kind) in TRAIN_OPTIONS.items():
        tune.add_argument(flag, dest=dest, type=kind)
    for command in ("stop", "resume", "cancel", "wait"):
        p = sub.add_parser(command, prog=f"%fineinfer {command}")
        p.add_argument("job", metavar="NAME_OR_ID")
    sub.choices["wait"].add_argument("--timeout", type=float)
    for command in ("load", "save"):
        p = sub.add_parser(command, prog=f"%fineinfer {command}")
        p.add_argument("name")
        p.add_argument("path")
    sub.add_parser("delete", prog="%fineinfer delete").add_argument("name")
    export = sub.add_parser("export", prog="%fineinfer export")
    export.add_argument("name")
    export.add_argument("path", nargs="?")
    export.add_argument("--to", choices=("gguf", "vllm"), default="gguf")
    restart = sub.add_parser("restart", prog="%fineinfer restart")
    restart.add_argument("--timeout", type=float, default=600)
    export_job = sub.add_parser("export-job", prog="%fineinfer export-job")
    export_job.add_argument("job", metavar="NAME_OR_ID")
    export_job.add_argument("path", nargs="?")
    export_job.add_argument("--processes", type=int)
    connect = sub.add_parser("connect", prog="%fineinfer connect")
    connect.add_argument("url")
    connect.add_argument("--token", default="")
    return parser, sub.choices


def _generate_parser() -> _Parser:
    parser = _Parser(prog="%%generate")
    parser.add_argument("--adapter")
    parser.add_argument("--compare", help="comma-separated adapters, e.g. base,herb")
    for flag, (dest, kind) in SAMPLING_OPTIONS.items():
        parser.add_argument(flag, dest=dest, type=kind)
    parser.add_argument("--stop", action="append")
    parser.add_argument("--system")
    parser.add_argument("--raw", action="store_true")
    return parser


LINE_PARSER, COMMANDS = _line_parser()
GENERATE_PARSER = _generate_parser()


def parse_line(line: str) -> argparse.Namespace:
    words = _split(line)
    if not words:
        raise FineInferError("missing command (try %fineinfer help)")
    if words[0] not in COMMANDS:
        raise FineInferError(f"unknown command {words[0]!r} (try %fineinfer help)")
    if words[0] in ("export", "export-job"):  # PATH may come after an option
        namespace = argparse.Namespace(command=words[0])
        return COMMANDS[words[0]].parse_intermixed_args(words[1:], namespace)
    return LINE_PARSER.parse_args(words)


def parse_generate(line: str, cell: str) -> tuple[list[str | None], dict]:
    """(adapters to ask, GenerateRequest fields) from a %%generate line and cell."""
    args = GENERATE_PARSER.parse_args(_split(line))
    if args.adapter and args.compare:
        raise FineInferError("generate: use --adapter or --compare, not both")
    if args.raw and args.system:
        raise FineInferError("generate: --system needs the chat template; drop --raw")
    prompt = cell.strip("\n")
    if not prompt.strip():
        raise FineInferError("generate: the cell is empty; write the prompt in the cell")
    request = {dest: getattr(args, dest) for dest, _ in SAMPLING_OPTIONS.values()}
    request["stop"] = args.stop
    if args.raw:
        request["prompt"] = prompt
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        request["messages"] = [*system, {"role": "user", "content": prompt}]
    if not args.compare:
        return [args.adapter], request
    adapters = [a.strip() for a in args.compare.split(",") if a.strip()]
    if not adapters or len(set(adapters)) != len(adapters):
        raise FineInferError("generate: --compare takes distinct names, e.g. base,herb")
    return adapters, request


def train_params(args: argparse.Namespace) -> dict:
    """The TrainParams fields a `tune` line set."""
    params = {dest: getattr(args, dest) for dest, _ in TRAIN_OPTIONS.values()}
    return {k: v for k, v in params.items() if v is not None}


def column_map(args: argparse.Namespace) -> dict:
    """{"prompt": "question", ...} from the --<part>-column flags given."""
    parts = {part: getattr(args, f"column_{part}") for part in COLUMN_OPTIONS.values()}
    return {k: v for k, v in parts.items() if v}


def compared(args: argparse.Namespace) -> list[str]:
    """--compare: the models beside the adapter ("none": no other)."""
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if not names or len(set(names)) != len(names):
        raise FineInferError("eval: --compare takes distinct names, e.g. base or base,other")
    return names


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as e:
        raise FineInferError(f"cannot parse the arguments: {e}") from None
