"""The `famex` command: an explicit table of subcommands, each a module with
``configure_parser(parser)`` and ``main(args) -> int``.

Only the chosen subcommand's module is imported, so ``famex --help`` is instant. A subcommand whose
module does not exist yet says which capability is missing and exits non-zero. `FamexError`s are
printed as one line (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

from famex import __version__
from famex.errors import FamexError


@dataclass(frozen=True)
class Command:
    module: str
    summary: str
    capability: str
    """What the command needs to exist, said when its module is not there yet."""


COMMANDS: dict[str, Command] = {
    "data": Command("famex.data.prepare", "tokenize text into token shards with document boundaries and a train/val split",
                    "data preparation"),
    "logits": Command("famex.teacher.generate", "run the teacher once and store its sparse top-k logits (also: logits verify)",
                      "the sparse teacher-logit store"),
    "prune": Command("famex.prune.stage", "cut a smaller student from the teacher (layers, MLP channels, heads, hidden size)",
                     "pruning"),
    "distill": Command("famex.distill.train", "pre-train a student by distillation from the logit store",
                       "the distillation trainer"),
    "sft": Command("famex.posttrain.sft", "supervised fine-tuning on chat data (assistant-only loss)",
                   "post-training (SFT)"),
    "dpo": Command("famex.posttrain.dpo", "direct preference optimization against a frozen reference",
                   "post-training (DPO)"),
    "quantize": Command("famex.quant.stage", "quantize a model: RTN, GPTQ or QAD, optional norm fusion",
                        "the quantization stage"),
    "export": Command("famex.export.stage", "write a deployable checkpoint: hf, compressed-tensors (vLLM) or mlx",
                      "the exporters"),
    "eval": Command("famex.eval.stage", "validation loss, few-shot accuracy, size and speed of any model directory",
                    "evaluation"),
    "report": Command("famex.report.stage", "Markdown report with plots and the Pareto front of a run tree",
                      "the report"),
    "run": Command("famex.run.recipe", "run a whole recipe (TOML) stage by stage, resuming where it stopped",
                   "recipe runs"),
    "verify": Command("famex.verify", "check a stage directory or a whole run tree: files, checksums, status, inputs", "run verification"),
    "info": Command("famex.models.info", "parameter counts and sizes of a preset or model (meta device)",
                    "model info"),
    "cost": Command("famex.eval.costcli", "FLOPs per stage of a recipe or run (the paper's Table 2 convention)",
                    "cost accounting"),
    "average": Command("famex.distill.average", "average the weights of checkpoints (the paper's weight averaging)",
                       "checkpoint averaging"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<9} {cmd.summary}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="famex",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Expand one trained language model into a family of smaller, cheaper models.",
        epilog=f"commands (pipeline order):\n{lines}\n\n`famex COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"famex {__version__}")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 1
    if argv[0] == "--version":
        print(f"famex {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"famex: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    if importlib.util.find_spec(cmd.module) is None:
        print(f"famex {name}: not available in this version — {cmd.capability} is not built yet", file=sys.stderr)
        return 3
    module = importlib.import_module(cmd.module)
    parser = argparse.ArgumentParser(prog=f"famex {name}", description=cmd.summary)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or metric lines")
    module.configure_parser(parser)
    args = parser.parse_args(rest)
    from famex.utils import set_quiet

    set_quiet(args.quiet)
    _quiet_libraries()
    try:
        return int(module.main(args) or 0)
    except FamexError as e:
        print(f"famex {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"famex {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep third-party chatter (xIELU fallbacks, tokenizer fork warnings) off the user's screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
