"""`moejax` command line: generate, chat, and the subcommands other modules register.

A failing command prints one line on stderr naming what failed and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> module with add_arguments(parser) and run(args) -> int, imported only when used.
SUBCOMMANDS = {
    "generate": ("moejax.cli_generate", "generate text from prompts"),
    "chat": ("moejax.cli_generate", "interactive chat using the model's chat template"),
}


def register(name: str, module: str, help_text: str) -> None:
    SUBCOMMANDS[name] = (module, help_text)


def _optional_subcommands() -> None:
    for name, module, text in (
        ("plan", "moejax.plan.cli", "memory plan for a model on a mesh"),
        ("convert", "moejax.checkpoints.convert", "convert a HF checkpoint to a moejax (Orbax) checkpoint"),
        ("serve", "moejax.server.cli", "OpenAI-compatible HTTP server"),
        ("bench", "moejax.bench", "benchmarks"),
    ):
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is not None:
            try:
                if importlib.util.find_spec(module) is not None:
                    register(name, module, text)
            except ModuleNotFoundError:
                pass


def build_parser() -> argparse.ArgumentParser:
    _optional_subcommands()
    parser = argparse.ArgumentParser(prog="moejax", description="Mixture-of-Experts inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args.command}", None) or mod.run
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        print("moejax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"moejax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
