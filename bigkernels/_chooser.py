"""The one place that picks the kernel of a call: measured on this machine, cached, stock op included.

Each op (bigkernels/ops/<op>.py) declares a `Chooser`: its candidates (each of our kernel paths, each
backend's kernel, and the stock torch op), what each can run, how a call is keyed, and a static
heuristic. Per call, `Chooser.pick(device, args, grad)` returns the candidate to run:

1. A forced backend (`bigkernels.use_backend`, BIGKERNELS_BACKEND) restricts the candidates to that
   backend's and takes the static heuristic among them: a forced row in a benchmark or a test always
   runs the same kernel. A backend that cannot run the call raises BackendUnavailable saying why.
2. Otherwise the winner cached for the call's key (op, the eligible candidates, the op's shape bucket,
   dtype/layout/options, gradients wanted or not, intra-op threads, device model), in memory and on
   disk (bigkernels/_tune_cache.py).
3. Otherwise, with tuning on (BIGKERNELS_TUNE=on, the default), the eligible candidates are timed a
   few interleaved rounds (forward, or forward + backward when gradients are wanted, on detached
   copies of the arguments) and the fastest is cached. With tuning off, in deterministic mode, or
   under torch.compile (fake tensors are never timed; the cache is read at trace time), the static
   heuristic picks, as before tuning existed (our kernel on the CPU).
4. GPU kernels of ours are trusted only after they matched the stock op on that device: the first
   call of a key on a CUDA tensor runs each of them, the stock op and the stock op in float64 on the
   same inputs, outputs and gradients, and judges by the DESIGN rule (bigkernels/_numerics.py). A
   candidate that raises or mismatches is dropped for that key with one warning naming it and the
   error, and the cache records it; until one is validated, the stock op runs.

Because the stock op is a candidate, an automatic call is never slower than stock beyond timing
noise. The tuning cost per key is a few calls of each candidate (see TUNE_ROUNDS, TUNE_MAX_CALL_S).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from bigkernels import _backend, _numerics, _tune_cache

STOCK = "stock"  # the backend name (and candidate name) of the stock torch op
GPU_BACKENDS = ("cuda", "triton")

# Timed rounds per candidate after one warm-up call each (the warm-up pays one-time costs: weight
# packing, Triton compilation). Interleaved, the fastest round taken: interference (another process
# preempting one of the OpenMP threads) only ever adds time, and on the 2-core EPYC a median of three
# picked the fused LSTM kernel at 12.4 ms over stock's 6.5 ms (T=64 B=16 H=256 forward) while another
# process was busy.
TUNE_ROUNDS = 5
# A call whose first run takes longer than this is not tuned (the heuristic stays): timing its
# candidates would cost several such calls. Fewer rounds (at least one) when they would exceed TUNE_BUDGET_S.
TUNE_MAX_CALL_S = 2.0
TUNE_BUDGET_S = 1.0
# After the first timed round, candidates slower than this multiple of the fastest (each judged by
# the better of its warm-up and first call) drop out: one kernel's calls moved by up to ~10 % between
# runs on the 2-core EPYC, so a candidate 30 % behind is not a contender.
TUNE_CONTENDER_RATIO = 1.3
# Exact call signatures remembered per op (each maps to its bucket's choice, so a cleared memo costs
# only dictionary lookups to refill).
MEMO_LIMIT = 4096


def _parse_tune(value: Optional[str]) -> bool:
    if value is None or value.strip().lower() in ("", "on", "1", "true", "yes"):
        return True
    if value.strip().lower() in ("off", "0", "false", "no"):
        return False
    warnings.warn(f"BIGKERNELS_TUNE must be 'on' or 'off', got {value!r}; tuning stays on", RuntimeWarning, stacklevel=2)
    return True


_ENV_TUNE = _parse_tune(os.environ.get("BIGKERNELS_TUNE"))
_tune_stack: list[bool] = []


@contextlib.contextmanager
def tuning(enabled: bool) -> Iterator[None]:
    """Turn measured choice on or off inside the block (overrides BIGKERNELS_TUNE; nests)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"tuning(enabled) takes a bool, got {type(enabled).__name__}")
    _tune_stack.append(enabled)
    try:
        yield
    finally:
        _tune_stack.pop()


