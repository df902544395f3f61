"""Rules, rule sets and the fixed-point rewrite driver.

    # add(x, 0) -> x
    ADD_ZERO = Rule("add-zero", Pat(ops.add, "x", Const(0.0)), lambda rw, x: x)
    RULES = RuleSet([ADD_ZERO, ...]) + OTHER_RULES        # indexed by root OpDef
    stats = apply_rules(module, RULES)                    # rewrite to a fixed point
    print(stats.table())                                  # attempts/matches/time per rule
    print(explain(fn, "add-zero", "%12"))                 # why it did not fire at %12

A handler is called as `handler(rw, **captures)` and returns the replacement Value (of the
root's type) or None to decline. `rw` builds new ops, which the driver inserts just before
the root op: they may use any captured value, since captures dominate the root.

A fusion may also replace values other than the root: `rw.replace(old, new)` (with
`rw.users(old)` and `rw.after_root(op)` to check first that every user of `old` comes
after the root, so that the new ops, inserted before it, dominate them).
"""
from __future__ import annotations

import inspect
import re
import sys
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from jaxrt.errors import InputError

from jaxrt.ir.module import Function, Module, Op, Value, make_op
from jaxrt.ir.opdef import Attrs, OpDef, Trait
from jaxrt.ir.ops import broadcast, constant, weight
from jaxrt.ir.types import TensorType

from .pattern import MatchFailure, Pattern
from .stats import RewriteStats, RuleStats


class RewriteError(InputError):
    """A rule misbehaved (wrong result type) or rewriting did not reach a fixed point."""


_RULE_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_LIVE_RULES: dict[str, list[weakref.ref]] = {}  # name -> rules alive with that name


