"""Command-line parsing shared by the jobs: ``--config``, ``--set a.b=v`` and one flag per config field."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import textwrap

from pipeline.config import ConfigurationError, PipelineConfig, field_docs, load_config, parse_override

EXIT_CONFIG = 2  #: invalid configuration (also argparse's usage errors)
EXIT_NO_INPUT = 3  #: the input cannot be read (listing denied, manifest missing) or names no videos
EXIT_LOCKED = 75  #: another run holds the output's lock (EX_TEMPFAIL: try again later)


def build_parser(prog: str, description: str, config_required: bool = True) -> argparse.ArgumentParser:
    epilog = ["configuration fields (YAML sections; override any with --<field> VALUE or --set <field>=VALUE,",
              "e.g. --decode.num_frames 16 or --set model.source=s3://bucket/models/llava/):", ""]
    for name, type_name, default, desc in field_docs(PipelineConfig):
        epilog.append(f"  {name}  [{type_name}, default {default}]")
        epilog += textwrap.wrap(desc, width=100, initial_indent="      ", subsequent_indent="      ")
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog="\n".join(epilog), formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} {'--config FILE' if config_required else '[--config FILE]'} [--set FIELD=VALUE ...] [--FIELD VALUE ...]",
    )
    parser.add_argument("--config", required=config_required, help="YAML configuration file.")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="Override one field by its dotted name (repeatable); VALUE is parsed as YAML.")
    parser.add_argument("--print-config", action="store_true", help="Validate, print the resolved configuration and exit.")
    parser.add_argument("--summary-json", metavar="PATH", help="Also write the run summary as JSON to PATH.")
    parser.add_argument("--log-level", default="INFO", help="Python log level (default INFO).")
    for name, _type, _default, _desc in field_docs(PipelineConfig):  # documented in the epilog
        parser.add_argument(f"--{name}", dest=f"field__{name}", metavar="VALUE", default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None, prog: str, description: str, config_required: bool = True,
                 defaults: dict | None = None) -> tuple[PipelineConfig, argparse.Namespace]:
    """Parse arguments into a validated config; exits with status 2 and a readable message when invalid."""
    parser = build_parser(prog, description, config_required)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict = {}
    try:
        for item in args.set:
            key, value = parse_override(item)
            overrides[key] = value
        for key, value in vars(args).items():
            if key.startswith("field__") and value is not None:
                overrides[key[len("field__"):]] = parse_override(f"x={value}")[1]
        cfg = load_config(args.config, overrides, data=defaults)
    except ConfigurationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args


@contextlib.contextmanager
def reported_errors(prog: str):
    """Turn the errors a user can act on into one line on stderr and an exit status (no traceback):
    configuration (2), input that cannot be listed or has no videos (3), output locked by another run or lock lost (75)."""
    from pipeline.lock import LockHeld, LockLost
    from pipeline.sources import SourceError

    try:
        yield
    except ConfigurationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except SourceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_NO_INPUT) from None
    except (LockHeld, LockLost) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_LOCKED) from None
