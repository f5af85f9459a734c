"""Count what one training step dispatches: ATen ops and would-be host syncs per phase, on any device.

Op counts and sync sites do not depend on the device or the model's widths, so a CPU run measures what a
GPU step launches and where it would wait for the device:

* ops: every ATen op that reaches the dispatcher (a `TorchDispatchMode`), reported as non-view ops (views,
  aliases and detaches launch no kernel) with the total beside it;
* syncs: ops whose result the host must read (`_local_scalar_dense` = `item()` / `int()` / `bool()`,
  `equal`), ops with a data-dependent output shape (`nonzero`, `masked_select`, `unique`, `bincount`,
  `repeat_interleave` without `output_size`, boolean-mask indexing), tensors made from Python data
  on a device (`torch.tensor(data, device=...)`: a pageable host-to-device copy on CUDA), host copies
  (`.tolist()`, `.cpu()`, `.numpy()`; these three seen through a `TorchFunctionMode`) and DeepSpeed's own
  `get_accelerator().synchronize()` calls. Each is tallied by its Python file:line: the innermost frame
  outside torch and the standard library; in the backward pass, the forward line that built the autograd
  node (anomaly mode records it), marked "(backward)".
* cpu_only_syncs: host reads that only the CPU kernels make (`F.one_hot`'s range check), kept apart;
* skipped_on_cpu: DeepSpeed's `resolves_data_dependency()` queries, behind which CUDA-only code runs (among
  it ZeRO-2's end-of-backward `synchronize()` with `overlap_comm`).

`count_train_step` runs two warm-up steps, then counts the forward, backward and optimizer step of the next
one through the real DeepSpeed engine, and `torch._dynamo.explain`s the forward of one block of each kind
(hard and soft router) in every encoder pass.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from eve_ds.bench.throughput import BenchConfig, build_bench_engine, memory_batches, train_step
from eve_ds.models.layers import Block
from eve_ds.objectives import ObjectiveConfig
from eve_ds.train.compile import block_compiles

# Ops that make a view or an alias of their input: no kernel runs for them.
VIEW_OPS = frozenset(
    [
        "view",
        "_unsafe_view",
        "t",
        "transpose",
        "permute",
        "expand",
        "as_strided",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "detach",
        "alias",
        "reshape",
        "unbind",
        "split",
        "split_with_sizes",
        "narrow",
        "chunk",
        "view_as",
        "expand_as",
        "diagonal",
        "unfold",
        "lift_fresh",
        "_reshape_alias",
        "unflatten",
        "flatten",
        "movedim",
        "swapaxes",
        "numpy_T",
        "_neg_view",
        "_conj",
        "real",
        "imag",
    ]
)
# Ops after which the host holds a device value (a read, or a shape that depends on the data).
SYNC_OPS = {
    "_local_scalar_dense": "item",
    "equal": "equal",
    "nonzero": "nonzero",
    "masked_select": "masked_select",
    "bincount": "bincount",
    "unique": "unique",
    "_unique": "unique",
    "_unique2": "unique",
    "unique_dim": "unique",
    "unique_consecutive": "unique",
}
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
# Steps before the counted one: the first builds the optimizer states and lazy buffers, and DeepSpeed's
# throughput timer synchronises only from its start_step=2 on (deepspeed/utils/timer.py).
WARMUP_STEPS = 2
HOST_METHODS = {"tolist": ".tolist()", "cpu": ".cpu()", "numpy": ".numpy()"}
# torch functions whose CPU kernels read a value that their CUDA kernels do not.
CPU_ONLY_READS = frozenset({"one_hot"})

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_THIS = os.path.abspath(__file__)


def _short(path: str) -> str:
    """A frame's file as the repository (eve_ds/...) or the installed package (deepspeed/...) names it."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    for root in ("eve_ds", "tests", "tools", "benchmarks"):
        if f"{os.sep}{root}{os.sep}" in path:
            return root + os.sep + path.rsplit(f"{os.sep}{root}{os.sep}", 1)[1]
    return os.path.basename(path)


def _innermost(
    frames: list[traceback.FrameSummary], skip: tuple[str, ...] = (), depth: int = 2
) -> str | None:
    """file:line of the innermost frame outside torch, the standard library, this module and `skip`, then
    of its callers (outside them too) up to `depth` frames: "inner:12 <- caller:34"."""
    found = []
    for f in reversed(frames):
        path = os.path.abspath(f.filename)
        stdlib = path.startswith(_STDLIB_DIR) and "-packages" + os.sep not in path
        if stdlib or path.startswith(_TORCH_DIR) or path == _THIS or any(s in path for s in skip):
            continue
        found.append(f"{_short(path)}:{f.lineno}")
        if len(found) == depth:
            break
    return " <- ".join(found) or None