@dataclass(eq=False)
class Rule:
    """`name` (kebab-case), a pattern, and `handler(rw, **captures) -> Value | None`."""

    name: str
    pattern: Pattern
    handler: Callable[..., Value | None]
    location: str = ""  # file:line where the rule was defined (filled in automatically)

    def __post_init__(self):
        if not _RULE_NAME.match(self.name):
            raise ValueError(f"rule name {self.name!r} must be kebab-case")
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"rule {self.name}: pattern must be a Pattern, got {self.pattern!r}")
        if not self.location:
            caller = sys._getframe(2)
            self.location = f"{caller.f_code.co_filename.rsplit('/', 1)[-1]}:{caller.f_lineno}"
        self._check_handler()
        self.roots = self.pattern.root_opdefs()
        _LIVE_RULES.setdefault(self.name, []).append(weakref.ref(self))

    def _check_handler(self):
        try:
            params = list(inspect.signature(self.handler).parameters.values())
        except (TypeError, ValueError):
            return
        captures = self.pattern.capture_names()
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                                 params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"rule {self.name}: handler must take the rewriter first")
        rest = params[1:]
        if not any(p.kind == p.VAR_KEYWORD for p in rest):
            missing = captures - {p.name for p in rest}
            if missing:
                raise TypeError(f"rule {self.name}: handler does not accept captures "
                                f"{sorted(missing)}")
        unbound = [p.name for p in rest if p.default is p.empty and p.name not in captures
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if unbound:
            raise TypeError(f"rule {self.name}: handler parameters {unbound} are not captured "
                            f"by the pattern {self.pattern!r}")

    def __repr__(self) -> str:
        return f"Rule({self.name!r} at {self.location})"


class RuleSet:
    """Rules in priority order, indexed by the OpDef at the pattern's root. Combine with `+`."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_name = {r.name: r for r in self.rules}
        if len(self._by_name) != len(self.rules):
            dup = [n for n, c in Counter(r.name for r in self.rules).items() if c > 1]
            raise ValueError(f"duplicate rule names {dup}")
        self._for_opdef: dict[OpDef, tuple[Rule, ...]] = {}

    def for_opdef(self, opdef: OpDef) -> tuple[Rule, ...]:
        """Rules whose root can be `opdef` (including any-op roots), in priority order."""
        hit = self._for_opdef.get(opdef)
        if hit is None:
            hit = tuple(r for r in self.rules if r.roots is None or opdef in r.roots)
            self._for_opdef[opdef] = hit
        return hit

    def __add__(self, other: "RuleSet | Rule | Iterable[Rule]") -> "RuleSet":
        more = (other,) if isinstance(other, Rule) else tuple(other)
        return RuleSet(self.rules + more)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Rule:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no rule {name!r}; rules: {sorted(self._by_name)}") from None


def as_ruleset(rules: "RuleSet | Rule | Iterable[Rule]") -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    return RuleSet((rules,) if isinstance(rules, Rule) else rules)


# ---- the handler's view ------------------------------------------------------------------

class Rewriter:
    """A handler's first argument: `rw(ops.add, a, b)` builds an op that the driver inserts
    before the root op. Also: `rw.root` (matched Value), `rw.op`, `rw.fn`, `rw.module`,
    `rw.ctx` (the running pass, for options), `rw.num_uses(v)`, `rw.users(v)`,
    `rw.after_root(op)` and `rw.replace(old, new)`."""

    __slots__ = ("fn", "module", "ctx", "root", "new_ops", "also", "_uses", "_users",
                 "_after")

    def __init__(self, fn: Function, module: Module | None, ctx: Any,
                 uses: Callable[[Value], int],
                 users: Callable[[Value], list[Op]] | None = None,
                 after: Callable[[Op, Op], bool] | None = None):
        self.fn = fn
        self.module = module
        self.ctx = ctx
        self.root: Value | None = None
        self.new_ops: list[Op] = []
        self.also: list[tuple[Value, Value]] = []  # other replacements: (old, new)
        self._uses = uses
        self._users = users or _users_by_scan(fn)
        self._after = after or _after_by_scan(fn)

    @property
    def op(self) -> Op:
        return self.root.owner

    def __call__(self, opdef: OpDef, *operands: Value, result_types=None, **attrs):
        op = self.create(opdef, operands, attrs, result_types)
        return op.results[0] if len(op.results) == 1 else op.results

    def create(self, opdef: OpDef, operands, attrs: dict | Attrs | None = None,
               result_types=None) -> Op:
        op = make_op(opdef, list(operands), attrs, result_types)
        self.new_ops.append(op)
        return op

    def constant(self, value, type: TensorType) -> Value:
        """A constant of static `type`: a scalar splats; an array-like is stored densely."""
        if not np.isscalar(value):
            value = tuple(float(x) for x in np.asarray(value).ravel())
        return self(constant, value=value if isinstance(value, tuple) else float(value),
                    result_types=[type])

    def splat(self, value: float, type: TensorType) -> Value:
        """`value` everywhere in `type`; symbolic shapes broadcast a scalar constant."""
        if type.is_static:
            return self.constant(value, type)
        scalar = self.constant(value, TensorType((), type.dtype))
        return self(broadcast, scalar, shape=type.shape)

    def weight(self, name: str, type: TensorType | None = None) -> Value:
        t = type or self.module.weights[name]
        return self(weight, name=name, result_types=[t])

    def num_uses(self, v: Value) -> int:
        """Uses of v by live ops and function results (new, uncommitted ops excluded)."""
        return self._uses(v)

    def users(self, v: Value) -> list[Op]:
        """The live ops using v, in program order (new, uncommitted ops excluded)."""
        return self._users(v)

    def after_root(self, op: Op) -> bool:
        """Whether op comes after the root op in program order."""
        return self._after(op, self.root.owner)

    def replace(self, old: Value, new: Value) -> None:
        """Also replace `old` (a result of another op) by `new` when the handler's
        replacement is applied. Every user of `old` must come after the root (check with
        `users` and `after_root`), else the driver raises RewriteError."""
        self.also.append((old, new))


def _users_by_scan(fn: Function) -> Callable[[Value], list[Op]]:
    return lambda v: [op for op in fn.ops if any(x is v for x in op.operands)]


def _after_by_scan(fn: Function) -> Callable[[Op, Op], bool]:
    def after(a: Op, b: Op) -> bool:
        pos = {op: i for i, op in enumerate(fn.ops)}
        return a in pos and b in pos and pos[a] > pos[b]
    return after


# ---- the driver ----------------------------------------------------------------------------

class _Driver:
    """Worklist rewriting of one function with its own use lists, committed at the end."""

    def __init__(self, fn: Function, rules: RuleSet, stats: RewriteStats, module, ctx, log):
        self.fn, self.rules, self.stats, self.log = fn, rules, stats, log
        self.users: dict[Value, list[Op]] = {}
        for op in fn.ops:
            for v in op.operands:
                self.users.setdefault(v, []).append(op)
        self.returned: Counter = Counter(fn.results)
        self.before: dict[Op, list[Op]] = {}  # ops to emit just before the key op
        self.dead: set[Op] = set()
        self.worklist: list[Op] = list(reversed(fn.ops))
        self.queued: set[Op] = set(fn.ops)
        # Program-order keys, compared as tuples: op i is (i,); an op inserted before op X
        # is X's key with its last element less one, then a sequence number, so it sorts
        # after whatever precedes X and before X itself.
        self.key: dict[Op, tuple] = {op: (i,) for i, op in enumerate(fn.ops)}
        self.seq = 0
        self.rw = Rewriter(fn, module, ctx, self.num_uses, self.live_users, self.after)
        self.history: list[str] = []

    def num_uses(self, v: Value) -> int:
        return len(self.users.get(v, ())) + self.returned[v]

    def live_users(self, v: Value) -> list[Op]:
        return sorted(dict.fromkeys(self.users.get(v, ())), key=self.key.__getitem__)

    def after(self, a: Op, b: Op) -> bool:
        return self.key[a] > self.key[b]

    def push(self, op: Op) -> None:
        if op not in self.queued and op not in self.dead:
            self.queued.add(op)
            self.worklist.append(op)

    def run(self, max_steps: int) -> None:
        try:
            self._loop(max_steps)
        finally:
            self._commit()

    def _loop(self, max_steps: int) -> None:
        while self.worklist:
            op = self.worklist.pop()
            self.queued.discard(op)
            if op not in self.dead and self._rewrite_once(op, max_steps):
                self.push(op)  # if it survived (another result), try it again

    def _rewrite_once(self, op: Op, max_steps: int) -> bool:
        """Apply the first rule that rewrites a result of op; False if none does."""
        candidates = self.rules.for_opdef(op.opdef)
        if not candidates:
            return False
        clock = time.perf_counter
        for res in op.results:
            for rule in candidates:
                st = self.stats.rules[rule.name]
                st.attempts += 1
                caps: dict[str, Value] = {}
                t0 = clock()
                ok = rule.pattern._match(res, caps, None)
                t1 = clock()
                st.match_seconds += t1 - t0
                if not ok:
                    continue
                st.matches += 1
                self.rw.root = res
                self.rw.new_ops = []
                self.rw.also = []
                new = rule.handler(self.rw, **caps)
                st.handler_seconds += clock() - t1
                if new is None or new is res:
                    continue
                self._check(rule, res, new)
                for old, repl in self.rw.also:
                    self._check_also(rule, op, old, repl)
                st.rewrites += 1
                self.stats.steps += 1
                self.history.append(rule.name)
                if len(self.history) > max_steps:
                    raise self._no_fixed_point(max_steps)
                if self.log is not None:
                    self.log(f"{rule.name}: {op.opdef.name} -> "
                             f"{new.owner.opdef.name if new.owner else 'argument'}")
                self._apply(op, [(res, new), *self.rw.also], self.rw.new_ops)
                return True
        return False

    def _check(self, rule: Rule, res: Value, new: Value) -> None:
        if not isinstance(new, Value):
            raise RewriteError(f"rule {rule.name} ({rule.location}) returned {new!r}, "
                               "not a Value or None")
        if new.type != res.type:
            raise RewriteError(f"rule {rule.name} ({rule.location}) replaced a {res.type} "
                               f"({res.owner.opdef.name}) with a {new.type}")

    def _check_also(self, rule: Rule, root: Op, old: Value, new: Value) -> None:
        self._check(rule, old, new)
        if old.owner is None or old.owner in self.dead or old.owner is root:
            raise RewriteError(f"rule {rule.name} ({rule.location}) replaces a value that is "
                               f"not a result of another live op")
        early = [u for u in self.users.get(old, ())
                 if u is not root and not self.after(u, root)]
        if early:
            raise RewriteError(f"rule {rule.name} ({rule.location}) replaces a "
                               f"{old.owner.opdef.name} result used by {early[0].opdef.name} "
                               f"before the root {root.opdef.name}: the replacement would "
                               f"not dominate it")

    def _apply(self, op: Op, replacements: list[tuple[Value, Value]],
               new_ops: list[Op]) -> None:
        users = self.users
        if new_ops:
            self.before.setdefault(op, []).extend(new_ops)
            *head, last = self.key[op]
            for n in new_ops:
                self.seq += 1
                self.key[n] = (*head, last - 1, self.seq)
                for v in n.operands:
                    users.setdefault(v, []).append(n)
        for res, new in replacements:
            moved = users.pop(res, [])
            for user in dict.fromkeys(moved):
                user.operands = [new if v is res else v for v in user.operands]
            users.setdefault(new, []).extend(moved)
            if self.returned[res]:
                self.fn.results = [new if v is res else v for v in self.fn.results]
                self.returned[new] += self.returned.pop(res)
            for user in dict.fromkeys(moved):
                self.push(user)
        for n in reversed(new_ops):
            self.push(n)
        for old_op in dict.fromkeys(res.owner for res, _ in replacements):
            if old_op not in self.dead and not any(self.num_uses(r) for r in old_op.results):
                self._erase(old_op)
        for n in new_ops:  # built but not used by the replacement
            if n not in self.dead and not any(self.num_uses(r) for r in n.results):
                self._erase(n)

    def _erase(self, op: Op) -> None:
        """Erase op and, transitively, the pure ops only it kept alive."""
        stack = [op]
        while stack:
            o = stack.pop()
            if o in self.dead:
                continue
            self.dead.add(o)
            for v in o.operands:
                lst = self.users.get(v)
                if lst is not None:
                    lst.remove(o)
                d = v.owner
                if d is None or d in self.dead:
                    continue
                if d.opdef.has(Trait.PURE) and not any(self.num_uses(r) for r in d.results):
                    stack.append(d)
                else:
                    self.push(d)  # its use count changed

    def _commit(self) -> None:
        out: list[Op] = []
        stack = [(o, False) for o in reversed(self.fn.ops)]
        while stack:
            o, expanded = stack.pop()
            if expanded:
                if o not in self.dead:
                    out.append(o)
                continue
            stack.append((o, True))
            stack.extend((b, False) for b in reversed(self.before.get(o, ())))
        self.fn.set_ops(out)

    def _no_fixed_point(self, max_steps: int) -> RewriteError:
        recent = Counter(self.history[-100:]).most_common(5)
        which = ", ".join(f"{name} x{n}" for name, n in recent)
        return RewriteError(f"@{self.fn.name}: rewriting did not reach a fixed point within "
                            f"{max_steps} rewrites (a rule loop?); most applied in the last "
                            f"{min(100, len(self.history))}: {which}")


def apply_rules(target: Function | Module, rules: RuleSet | Rule | Iterable[Rule], *,
                max_steps: int | None = None, module: Module | None = None, ctx: Any = None,
                log: Callable[[str], None] | None = None,
                stats: RewriteStats | None = None) -> RewriteStats:
    """Rewrite every function of `target` with `rules` until no rule applies.

    max_steps bounds the rewrites per function (default 1000 + 20 per op); going past it
    raises RewriteError, leaving the function valid. `ctx` is handed to handlers as
    `rw.ctx`; `log` receives one line per rewrite.
    """
    rules = as_ruleset(rules)
    stats = stats if stats is not None else RewriteStats.for_rules(rules)
    for r in rules:
        stats.rules.setdefault(r.name, RuleStats(location=r.location))
    if isinstance(target, Module):
        fns, module = list(target.functions.values()), target
    else:
        fns = [target]
    for fn in fns:
        limit = max_steps if max_steps is not None else 1000 + 20 * len(fn.ops)
        _Driver(fn, rules, stats, module, ctx, log).run(limit)
    return stats


# ---- explain ---------------------------------------------------------------------------------

def find_rule(name: str, rules: RuleSet | Iterable[Rule] | None = None) -> Rule:
    """A rule by name: from `rules`, or among all live rules (the name must be unique)."""
    if rules is not None:
        return as_ruleset(rules)[name]
    live = [r for ref in _LIVE_RULES.get(name, ()) if (r := ref()) is not None]
    if not live:
        raise KeyError(f"no rule named {name!r}")
    if len(live) > 1:
        raise KeyError(f"{len(live)} rules are named {name!r} ({live}); pass rules=")
    return live[0]


def _find_value(fn: Function, value: Value | str, names: dict[Value, str]) -> Value:
    if isinstance(value, Value):
        return value
    want = value if value.startswith("%") else "%" + value
    for v, n in names.items():
        if n == want:
            return v
    raise KeyError(f"@{fn.name} has no value {want}")


def explain(fn: Function, rule: Rule | str, value: Value | str, *,
            rules: RuleSet | Iterable[Rule] | None = None, module: Module | None = None,
            ctx: Any = None) -> str:
    """Why `rule` does (not) rewrite `value` ("%12", named as the printer names it)."""
    from jaxrt.ir.analysis.graph import value_names

    rule = rule if isinstance(rule, Rule) else find_rule(rule, rules)
    names = value_names(fn)
    v = _find_value(fn, value, names)

    def namer(x: Value) -> str:
        return names.get(x, "%<new>")

    if v.owner is None:
        at = f"argument {namer(v)}"
    else:
        at = f"{namer(v)} = {v.owner.opdef.name}(" + ", ".join(map(namer, v.owner.operands)) + ")"
    head = f"rule {rule.name!r} ({rule.location}) at {at}"
    result = rule.pattern.match(v, explain=True)
    if isinstance(result, MatchFailure):
        return f"{head}: no match: {result.render(namer)}"
    caps = ", ".join(f"{k}={namer(x)}" for k, x in sorted(result.items()))
    uses = Counter(x for op in fn.ops for x in op.operands) + Counter(fn.results)
    rw = Rewriter(fn, module, ctx, lambda x: uses[x])
    rw.root = v
    new = rule.handler(rw, **result)
    if new is None or new is v:
        return f"{head}: pattern matches ({caps}) but the handler declines (returns None)"
    target = namer(new) if new in names else f"a new {new.owner.opdef.name}"
    return f"{head}: matches ({caps}) and rewrites it to {target} ({len(rw.new_ops)} new ops)"
