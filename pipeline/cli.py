"""The jobs' command line, from pydantic-settings: ``--config FILE``, one ``--<section>.<field> VALUE`` flag per
config field (``--help`` lists them with type, default and description), ``--set FIELD=VALUE`` overrides, and
the job entry helper :func:`job_main` every ``jobs/*.py`` module calls."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from pydantic import Field, ValidationError, create_model
from pydantic_settings import (
    BaseSettings,
    CliImplicitFlag,
    CliSettingsSource,
    CliSuppress,
    SettingsConfigDict,
    SettingsError,
)

from pipeline.config import ConfigurationError, PipelineConfig, load_config, to_yaml
from pipeline.renames import NEW_PLACES


class JobOptions(BaseSettings):
    """What every job takes besides the configuration fields (a job may subclass it to add its own)."""

    model_config = SettingsConfigDict(populate_by_name=True, cli_hide_none_type=True, cli_avoid_json=True,
                                      cli_use_class_docs_for_groups=True)

    config: str | None = Field(None, description="YAML configuration file (sections as printed by --print-config).")
    print_config: CliImplicitFlag[bool] = Field(False, alias="print-config", description="Validate, print the "
                                                "resolved configuration (current field names) and exit.")
    summary_json: str | None = Field(None, alias="summary-json", description="Also write the run summary as JSON here.")
    log_level: str = Field("INFO", alias="log-level", description="Python log level.")


def _cli_model(options: type[JobOptions], description: str) -> type[BaseSettings]:
    """``options`` plus every config section (flags are only parsed here; :func:`load_config` validates them on top
    of the file and the defaults) plus the old sections, hidden from ``--help``, whose fields
    :mod:`pipeline.renames` moves (``--stages.fused_actors 2`` still works)."""
    sections = {name: (f.annotation, Field(description=f.description) if f.is_required() else
                       Field(f.get_default(call_default_factory=True), description=f.description))
                for name, f in PipelineConfig.model_fields.items()}
    old = {s: {n.split(".")[1]: (Any, None) for n in NEW_PLACES if n.startswith(s + ".")}
           for s in ("dycoke", "stages")}
    hidden = {s: (CliSuppress[create_model(f"old_{s}", **fields) | None], None) for s, fields in old.items()}
    return create_model("Job", __base__=options, __doc__=description, **sections, **hidden)


def job_main(argv: list[str] | None, prog: str, description: str,
             body: Callable[[PipelineConfig, Any], tuple[str, dict | None]], *, options: type[JobOptions] = JobOptions,
             defaults: dict | None = None, config_required: bool = True) -> int:
    """The whole entry point of a job: parse ``argv`` on top of ``defaults`` (invalid configuration: exit status 2
    and a message naming the field), ``--print-config``, run ``body(cfg, options)`` with the errors a user can act
    on turned into exit statuses (:func:`reported_errors`), print its text, write ``--summary-json``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        usage=f"{prog} {'--config FILE' if config_required else '[--config FILE]'} [--set FIELD=VALUE ...] "
              "[--SECTION.FIELD VALUE ...]",
        epilog="Flag values: 16, null, lists as [a, b] or a repeated flag, objects as JSON. Precedence: flags over "
               "--set over the file. Renamed fields of earlier releases still work, with a warning naming the new place.")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="Override one field by its dotted name (repeatable); VALUE is parsed as YAML.")
    source = CliSettingsSource(_cli_model(options, description), root_parser=parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        parsed = source(parsed_args=args)()
        opts = options.model_validate({k: parsed.pop(k) for k in [f.alias or n for n, f in options.model_fields.items()]
                                       if k in parsed})
    except ValidationError as exc:
        parser.error("; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except (SettingsError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config_required and not opts.config:
        parser.error("the following arguments are required: --config")
    with reported_errors(prog):
        cfg = load_config(opts.config, args.set, data=defaults, cli=parsed)
        if opts.print_config:
            print(to_yaml(cfg))
            return 0
        text, summary = body(cfg, opts)
    print(text)
    if opts.summary_json and summary is not None:
        with open(opts.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


@contextlib.contextmanager
def reported_errors(prog: str):
    """Turn the errors a user can act on into one line on stderr and an exit status (no traceback): invalid
    configuration 2 (as argparse's usage errors), input unreadable or without videos 3, output locked 75
    (EX_TEMPFAIL: try again later)."""
    from pipeline.lock import LockHeld, LockLost
    from pipeline.sources import SourceError

    try:
        yield
    except (ConfigurationError, SourceError, LockHeld, LockLost) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, ConfigurationError) else 3 if isinstance(exc, SourceError) else 75) from None
