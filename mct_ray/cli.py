"""`mct-ray` console command: run | experts | distill | eval | grid | config.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from mct_ray import formats, pipeline
from mct_ray import storage as layout
from mct_ray.config import Config, load_config
from mct_ray.errors import ConfigError, MctRayError
from mct_ray.evaluate import evaluate
from mct_ray.storage import Storage

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
        if name in ("run", "distill"):
            p.add_argument("--resume", action="store_true",
                           help="continue from <out>/state.safetensors if present")
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


def cmd_experts(cfg: Config, args: argparse.Namespace) -> dict:
    store = Storage.open(cfg.run.out, check=True)
    store.write_json(layout.CONFIG, cfg.to_dict())
    ctx = pipeline.Context.build(cfg)
    results = pipeline.generate_experts(ctx, store)
    return {"experts": len(results), "expert_test_acc": [r.test_acc for r in results]}


def cmd_distill(cfg: Config, args: argparse.Namespace, ctx=None) -> dict:
    started = time.perf_counter()
    store = Storage.open(cfg.run.out, check=True)
    experts = Storage.open(getattr(args, "experts", None) or cfg.run.out)
    ctx = ctx or pipeline.Context.build(cfg)
    trajectories = pipeline.load_experts(experts, ctx.spec, full=cfg.distill.method == "mtt")
    store.write_json(layout.CONFIG, cfg.to_dict())
    outcome = pipeline.run_distillation(ctx, store, trajectories, resume=args.resume)
    baseline = pipeline.run_baseline(ctx) if cfg.eval.baseline else None
    return pipeline.finish(ctx, store, outcome, started, experts, baseline)


def cmd_run(cfg: Config, args: argparse.Namespace) -> dict:
    store = Storage.open(cfg.run.out, check=True)
    store.write_json(layout.CONFIG, cfg.to_dict())
    ctx = pipeline.Context.build(cfg)
    if not (args.resume and store.list(layout.EXPERTS, ".safetensors")):
        pipeline.generate_experts(ctx, store)
    return cmd_distill(cfg, args, ctx)


def cmd_eval(cfg: Config, args: argparse.Namespace) -> dict:
    store = Storage.open(cfg.run.out, check=True)
    ctx = pipeline.Context.build(cfg)
    source, name = pipeline.synthetic_source(store, args.synthetic)
    images, labels, step, info = formats.load_synthetic(source.read_bytes(name),
                                                        source.uri_of(name), ctx.spec)
    result = evaluate(ctx.spec, images, labels, step, ctx.data, cfg.eval, cfg.augment,
                      cfg.seed, int(info.get("iteration", 0)), tag="final", device=ctx.device)
    return pipeline.write_eval(store, cfg, result, source.uri_of(name))


COMMANDS = {"run": cmd_run, "experts": cmd_experts, "distill": cmd_distill, "eval": cmd_eval}


def _commands(local: bool) -> dict:
    """The single-process commands, or their Ray versions (imported only when used)."""
    if local:
        return COMMANDS
    if not os.environ.get("RAY_ADDRESS"):
        # A Ray started for one job serves only this machine: keep it on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from mct_ray.runtime.driver import COMMANDS as ray_commands

    return ray_commands


def cmd_grid(args: argparse.Namespace):
    """The grid, always on Ray (Tune); its summary table is printed before the JSON."""
    _commands(local=False)
    from mct_ray.runtime.grid import run_grid

    if args.resume and not args.out:
        raise ConfigError("--resume needs the --out of the grid to continue")
    name = (args.spec or "digits").rsplit("/", 1)[-1].split(".")[0]
    out = args.out or f"runs/grid-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_grid(args.spec, args.overrides, out, args.resume)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "grid", "config", "-h", "--help"):
        argv = ["run", *argv]
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "config":
            print(load_config(args.recipe, args.overrides).to_json())
            return 0
        if args.command == "grid":
            grid = cmd_grid(args)
            print(grid.table)
            result, out = grid.to_dict(), grid.out
        else:
            cfg = _config(args)
            result, out = _commands(args.local)[args.command](cfg, args), cfg.run.out
    except MctRayError as exc:
        print(f"mct-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mct-ray: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    print(f"outputs in {out}", file=sys.stderr)
    if args.command == "grid" and grid.failed:
        first = next(iter(grid.failed.items()))
        print(f"mct-ray: error: {len(grid.failed)} grid cell(s) failed (first: {first[0]}: "
              f"{first[1]}); continue with --resume --out {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
