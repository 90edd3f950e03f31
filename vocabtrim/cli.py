"""The ``vocabtrim`` command: flags → one config object per command → the stage functions.

Each command lives in ``vocabtrim/commands/<name>.py`` with ``add_arguments(parser)`` and
``main(args) -> int``. A ``UserError`` anywhere becomes one line on stderr and exit code 2; a
``validate.SettingError`` names the flag of the setting it is about.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from vocabtrim import __version__
from vocabtrim.errors import RunFailed, UserError, first_line, machine_fault, stop_on_signal, stopped_by
from vocabtrim.ray_utils import check_reachable, cluster_address, user_error_in
from vocabtrim.validate import SettingError

COMMANDS = {
    "calibrate": ("vocabtrim.commands.calibrate", "count token ids over a corpus on a Ray actor pool"),
    "build-head": ("vocabtrim.commands.build_head", "keep the top-K ids and write the trimmed drafter head"),
    "generate": ("vocabtrim.commands.generate", "batched speculative decoding over Parquet prompts on Ray"),
    "train-drafter": ("vocabtrim.commands.train_drafter", "train an EAGLE-3 drafter for a target (SpecForge layout)"),
    "demo": ("vocabtrim.commands.demo", "calibrate, build a head and generate on the bundled model"),
    "sweep": ("vocabtrim.commands.sweep", "K sweep and calibration-source ablation, with a report"),
}


DESCRIPTION = (
    "Trimmed drafter heads from corpus token counts, and lossless batched speculative decoding on Ray. "
    "Run `vocabtrim COMMAND --help` for a command's flags."
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help when it has a default worth stating (not None, not a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default == ""
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(setting: str) -> str:
    """The flag of a config field: every command names its flags after its config's fields (``top_p``: ``--top-p``)."""
    return "--" + setting.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vocabtrim", description=DESCRIPTION)
    log_help = "how much vocabtrim logs on stderr; INFO adds what each stage is doing (default: $VOCABTRIM_LOG, else WARNING)"
    parser.add_argument("--log-level", default=os.environ.get("VOCABTRIM_LOG", "WARNING"), type=str.upper, choices=LOG_LEVELS,
                        help=log_help)
    parser.add_argument("--version", action="version", version=f"vocabtrim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        # also after the command (``vocabtrim generate --log-level INFO``, and in jobs/*.py); unset there, the
        # value before the command stands
        p.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS, help=log_help)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level, logging.WARNING), format="%(message)s")
    # SIGTERM (a pod's or a job's stop) stops the run as Ctrl-C does: workers stopped, --out released, one line
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, stop_on_signal) if main_thread else None
    try:
        return _run(args)
    finally:
        if main_thread and before is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, before)


def _run(args) -> int:
    try:
        try:
            address = cluster_address(args.address) if getattr(args, "uses_ray", hasattr(args, "address")) else None
            if address:
                check_reachable(address)  # before any work (init_ray checks again where it is called from code)
            code = args._main(args)
        except Exception as exc:  # a UserError raised inside a Ray actor arrives wrapped: unwrap it
            unwrapped = user_error_in(exc) if getattr(exc, "cause", None) is not None else None
            if unwrapped is None:
                raise
            raise unwrapped from exc
    except SettingError as exc:
        print(f"vocabtrim {args.command}: error: {flag(exc.setting)} {exc.rule}", file=sys.stderr)
        return exc.exit_code
    except (UserError, RunFailed) as exc:  # one line, whatever a message quotes (a column name, a manifest's value)
        print(f"vocabtrim {args.command}: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        signum = stopped_by(forget=True)
        print(f"vocabtrim {args.command}: {'stopped by ' + signal.Signals(signum).name if signum else 'interrupted'}; "
              "rerun the same command to go on (it resumes from what its --out already holds)", file=sys.stderr)
        return 128 + (signum or signal.SIGINT)
    except Exception as exc:
        if not machine_fault(exc):
            raise  # a bug: its traceback
        logging.getLogger("vocabtrim").info("the fault, in full:", exc_info=True)
        print(f"vocabtrim {args.command}: error: a fault of the machine stopped the run ({type(exc).__name__}: {first_line(exc)}); "
              "rerun the same command (it resumes from what its --out already holds)", file=sys.stderr)
        return RunFailed.exit_code
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