def tuning_enabled() -> bool:
    return _tune_stack[-1] if _tune_stack else _ENV_TUNE


@dataclass(frozen=True)
class Candidate:
    """One way to run an op's call.

    name:      unique within the op ("cpu.fused", "triton", "stock", ...); what the cache records.
    backend:   "cpu", "cuda", "triton", "reference" or "stock": forcing a backend keeps its candidates.
    run:       run(*args) -> the op's outputs (a tensor or a tuple of tensors).
    supports:  supports(*args) -> None if it can run these arguments, else the reason it cannot.
    validate:  trusted only after matching the stock op (default: the GPU backends on CUDA tensors).
    tuned:     raced by the tuner. False for an entry that stands for the static heuristic itself
               (e.g. the LSTM's "cpu", which lets the C++ kernel pick its path): it runs when tuning
               is off or a backend is forced, while the paths it chooses between are raced by name.
    """

    name: str
    backend: str
    run: Callable[..., Any]
    supports: Optional[Callable[..., Optional[str]]] = None
    validate: Optional[bool] = None
    tuned: bool = True
    kernel_op: Optional[str] = None  # the registered op it runs, when not the chooser's (availability)

    def reason_not(self, args: tuple) -> Optional[str]:
        return None if self.supports is None else self.supports(*args)

    def needs_validation(self, device: torch.device) -> bool:
        if self.validate is not None:
            return self.validate
        return self.backend in GPU_BACKENDS and device.type == "cuda"


# key -> entry {"choice", "how", "ms", "rejected", "validated", "tune_ms"}; loaded from disk lazily.
_entries: dict[str, dict[str, Any]] = {}
_disk_loaded = False
# The candidate each op ran last (bench reports, `bigkernels info`).
last_choice: dict[str, str] = {}
_warned: set[tuple[str, str, str]] = set()


def _ensure_disk_loaded() -> None:
    global _disk_loaded
    if not _disk_loaded:
        _disk_loaded = True
        for key, entry in _tune_cache.load().items():
            _entries.setdefault(key, entry)


def entries() -> dict[str, dict[str, Any]]:
    """Every known choice (this process's and the cache file's), by key."""
    _ensure_disk_loaded()
    return dict(_entries)


def forget() -> None:
    """Drop the in-memory choices (tests; the next pick re-reads the cache file)."""
    global _disk_loaded
    _entries.clear()
    last_choice.clear()
    _disk_loaded = False
    for chooser in Chooser.registry.values():
        chooser._memo.clear()


def size_bucket(n: int) -> int:
    """n rounded up to the next of 1..8, 12, 16, 24, 32, 48, 64, ... (half powers of two): calls
    within a bucket share one tuning, which keeps a model with many sequence lengths from tuning
    each; the ratio between two buckets (at most 1.5) is smaller than the sizes where winners change."""
    if n <= 8:
        return int(n)
    power = 1 << (int(n) - 1).bit_length()
    return power * 3 // 4 if n <= power * 3 // 4 else power


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    return device.type