def call_site() -> str:
    """Where the op was issued: the forward line of the autograd node being run (backward pass, when
    anomaly mode recorded it), else the Python stack."""
    node = torch._C._current_autograd_node()
    if node is not None:
        recorded = node.metadata.get("traceback_")
        if recorded:
            where = _innermost(traceback.StackSummary.from_list(_parse_traceback(recorded)))
            if where:
                return f"{where} (backward)"
    return _innermost(traceback.extract_stack()) or "?"


def _parse_traceback(lines: list[str]) -> list[tuple[str, int, str, str]]:
    """Anomaly mode's recorded stack ('  File "f", line n, in fn' lines) -> (file, line, name, "")."""
    out = []
    for entry in lines:
        head = entry.strip().splitlines()[0] if entry.strip() else ""
        if head.startswith('File "'):
            file, rest = head[6:].split('", line ', 1)
            line, _, name = rest.partition(", in ")
            out.append((file, int(line), name, ""))
    return out


@dataclass
class PhaseCount:
    """What one phase dispatched: ops by name; would-be syncs, CPU-only reads and DeepSpeed's GPU-only
    branches by (kind, site)."""

    ops: collections.Counter = field(default_factory=collections.Counter)
    sites: collections.Counter = field(default_factory=collections.Counter)  # non-view ops by (op, site)
    syncs: collections.Counter = field(default_factory=collections.Counter)
    cpu_only_syncs: collections.Counter = field(default_factory=collections.Counter)
    skipped_on_cpu: collections.Counter = field(default_factory=collections.Counter)

    @property
    def compute_ops(self) -> int:
        """Non-view ops: those that launch a kernel."""
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    def to_dict(self, top: int = 15) -> dict:
        def pairs(c: collections.Counter) -> list[list]:
            return [[f"{kind} @ {site}", n] for (kind, site), n in sorted(c.items(), key=lambda kv: kv[0])]

        compute = collections.Counter({k: n for k, n in self.ops.items() if k not in VIEW_OPS})
        return {
            "ops": self.compute_ops,
            "all_ops": sum(self.ops.values()),
            "num_syncs": self.num_syncs,
            "syncs": pairs(self.syncs),
            "cpu_only_syncs": pairs(self.cpu_only_syncs),
            "skipped_on_cpu": pairs(self.skipped_on_cpu),
            "top_ops": [[k, n] for k, n in compute.most_common(top)],
            # Where they come from: the issuing line (backward: the forward line of the autograd node).
            "top_sites": [[f"{op} @ {site}", n] for (op, site), n in self.sites.most_common(2 * top)],
        }


class _Dispatch(TorchDispatchMode):
    def __init__(self, count: PhaseCount, calls: list[str]) -> None:
        super().__init__()
        self.count, self.calls = count, calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.count.ops[name] += 1
        if name not in VIEW_OPS:
            self.count.sites[(name, call_site())] += 1
        kind = SYNC_OPS.get(name)
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            kind = "repeat_interleave"
        elif name in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(t, Tensor) and t.dtype == torch.bool for t in indices or ()):
                kind = f"{name}[bool mask]"
        if kind is not None:
            cpu_only = kind == "item" and any(c in CPU_ONLY_READS for c in self.calls)
            (self.count.cpu_only_syncs if cpu_only else self.count.syncs)[(kind, call_site())] += 1
        return func(*args, **kwargs)


class _Functions(TorchFunctionMode):
    """Host copies that the dispatcher does not see, and the torch function being run (for CPU_ONLY_READS)."""

    def __init__(self, count: PhaseCount, calls: list[str]) -> None:
        super().__init__()
        self.count, self.calls = count, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = HOST_METHODS.get(name)
        if name == "tensor" and kwargs.get("device") is not None:
            kind = "torch.tensor(data, device=)"
        if kind is not None:
            self.count.syncs[(kind, call_site())] += 1
        self.calls.append(name)
        try:
            return func(*args, **kwargs)
        finally:
            self.calls.pop()


