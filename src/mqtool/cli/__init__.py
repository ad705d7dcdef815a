"""The `mqtool` command line: arguments, progress and exit codes. No algorithms live here.

The commands live in the submodules (stages, evaluation, models); they are registered here, in the
order `mqtool --help` lists them."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from mqtool import __version__
from mqtool.cli import evaluation, models, plotting, stages
from mqtool.cli._common import HUB, JSON_FILE_COMMANDS, err
from mqtool.errors import MqtoolError

app = typer.Typer(
    name="mqtool",
    help="Post-training quantization for Mamba-1 and Mamba-2 language models.\n\n"
    "Every stage reads a checkpoint directory and writes a new one, so stages chain in a shell "
    "pipeline. MODEL is a checkpoint directory, a Hugging Face repo id, or `demo` (the small "
    "embedded Mamba-2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("eval")(evaluation.eval_cmd)
app.command()(evaluation.zeroshot)
app.command()(evaluation.bench)
app.command()(stages.calibrate)
app.command()(models.init)
app.command()(models.generate)
app.command()(models.info)
app.command()(stages.rotate)
app.command()(stages.smooth)
app.command("quantize-states")(stages.quantize_states)
app.command()(stages.reconstruct)
app.command()(stages.quantize)
app.command()(stages.export)
app.command()(models.recipes)
app.command()(evaluation.compare)
app.command()(plotting.plot)
app.command()(evaluation.demo)


def _version(value: bool) -> None:
    if value:
        print(f"mqtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
    revision: Annotated[str | None, typer.Option(help="Hub downloads: the branch, tag or commit of a MODEL that "
                                                 "is a repo id (or write MODEL as owner/name@revision).")] = None,
    token: Annotated[str | None, typer.Option(envvar="HF_TOKEN", show_envvar=False,
                                              help="Hub downloads: the access token of a private or gated repo "
                                              "(default: $HF_TOKEN, else huggingface-hub's saved login).")] = None,
) -> None:
    HUB.update(revision=revision, token=token)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `except BaseException` cleanup (a half-written
    output's temporary directory) runs, as for Ctrl-C; not a KeyboardInterrupt, which typer swallows."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main() -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback; Ctrl-C exits
    130 and SIGTERM 143, both after removing what was half written."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _main()
    finally:
        signal.signal(signal.SIGTERM, previous)  # in-process callers (the tests) get theirs back


def _main() -> None:
    try:
        rc = app(standalone_mode=False)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except MqtoolError as e:
        # one line, never wrapped: scripts grep it (a parser's message may span several: joined)
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        # usage errors (bad option values, unknown commands) carry their own message and exit code;
        # typer may vendor click, so recognise them by what they offer rather than by class
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            hint = _old_json_usage(sys.argv[1:])
            if hint:
                print("error: " + hint, file=sys.stderr)
                sys.exit(2)
            e.show()
            sys.exit(e.exit_code)
        raise
    if rc == 130:  # typer turns Ctrl-C into a return code of 130 (and prints nothing)
        print("interrupted", file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


def _old_json_usage(args: list[str]) -> str | None:
    """The message for `compare/zeroshot ... --json PATH` (how a JSON file was asked for before
    --json became a flag everywhere), when that is what a usage error came from."""
    if not args or args[0] not in JSON_FILE_COMMANDS or "--json" not in args:
        return None
    i = args.index("--json")
    if i + 1 < len(args) and not args[i + 1].startswith("-"):
        return (f"--json is a flag (JSON on stdout); to write a file use --json-out {args[i + 1]}")
    return None