def _flat_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Chooser:
    """The candidates of one op and its memory of which one wins where. See the module docstring.

    signature(*args) -> a hashable tuple of everything the choice depends on besides device, dtype
        of nothing else: shapes, dtype, layout, options. Exact: it keys the per-process memo.
    bucket(signature) -> the coarser tuple that keys tuning and the disk cache (default: exact).
    heuristic(eligible, args) -> the candidate to run without measurement (default: the first of
        ours in declaration order, so declare the preferred kernel first; the stock op if none).
    comparable(*args) -> whether two candidates' outputs can be compared on these arguments (False
        for a random dropout mask, say): GPU kernels are validated only on comparable calls.
    check(*args) -> raises the op's error naming the bad argument; run on the first call of each
        signature, before any candidate (so bad input is never timed, and never reaches the stock
        op first to be refused in other words). Later calls of the signature rely on the kernels'
        own checks, as before.
    """

    registry: dict[str, "Chooser"] = {}

    def __init__(
        self,
        op: str,
        candidates: Sequence[Candidate],
        signature: Callable[..., tuple],
        heuristic: Optional[Callable[[list[Candidate], tuple], Candidate]] = None,
        bucket: Optional[Callable[[tuple], tuple]] = None,
        comparable: Optional[Callable[..., bool]] = None,
        check: Optional[Callable[..., None]] = None,
    ) -> None:
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"Chooser({op!r}): candidate names must be unique, got {names}")
        self.op = op
        self.candidates = list(candidates)
        self.by_name = {c.name: c for c in self.candidates}
        self.signature = signature
        self.bucket = bucket or (lambda sig: sig)
        self.heuristic = heuristic or _first_own
        self.comparable = comparable or (lambda *args: True)
        self.check = check
        self._memo: dict[tuple, Candidate] = {}
        Chooser.registry[op] = self

    # ------------------------------------------------------------------------------ the per-call path
    def pick(self, device: torch.device, args: tuple, grad: bool) -> Candidate:
        forced = _backend.requested()
        if torch.compiler.is_compiling():
            choice = self._forced(forced, device, args) if forced is not None else self._traced(device, args, grad)
        else:
            memo_key = (forced, device, grad, torch.get_num_threads(), tuning_enabled(),
                        torch.are_deterministic_algorithms_enabled(), self.signature(*args))
            choice = self._memo.get(memo_key)
            if choice is None:
                if self.check is not None:
                    self.check(*args)
                choice = self._forced(forced, device, args) if forced is not None else self._choose(device, args, grad)
                if len(self._memo) >= MEMO_LIMIT:  # e.g. ever-new sequence lengths: start over
                    self._memo.clear()
                self._memo[memo_key] = choice
        last_choice[self.op] = choice.name
        return choice

    def _forced(self, forced: str, device: torch.device, args: tuple) -> Candidate:
        own = [c for c in self.candidates if c.backend == forced]
        if not own:
            raise _backend.BackendUnavailable(f"bigkernels backend {forced!r} cannot run {self.op}: no {forced} kernel for it")
        reasons: dict[str, str] = {}
        eligible = []
        for c in own:
            reason = None
            if forced not in (STOCK, "reference") and not _available(forced, c.kernel_op or self.op, device):
                reason = _backend.unavailable_reason(forced, c.kernel_op or self.op, device)  # the error path
            reason = reason or c.reason_not(args)
            if reason is None:
                eligible.append(c)
            else:
                reasons[c.name] = reason
        if not eligible:
            distinct = set(reasons.values())
            why = distinct.pop() if len(distinct) == 1 else "; ".join(f"{n}: {r}" for n, r in reasons.items())
            raise _backend.BackendUnavailable(f"bigkernels backend {forced!r} cannot run {self.op}: {why}")
        return self.heuristic(eligible, args)

    def eligible(self, device: torch.device, args: tuple) -> list[Candidate]:
        """The candidates an automatic call may run: not the reference; Triton only on GPUs (the
        interpreter is a correctness tool); our backends only where built; each one's own check."""
        out = []
        for c in self.candidates:
            if c.backend == "reference" or (c.backend == "triton" and device.type != "cuda"):
                continue
            if c.backend != STOCK and not _available(c.backend, c.kernel_op or self.op, device):
                continue
            if c.reason_not(args) is None:
                out.append(c)
        return out

    def key(self, device: torch.device, args: tuple, grad: bool, eligible: Sequence[Candidate]) -> str:
        return self._key_of(tuple(c.name for c in eligible if c.tuned), _plain(self.signature(*args)), grad, device)

    def _key_of(self, names: tuple, signature: tuple, grad: bool, device: torch.device) -> str:
        """`signature` in plain Python values (_plain): the same text in eager code and in a trace."""
        parts = (self.op, ",".join(names), repr(self.bucket(signature)), "grad" if grad else "nograd",
                 f"threads={torch.get_num_threads()}", _device_name(device))
        return "|".join(parts)

    def _traced(self, device: torch.device, args: tuple, grad: bool) -> Candidate:
        """Under torch.compile: the cached choice, read when Dynamo traces; never timed. The key is
        built outside the trace (_choice_at_trace_time), from the call's static signature."""
        eligible = self.eligible(device, args)
        names = tuple(c.name for c in eligible if c.tuned)
        signature = _plain(self.signature(*args))
        static = signature is not None and _trace_has_static_shapes()
        name = _choice_at_trace_time(self.op, names, signature, grad, device) if static else ""
        for c in eligible:
            if c.name == name:
                return c
        return self._untuned(eligible, args, device)

    def _untuned(self, eligible: list[Candidate], args: tuple, device: torch.device,
                 rejected: Sequence[str] = (), validated: Sequence[str] = ()) -> Candidate:
        """The static heuristic among the eligible candidates that need no validation or passed it."""
        trusted = [c for c in eligible if c.name not in rejected
                   and (not c.needs_validation(device) or c.name in validated)]
        if trusted:
            return self.heuristic(trusted, args)
        # Nothing trusted and no stock op (e.g. lstm_ext's options): the plain-PyTorch reference.
        return self.by_name.get("reference") or self.heuristic(eligible, args)

    # --------------------------------------------------------------------------------- first sight
    def _choose(self, device: torch.device, args: tuple, grad: bool) -> Candidate:
        eligible = self.eligible(device, args)
        if not eligible:
            raise _backend.BackendUnavailable(f"no kernel (not even torch's) can run {self.op} on these arguments")
        if len(eligible) == 1:
            return eligible[0]
        if not tuning_enabled() and not any(c.needs_validation(device) for c in eligible):
            return self._untuned(eligible, args, device)
        _ensure_disk_loaded()
        key = self.key(device, args, grad, eligible)
        entry = _entries.get(key)
        if entry is not None and entry["choice"] in self.by_name and self.by_name[entry["choice"]] in eligible:
            return self.by_name[entry["choice"]]

        start = time.perf_counter()
        rejected: dict[str, str] = {}
        validated: list[str] = []
        to_validate = [c for c in eligible if c.needs_validation(device)]
        if to_validate:
            # The stock op is the yardstick; an op without one is judged against its reference.
            stock = next((c for c in eligible if c.backend == STOCK), None) or self.by_name.get("reference")
            if stock is None or not self.comparable(*args):
                rejected.update({c.name: "not validated: no comparable stock call" for c in to_validate})
            else:
                for c in to_validate:
                    problem = self._validation_problem(c, stock, args, grad)
                    if problem is None:
                        validated.append(c.name)
                    else:
                        rejected[c.name] = problem
                        self._warn(c, key, f"disabled for this call shape: {problem}")
        runnable = [c for c in eligible if c.name not in rejected and c.tuned]
        times: dict[str, float] = {}
        if tuning_enabled() and not torch.are_deterministic_algorithms_enabled() and len(runnable) > 1:
            choice, how = self._measure(runnable, args, grad, device, times, rejected, key)
        else:
            choice = self._untuned(eligible, args, device, rejected, validated)
            how = "heuristic" + (" (tuning off)" if not tuning_enabled() else
                                 " (deterministic mode)" if torch.are_deterministic_algorithms_enabled() else "")
        record = {
            "choice": choice.name,
            "how": how,
            "ms": {name: round(t * 1e3, 4) for name, t in times.items()},
            "rejected": rejected,
            "validated": validated,
            "tune_ms": round((time.perf_counter() - start) * 1e3, 3),
        }
        if times or validated or rejected:  # anything learnt by running candidates is kept
            _entries[key] = record
            _tune_cache.save({key: record})
        return choice

    def _measure(self, runnable: list[Candidate], args: tuple, grad: bool, device: torch.device,
                 times: dict[str, float], rejected: dict[str, str], key: str) -> tuple[Candidate, str]:
        copies, leaves = _detached(args, grad)
        cotangents: dict[int, list[Tensor]] = {}
        default = self.heuristic(runnable, args)
        order = [default] + [c for c in runnable if c is not default]
        samples: dict[str, list[float]] = {}
        warm: dict[str, float] = {}
        for c in order:  # warm-up, heuristic first: its time decides whether tuning is affordable
            try:
                first = warm[c.name] = _time_once(c, copies, leaves, grad, device, cotangents)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is dropped, not fatal
                rejected[c.name] = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                self._warn(c, key, rejected[c.name])
                continue
            samples[c.name] = []
            if c is default and first > TUNE_MAX_CALL_S:
                times[c.name] = first
                return c, f"heuristic (one call takes {first:.2f} s, over the {TUNE_MAX_CALL_S} s tuning limit)"
        alive = [c for c in order if c.name in samples]
        if not alive:
            raise RuntimeError(f"bigkernels: every candidate for {self.op} failed: {rejected}")
        first_round = {c.name: min(warm[c.name], _time_once(c, copies, leaves, grad, device, cotangents, samples))
                       for c in alive}
        # Candidates clearly behind after two calls cannot win: only the close ones race on (a call
        # slowed by interference has its other, the warm-up, to stand on).
        fastest = min(first_round.values())
        racing = [c for c in alive if first_round[c.name] <= TUNE_CONTENDER_RATIO * fastest]
        per_round = sum(first_round[c.name] for c in racing)
        rounds = max(1, min(TUNE_ROUNDS, int(TUNE_BUDGET_S / max(per_round, 1e-9))))
        for _ in range(rounds - 1):
            for c in racing:
                _time_once(c, copies, leaves, grad, device, cotangents, samples)
        for name, ts in samples.items():
            times[name] = min(ts)
        best = min(alive, key=lambda c: times[c.name])
        return best, "measured"

    def _validation_problem(self, cand: Candidate, stock: Candidate, args: tuple, grad: bool) -> Optional[str]:
        """None if `cand` matches the stock op by the DESIGN rule on these arguments, else what failed."""
        try:
            ours = _outputs_and_grads(cand, args, grad)
        except Exception as exc:  # noqa: BLE001
            return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        theirs = _outputs_and_grads(stock, args, grad)
        ref64 = _outputs_and_grads(stock, _as_float64(args), grad)
        if len(ours) != len(ref64):
            return f"returned {len(ours)} tensors, the stock op {len(ref64)}"
        out_numel = sum(t.numel() for t in _flat_tensors(theirs[:1])) or 1
        for i, (o, s, r) in enumerate(zip(ours, theirs, ref64)):
            reduction = max(1, out_numel // max(1, r.numel()))  # terms summed per gradient element, roughly
            problem = _numerics.rule_violation(o, s, r, reduction)
            if problem is not None:
                return f"tensor {i} of its outputs/gradients: {problem}"
        return None

    def _warn(self, cand: Candidate, key: str, message: str) -> None:
        tag = (self.op, cand.name, message[:40])
        if tag not in _warned:
            _warned.add(tag)
            warnings.warn(f"bigkernels: {self.op} candidate {cand.name!r} {message} (key {key})", RuntimeWarning,
                          stacklevel=5)


_DTYPE_NAMES = {getattr(torch, n): n for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                                                "int8", "uint8", "bool")}