@contextlib.contextmanager
def _accelerator_calls(count: PhaseCount) -> Iterator[None]:
    """Tally DeepSpeed's `get_accelerator().synchronize()` by caller (the dispatcher never sees it), and
    its `resolves_data_dependency()` queries: the CPU accelerator answers True, CUDA False, so the branches
    behind them (some synchronise) run on a GPU only."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    wrapped = {"synchronize": count.syncs, "resolves_data_dependency": count.skipped_on_cpu}

    def tally(name: str, real: Callable, into: collections.Counter) -> Callable:
        def call(*args, **kwargs):
            site = _innermost(traceback.extract_stack(), skip=(f"deepspeed{os.sep}accelerator",))
            into[(f"accelerator.{name}", site or "?")] += 1
            return real(*args, **kwargs)

        return call

    for name, into in wrapped.items():
        setattr(acc, name, tally(name, getattr(acc, name), into))
    try:
        yield
    finally:
        for name in wrapped:
            delattr(acc, name)  # the instance attributes go; the class's methods show through again


@contextlib.contextmanager
def counting(record_forward_sites: bool = False) -> Iterator[PhaseCount]:
    """Count everything dispatched inside the block. `record_forward_sites`: turn anomaly mode on (without
    its NaN checks, which would add ops) so that a later backward can name the forward lines."""
    count, calls = PhaseCount(), []
    anomaly = (
        torch.autograd.set_detect_anomaly(True, check_nan=False)
        if record_forward_sites
        else contextlib.nullcontext()
    )
    with anomaly, _accelerator_calls(count), _Functions(count, calls), _Dispatch(count, calls):
        yield count


def count_call(fn: Callable[[], object], record_forward_sites: bool = False) -> tuple[PhaseCount, object]:
    """-> (what `fn()` dispatched, its result)."""
    with counting(record_forward_sites) as count:
        out = fn()
    return count, out


def count_engine_step(engine, batch: dict[str, Tensor]) -> dict[str, PhaseCount]:
    """One training step (`eve_ds.bench.throughput.train_step`'s three calls), counted phase by phase."""
    fwd, out = count_call(lambda: engine(batch), record_forward_sites=True)
    bwd, _ = count_call(lambda: engine.backward(out["loss"]))
    step, _ = count_call(engine.step)
    return {"forward": fwd, "backward": bwd, "step": step}


def block_inputs(model: nn.Module, forward: Callable[[], object]) -> dict[tuple[int, int], tuple]:
    """The inputs (x (B, N, D), tokens) of every encoder block's first call of each encoder pass in
    `forward()` (a pass: its image length and sequence length), detached, by (block index, pass number)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    seen: dict[tuple[int, int], tuple] = {}
    passes: dict[tuple[int, int], int] = {}

    def hook(module, args):
        x, tokens = args[0], args[1]
        p = passes.setdefault((tokens.n_image, x.shape[1]), len(passes))
        seen.setdefault((blocks.index(module), p), (x.detach().clone(), dataclasses.replace(tokens)))

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return {key: (blocks[key[0]], *seen[key]) for key in sorted(seen)}


def graph_breaks(fn: Callable, *args) -> dict:
    """`torch._dynamo.explain` of one call (without autograd: the forward's graphs are the same, and
    FlexAttention on CPU traces only then): graphs, breaks and where each break is."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ex = torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()
    reasons = collections.Counter(
        (r.reason.splitlines()[0][:160], _innermost(list(r.user_stack)) or "?") for r in ex.break_reasons
    )
    return {
        "graphs": ex.graph_count,
        "breaks": ex.graph_break_count,
        "reasons": [[f"{why} @ {site}", n] for (why, site), n in sorted(reasons.items())],
    }


def block_graph_breaks(model: nn.Module, forward: Callable[[], object]) -> dict[str, dict]:
    """Dynamo's view of each block kind (hard / soft router, the first block of each) in every encoder pass
    of `forward()`, on the inputs it gets there; `compiled`: whether train.compile=blocks compiles it.
    -> {kind: {"block", "compiled", "graphs" / "breaks" (summed over passes), "passes": [...]}}."""
    out: dict[str, dict] = {}
    for (i, _), (block, x, tokens) in block_inputs(model, forward).items():
        kind = "soft" if block.soft else "hard"
        entry = out.setdefault(kind, {"block": i, "compiled": block_compiles(block), "passes": []})
        if entry["block"] != i:
            continue
        # forward, not the module call: a block compiled in place would run its compiled code instead
        res = graph_breaks(block.forward, x, tokens)
        entry["passes"].append({"n_image": tokens.n_image, "seq_len": x.shape[1], **res})
    for entry in out.values():
        entry["graphs"] = sum(p["graphs"] for p in entry["passes"])
        entry["breaks"] = sum(p["breaks"] for p in entry["passes"])
    return out


def count_train_step(bc: BenchConfig, task_set: list[str], batch_size: int) -> dict:
    """Ops and would-be syncs of one training step of `bc.model` (DeepSpeed engine with `bc`'s DS config)
    per phase, after WARMUP_STEPS steps, and the graph breaks of each block kind's forward in every pass.

    -> {"forward" | "backward" | "step": PhaseCount.to_dict(), "total": {...}, "graph_breaks": breaks of
    the soft-router block (of the last block when there is none), "blocks": both kinds, ...}
    """
    cfg = bc.model_config()
    obj = ObjectiveConfig(objectives=list(task_set))
    obj.validate()
    engine, dtype = build_bench_engine(bc, cfg, obj, batch_size)
    batch = next(memory_batches(cfg, obj, batch_size, bc, dtype, num_batches=1))
    for _ in range(WARMUP_STEPS):
        train_step(engine, batch)
    phases = count_engine_step(engine, batch)
    blocks = block_graph_breaks(engine.module, lambda: engine.module(batch))
    result = {name: c.to_dict() for name, c in phases.items()}
    result["total"] = {
        "ops": sum(c.compute_ops for c in phases.values()),
        "num_syncs": sum(c.num_syncs for c in phases.values()),
    }
    chosen = blocks.get("soft") or blocks.get("hard") or {"breaks": None}
    result["graph_breaks"] = chosen["breaks"]
    result["blocks"] = blocks
    result["parameter_tensors"] = sum(1 for p in engine.module.parameters() if p.requires_grad)
    return result


def format_counts(result: dict) -> str:
    """A printable summary of `count_train_step`'s result: ops and syncs per phase, then the sync sites."""
    lines = [f"{'phase':10s} {'non-view ops':>13s} {'all ops':>9s} {'syncs':>6s}"]
    for phase in ("forward", "backward", "step"):
        p = result[phase]
        lines.append(f"{phase:10s} {p['ops']:13,d} {p['all_ops']:9,d} {p['num_syncs']:6d}")
    lines.append(f"{'total':10s} {result['total']['ops']:13,d} {'':9s} {result['total']['num_syncs']:6d}")
    for phase in ("forward", "backward", "step"):
        for key, label in (
            ("syncs", ""),
            ("cpu_only_syncs", " [CPU only]"),
            ("skipped_on_cpu", " [GPU only]"),
        ):
            for site, n in result[phase][key]:
                lines.append(f"  {phase:9s} {n:4d} x {site}{label}")
    for kind, b in result["blocks"].items():
        how = "compiled" if b["compiled"] else "eager"
        for p in b["passes"]:
            lines.append(
                f"dynamo: {kind}-router block {b['block']} ({how} with train.compile=blocks), pass of "
                f"{p['n_image']} image + {p['seq_len'] - p['n_image']} text tokens: {p['graphs']} graphs, "
                f"{p['breaks']} breaks"
            )
    return "\n".join(lines)


def cuda_sync_warnings(bc: BenchConfig, task_set: list[str], batch_size: int, steps: int) -> dict:
    """The GPU counterpart of the sync count: `steps` training steps (after WARMUP_STEPS, which also
    compile) under `torch.cuda.set_sync_debug_mode("warn")`, each warning CUDA raises on a synchronising
    call tallied by the innermost Python file:line outside torch. PyTorch calls the mode experimental:
    it does not catch every sync. -> {"steps", "num_warnings", "sites": [[site, count], ...]}."""
    if bc.device != "cuda":
        raise ValueError("--sync-warn needs --device cuda (torch.cuda.set_sync_debug_mode)")
    import warnings

    cfg = bc.model_config()
    obj = ObjectiveConfig(objectives=list(task_set))
    engine, dtype = build_bench_engine(bc, cfg, obj, batch_size)
    batch = next(memory_batches(cfg, obj, batch_size, bc, dtype, num_batches=1))
    for _ in range(WARMUP_STEPS):
        train_step(engine, batch)
    torch.cuda.synchronize()
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        sites[_innermost(traceback.extract_stack()[:-1]) or f"{_short(filename)}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                train_step(engine, batch)
            torch.cuda.set_sync_debug_mode("default")  # the final synchronize is ours
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"steps": steps, "num_warnings": sum(sites.values()), "sites": sorted(map(list, sites.items()))}
