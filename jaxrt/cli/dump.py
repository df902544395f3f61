"""jaxrt dump MODEL: print a model's IR (frontend output, or after -p PIPELINE).

MODEL may be `jax:MODULE:ATTR`, a JAX or Flax model in the user's own code
(jaxrt/cli/_jax_spec.py): its IR as imported (`--stage import`) or raised and given its
KV cache (`--stage raise`, the default), with `--stats` for what each raising rule did
and why rules declined."""
from __future__ import annotations

import argparse
import sys

from jaxrt.errors import SettingError

from ._common import write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir, alias, or "
                                 "jax:MODULE:ATTR (a JAX/Flax model in your code)")
    p.add_argument("-p", "--pipeline", default="",
                   help="passes to run first (default: none, the frontend's IR)")
    p.add_argument("--stage", choices=("import", "raise"), default="raise",
                   help="jax: models: the IR as imported, or raised with its KV cache")
    p.add_argument("--stats", action="store_true",
                   help="jax: models: per-rule raising counts and misses, on stderr")
    p.add_argument("-o", "--output", help="write here instead of stdout")


def run(args) -> int:
    from ._jax_spec import import_and_raise, is_jax_spec
    if is_jax_spec(args.model):
        module, stats = import_and_raise(args.model, stage=args.stage, stats=args.stats)
        if args.pipeline:
            from jaxrt.passes import PassManager
            from jaxrt.passes.manager import VerifyHook
            PassManager(args.pipeline, [VerifyHook()]).run(module)
        if args.stats:
            print(raise_report(module, stats), file=sys.stderr)
        write_text(str(module), args.output)
        return 0
    if args.stats or args.stage != "raise":
        raise SettingError("--stats and --stage apply to jax:MODULE:ATTR models")
    from jaxrt.compiler import load
    write_text(str(load(args.model, pipeline=args.pipeline).module), args.output)
    return 0


def raise_report(module, stats) -> str:
    """Ops after raising, each rule's matches, and why rules declined."""
    from collections import Counter
    if stats is None:
        return "(--stage import: nothing raised)"
    fn = next(iter(module.functions.values()))
    ops = Counter(op.opdef.name for op in fn.ops)
    lines = ["ops after raising: " + ", ".join(f"{n} {c}" for n, c in sorted(ops.items())),
             stats.table(rules=True)]
    misses = module.attributes.get("raise_misses") or {}
    lines += [f"declined {rule}: {why}" for rule, why in sorted(misses.items())]
    return "\n".join(lines)