def _plain(value: Any) -> Any:
    """A signature as ints, strings, bools, floats and tuples (what a trace can hand over as a
    constant); None if it holds a symbolic size (dynamic shapes: no cached choice applies)."""
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(v) for v in value)
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, torch.dtype):
        return _DTYPE_NAMES.get(value, "other")
    if value is None or type(value) in (int, float, bool, str):  # a SymInt is none of these
        return value
    return None


def _first_own(eligible: list[Candidate], args: tuple) -> Candidate:
    return next((c for c in eligible if c.backend != STOCK), eligible[0])


@torch.compiler.assume_constant_result
def _available(backend: str, op: str, device: torch.device) -> bool:
    """Whether `backend` has a kernel for `op` on `device` (asks the dispatcher, which a trace cannot)."""
    return _backend.unavailable_reason(backend, op, device) is None


@torch.compiler.assume_constant_result
def _trace_has_static_shapes() -> bool:
    """Whether the trace being built has no symbolic sizes. Dynamo hands symbolic sizes to Python
    code as ints that cannot be made constants, so a dynamic-shape trace takes the heuristic
    (a static trace, the default first compile and dynamic=False, reads the cache)."""
    try:
        context = torch._guards.TracingContext.try_get()
        shape_env = context.fake_mode.shape_env if context is not None and context.fake_mode is not None else None
        if shape_env is None:
            return True
        symbols = getattr(shape_env, "backed_var_to_val", None)  # torch >= 2.13; var_to_val before
        return not (symbols if symbols is not None else shape_env.var_to_val)
    except AttributeError:  # a torch whose tracing internals differ: do not risk a failed trace
        return False


