"""`mct-ray` console command: run | experts | distill | eval | grid | config.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from typing import Callable

from mct_ray import layout, pipeline, plan, preflight, runfolder
from mct_ray.runtime import shell
from mct_ray.config import Config, load_config
from mct_ray.context import Context, Launch
from mct_ray.errors import ConfigError, MctRayError
from mct_ray.progress import configure_logging
from mct_ray.storage import Storage, parent_and_name

log = logging.getLogger("mct_ray")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mct-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for name, help_text in (("run", "experts, distillation, evaluation, report (default)"),
                            ("experts", "train expert trajectories into <out>/experts"),
                            ("distill", "distill from the experts of --experts (or --out)"),
                            ("eval", "evaluate <out>/synthetic.safetensors")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--recipe", "--config", dest="recipe", default="digits",
                       help="named recipe (default: digits) or a .yaml/.json config file")
        p.add_argument("--out", default=None, help="run folder or URI "
                       "(default: runs/<recipe>-<timestamp>)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. distill.ipc=10 seed=3")
        if name == "distill":
            p.add_argument("--experts", default=None, help="run folder holding experts/")
        if name in ("run", "distill", "experts"):
            p.add_argument("--resume", action="store_true",
                           help="continue the run in --out: train only missing experts, "
                           "distill from <out>/state.safetensors")
            p.add_argument("--overwrite", action="store_true",
                           help="replace what a run in --out already holds")
        if name == "eval":
            p.add_argument("--synthetic", default=None, help="a synthetic .safetensors file")
        p.add_argument("--local", action="store_true",
                       help="run in this one process, without Ray (default: on the Ray "
                       "cluster of RAY_ADDRESS, or a local Ray started for the job)")
    c = sub.add_parser("config", help="print the resolved config as JSON (nothing runs)")
    c.add_argument("--recipe", "--config", dest="recipe", default="digits",
                   help="named recipe (default: digits) or a .yaml/.json config file")
    c.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. distill.method=mtt")
    g = sub.add_parser("grid", help="data sets x ipc x method x seed on Ray Tune")
    g.add_argument("--spec", default=None, help="named grid (default: digits) or a .yaml file")
    g.add_argument("--out", default=None, help="grid folder or URI "
                   "(default: runs/grid-<spec>-<timestamp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the grid in --out: only its unfinished cells run")
    g.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every cell, e.g. distill.iterations=100")
    return parser


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.recipe, args.overrides)
    name = args.recipe.rsplit("/", 1)[-1].split(".")[0]
    out = args.out or cfg.run.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.replace(**{"run.out": out})


# What each command does of the run sequence (pipeline.PHASES); `eval` re-scores a set.
COMMAND_PHASES = {"run": ("experts", "distill"), "experts": ("experts",),
                  "distill": ("distill",), "eval": ()}


def run_command(args: argparse.Namespace) -> dict:
    """Check everything that can be checked, take the run folder, then run the command's
    phases on the chosen backend (`shell` says what is checked and written when). The
    folder check is repeated under the lock: another writer may have finished meanwhile."""
    started = time.time()
    cfg = _config(args)
    args.out = cfg.run.out
    phases = COMMAND_PHASES[args.command]
    store = shell.output(cfg.run.out, args.local)
    given = getattr(args, "experts", None)
    experts = Storage.open(given) if given else store
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    runfolder.guard(store, cfg, phases, resume, overwrite, experts_here=not given)
    ctx = Context.build(cfg)
    preflight.check_run(ctx, phases, experts)
    check_room, make_backend = _backends(ctx, args.local, phases)
    with shell.session(store, args.command, None if args.local else cfg.ray, check_room):
        backend = make_backend()
        runfolder.guard(store, cfg, phases, resume, overwrite, experts_here=not given)
        if args.command == "eval":
            source, name = _synthetic_source(store, args.synthetic)
            return pipeline.evaluate_saved(ctx, store, backend, source, name)
        if overwrite:
            runfolder.clear(store, phases, experts_here=not given)
        store.write_json(layout.CONFIG, cfg.to_dict())
        missing = len(pipeline.missing_experts(ctx, experts)) if "experts" in phases else 0
        log.info("%s", plan.estimate(ctx, phases, missing).describe())
        return pipeline.run(ctx, store, backend, phases,
                            Launch(experts, resume, uuid.uuid4().hex, started)).to_dict()


def _backends(ctx: Context, local: bool, phases: tuple[str, ...]
              ) -> tuple[Callable[[bool], None], Callable[[], pipeline.Backend]]:
    """(the room check, the backend) of this process, or of the Ray the session joins: each
    phase's work must fit some node. The Ray modules are imported here, before Ray starts
    and before a SIGTERM can be expected (a signal during a long import reaches library
    code first)."""
    if local:
        return (lambda own_ray: None), (lambda: pipeline.LocalBackend(ctx))
    from mct_ray.runtime.backend import RayBackend, check_room

    return (lambda own_ray: check_room(ctx.cfg, phases)), (lambda: RayBackend(ctx))


def _synthetic_source(store: Storage, synthetic: str | None) -> tuple[Storage, str]:
    """Where `eval` reads: a given file (path or URI), else the run's synthetic set."""
    if not synthetic:
        return store, layout.SYNTHETIC
    folder, name = parent_and_name(synthetic)
    return Storage.open(folder), name


def cmd_grid(args: argparse.Namespace):
    """The grid, always on Ray (Tune); its summary table is printed before the JSON."""
    from mct_ray.runtime.grid import run_grid

    if args.resume and not args.out:
        raise ConfigError("--resume needs the --out of the grid to continue")
    name = (args.spec or "digits").rsplit("/", 1)[-1].split(".")[0]
    out = args.out or f"runs/grid-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_grid(args.spec, args.overrides, out, args.resume)


class Terminated(BaseException):
    """SIGTERM: end the command like Ctrl-C does (locks released, a Ray of its own shut
    down), at any point. A BaseException, as KeyboardInterrupt is: library code that
    catches Exception (some do, around optional imports) must not swallow it."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMAND_PHASES, "grid", "config", "-h", "--help"):
        argv = ["run", *argv]
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    configure_logging()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        if args.command == "config":
            print(load_config(args.recipe, args.overrides).to_json())
            return 0
        if args.command == "grid":
            grid = cmd_grid(args)
            print(grid.table)
            result, out = grid.to_dict(), grid.out
        else:
            result = run_command(args)
            out = args.out
    except MctRayError as exc:
        print(f"mct-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mct-ray: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mct-ray: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps(result, indent=2))
    print(plan.where_to_look(out, COMMAND_PHASES.get(args.command, ())), file=sys.stderr)
    if args.command == "grid" and grid.failed:
        first = next(iter(grid.failed.items()))
        print(f"mct-ray: error: {len(grid.failed)} grid cell(s) failed (first: {first[0]}: "
              f"{first[1]}); continue with --resume --out {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