@torch.compiler.assume_constant_result
def _choice_at_trace_time(op: str, names: tuple, signature: tuple, grad: bool, device: torch.device) -> str:
    """The cached winner's name for this key, or "" (Dynamo bakes the answer into the graph)."""
    _ensure_disk_loaded()
    entry = _entries.get(Chooser.registry[op]._key_of(names, signature, grad, device))
    return entry["choice"] if entry is not None else ""


def _detached(args: tuple, grad: bool) -> tuple[tuple, list[Tensor]]:
    """Leaf copies sharing storage (nothing is written), so the timing builds its own graph."""
    if not grad:
        return args, []
    copies = tuple(a.detach().requires_grad_(True) if isinstance(a, Tensor) and a.requires_grad else a for a in args)
    leaves = [c for c, a in zip(copies, args) if isinstance(a, Tensor) and a.requires_grad]
    return copies, leaves


def _as_float64(args: tuple) -> tuple:
    return tuple(a.detach().to(torch.float64).requires_grad_(a.requires_grad)
                 if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _outputs_and_grads(cand: Candidate, args: tuple, grad: bool) -> list[Tensor]:
    copies, leaves = _detached(args, grad)
    with torch.enable_grad() if grad else torch.no_grad():
        outs = _flat_tensors(cand.run(*copies))
    if not grad:
        return [o.detach() for o in outs]
    diff = [o for o in outs if o.requires_grad]
    gen = torch.Generator().manual_seed(0)  # the same cotangents for every candidate and dtype
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in diff]
    grads = torch.autograd.grad(diff, leaves, cot, allow_unused=True)
    return [o.detach() for o in outs] + [g if g is not None else torch.zeros_like(l) for g, l in zip(grads, leaves)]


def _time_once(cand: Candidate, args: tuple, leaves: list[Tensor], grad: bool, device: torch.device,
               cotangents: dict[int, list[Tensor]], samples: Optional[dict[str, list[float]]] = None) -> float:
    _sync(device)
    start = time.perf_counter()
    if grad:
        with torch.enable_grad():
            diff = [o for o in _flat_tensors(cand.run(*args)) if o.requires_grad]
            if len(diff) not in cotangents:  # made once: allocating them is no part of a call
                cotangents[len(diff)] = [torch.ones_like(o) for o in diff]
            cot = cotangents[len(diff)]
            if diff:
                torch.autograd.grad(diff, leaves, cot, allow_unused=True)
    else:
        with torch.no_grad():
            cand.run(*args)
    _sync(device)
    elapsed = time.perf_counter() - start
    if samples is not None:
        samples[cand.name].append(elapsed)
    return elapsed
