"""Resharding a DeepSpeed ZeRO-2 checkpoint of EVE or EVLM-MoE to another expert-parallel size (and world size).

Model weights do not depend on the layout (expert files carry global expert ids), so they are copied.
The ZeRO-2 optimizer shards do: every param group is one flat fp32 vector (params in group order, padded
to a multiple of 2 x partitions) split evenly over its data-parallel group — all ranks for the dense
groups, the expert-data-parallel group (ranks r with r % ep_size == ep rank) for the expert groups, whose
vector holds only that ep rank's local experts. Resharding joins every partition back into per-parameter
fp32 master weights and Adam moments, regroups the experts for the new ep_size and splits them again.
When a shard does not have this layout (missing file, parameter-alignment padding, another optimizer
format) the optimizer state is dropped, with a warning, or an error under ``strict_optimizer``.

    RANK r (target): ep rank r % B, expert-data-parallel rank r // B (DeepSpeed's E + D group layout).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from deepspeed.utils.tensor_fragment import fragment_address

from eve_ds.convert.ds_checkpoint import (
    EXPERT_KEY_RE,
    MODEL_STATES,
    OPTIM_RE,
    ConvertError,
    expert_files,
    model_config,
    read_eve_config,
    resolve_tag_dir,
    torch_load,
)
from eve_ds.convert.export import check_weights
from eve_ds.utils.io import atomic_write_json, staging_dir
from eve_ds.utils.ranks import expert_parallel_rank

logger = logging.getLogger(__name__)

RESHARD_INFO = "reshard_info.json"
ALIGN = 2  # ZeRO-1/2 nccl_start_alignment_factor: flat groups are padded to a multiple of 2 x partitions
STATE_KEYS = ("exp_avg", "exp_avg_sq")


class LayoutError(RuntimeError):
    """The optimizer shards cannot be carried over to the new layout."""


# -- optimizer state: join -------------------------------------------------------------------------------


def _optim_files(tag: Path, world: int) -> tuple[str, list[Path]]:
    found = {
        int(m.group(2)): (m.group(1) or "", tag / f.name)
        for f in tag.iterdir()
        if (m := OPTIM_RE.match(f.name))
    }
    missing = [r for r in range(world) if r not in found]
    if missing:
        raise LayoutError(f"ZeRO optimizer shard(s) of data-parallel rank(s) {missing} missing in {tag}")
    return found[0][0], [found[r][1] for r in range(world)]


def _split_flat(flat: torch.Tensor, shapes: OrderedDict) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[off : off + n].view(shape)
        off += n
    if off != flat.numel():
        raise LayoutError(f"flat group of {flat.numel()} elements does not hold its params ({off} elements)")
    return out


def _to_global(name: str, ep_rank: int, n_local: int) -> str:
    m = EXPERT_KEY_RE.match(name)
    return f"{m.group(1)}{ep_rank * n_local + int(m.group(2))}{m.group(3)}"


def join_optimizer(
    shards: list[dict], param_shapes: list[OrderedDict], ep_size: int, n_local: int
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """ZeRO-2 shards (one per data-parallel rank) -> ({param (global name): {"fp32", "exp_avg", ...}},
    per-group scalar state and hyper-parameters)."""
    world = len(shards)
    osds = [s["optimizer_state_dict"] for s in shards]
    for o in osds:
        base = o.get("base_optimizer_state")
        if not isinstance(base, dict) or "state" not in base:
            raise LayoutError("optimizer shard is not a rigid ZeRO-1/2 state (no base_optimizer_state.state)")
        if any(any(p) for p in o.get("param_alignment_paddings", [])):
            raise LayoutError("ZeRO parameter-alignment padding is not supported by the resharder")
    params: dict[str, dict[str, torch.Tensor]] = {}
    groups = []
    for g, shapes in enumerate(param_shapes):
        group = osds[0]["base_optimizer_state"]["param_groups"][g]
        moe = bool(group.get("moe", False))
        layouts = [list(range(k, world, ep_size)) for k in range(ep_size)] if moe else [list(range(world))]
        for k, ranks in enumerate(layouts):
            if any(osds[r]["partition_count"][g] != len(ranks) for r in ranks):
                raise LayoutError(f"group {g}: partition count does not match the ep_size={ep_size} layout")
            flats = {}
            for key in ("fp32", *STATE_KEYS):
                parts = []
                for r in ranks:
                    fp32 = osds[r]["single_partition_of_fp32_groups"][g]
                    t = fp32 if key == "fp32" else osds[r]["base_optimizer_state"]["state"][g][key]
                    parts.append(t.reshape(-1)[: fp32.numel()])  # strip the padding of the last partition
                flats[key] = torch.cat(parts)
            for key, flat in flats.items():
                for name, t in _split_flat(flat, shapes).items():
                    params.setdefault(_to_global(name, k, n_local) if moe else name, {})[key] = t
        scalars = {
            k: v for k, v in osds[0]["base_optimizer_state"]["state"][g].items() if k not in STATE_KEYS
        }
        groups.append({"group": group, "scalars": scalars, "moe": moe})
    return params, groups


# -- optimizer state: split ------------------------------------------------------------------------------


def target_order(shapes: OrderedDict, n_local: int) -> list[tuple[str, str, str]]:
    """Order of an expert group's params for `n_local` local experts: (layer prefix, local id, suffix) in
    `named_parameters` order (layer by layer, expert by expert), as DeepSpeed flattens the group."""
    layers: dict[str, list[str]] = {}
    for name in shapes:
        m = EXPERT_KEY_RE.match(name)
        if m is None:
            raise LayoutError(f"{name} in an expert param group is not an expert parameter")
        suffixes = layers.setdefault(m.group(1), [])
        if m.group(3) not in suffixes:
            suffixes.append(m.group(3))
    return [(p, str(i), s) for p, suffixes in layers.items() for i in range(n_local) for s in suffixes]


def split_group(
    flats: dict[str, torch.Tensor], names: list[str], numels: list[int], parts: int, part_id: int
) -> tuple[dict[str, torch.Tensor], int, OrderedDict]:
    """One partition of a flat group -> ({key: partition}, padding in it, param_slice_mappings)."""
    n = sum(numels)
    padded = math.ceil(n / (ALIGN * parts)) * ALIGN * parts
    size = padded // parts
    start = part_id * size
    real = max(0, min(n - start, size))
    if part_id < parts - 1 and real < size:
        raise LayoutError(f"group of {n} elements over {parts} partitions leaves an empty partition")
    out = {}
    for key, flat in flats.items():
        chunk = flat[start : start + real].clone()
        out[key] = chunk if key == "fp32" else torch.cat([chunk, chunk.new_zeros(size - real)])
    mapping, off = OrderedDict(), 0
    for name, k in zip(names, numels):
        lo, hi = max(off, start), min(off + k, start + size)
        if lo < hi:
            mapping[name] = fragment_address(numel=hi - lo, start=lo - start)
        off += k
    return out, size - real, mapping


def build_shard(
    rank: int,
    world: int,
    ep_size: int,
    n_local: int,
    params: dict,
    groups: list[dict],
    target_shapes: list[OrderedDict],
    template: dict,
) -> dict:
    """The ZeRO-2 optimizer shard of target data-parallel rank `rank`."""
    ep_rank, edp_rank = expert_parallel_rank(rank, ep_size), rank // ep_size
    fp32, state, paddings, counts, mappings, pgroups = [], {}, [], [], [], []
    for g, (info, shapes) in enumerate(zip(groups, target_shapes)):
        names = list(shapes)
        src = [_to_global(n, ep_rank, n_local) if info["moe"] else n for n in names]
        flats = {key: torch.cat([params[s][key].reshape(-1) for s in src]) for key in ("fp32", *STATE_KEYS)}
        parts, part_id = (world // ep_size, edp_rank) if info["moe"] else (world, rank)
        chunk, pad, mapping = split_group(
            flats, names, [math.prod(s) for s in shapes.values()], parts, part_id
        )
        fp32.append(chunk.pop("fp32"))
        state[g] = {
            **{k: v.clone() if torch.is_tensor(v) else v for k, v in info["scalars"].items()},
            **chunk,
        }
        paddings.append(pad)
        counts.append(parts)
        mappings.append(mapping)
        group = {**info["group"], "params": [g]}
        if info["moe"]:
            group["name"] = f"ep_size_{ep_size}"
        pgroups.append(group)
    osd = {
        k: v
        for k, v in template.items()
        if k
        not in (
            "base_optimizer_state",
            "single_partition_of_fp32_groups",
            "group_paddings",
            "partition_count",
            "param_slice_mappings",
            "param_alignment_paddings",
        )
    }
    osd.update(
        base_optimizer_state={"state": state, "param_groups": pgroups},
        single_partition_of_fp32_groups=fp32,
        group_paddings=paddings,
        partition_count=counts,
        param_slice_mappings=mappings,
        param_alignment_paddings=[[0] * len(s) for s in target_shapes],
    )
    return osd


def target_param_shapes(param_shapes: list[OrderedDict], moe: list[bool], n_local: int) -> list[OrderedDict]:
    out = []
    for shapes, is_moe in zip(param_shapes, moe):
        if not is_moe:
            out.append(OrderedDict(shapes))
            continue
        first = {}
        for name, shape in shapes.items():
            m = EXPERT_KEY_RE.match(name)
            first.setdefault((m.group(1), m.group(3)), shape)
        out.append(OrderedDict((f"{p}{i}{s}", first[(p, s)]) for p, i, s in target_order(shapes, n_local)))
    return out


# -- driver ------------------------------------------------------------------------------------------------


def reshard_optimizer(
    tag: Path, out: Path, states: dict, src_ep: int, ep_size: int, world: int, num_experts: int
) -> list[OrderedDict]:
    """Write the target ZeRO shards into `out`; -> the target param_shapes. Raises LayoutError."""
    src_world = states["dp_world_size"]
    prefix, files = _optim_files(tag, src_world)
    shards = [torch_load(f) for f in files]
    param_shapes = states["param_shapes"]
    params, groups = join_optimizer(shards, param_shapes, src_ep, num_experts // src_ep)
    moe = [g["moe"] for g in groups]
    shapes = target_param_shapes(param_shapes, moe, num_experts // ep_size)
    template = shards[0]["optimizer_state_dict"]
    for r in range(world):
        osd = build_shard(r, world, ep_size, num_experts // ep_size, params, groups, shapes, template)
        shard = {
            **{k: v for k, v in shards[0].items() if k != "optimizer_state_dict"},
            "optimizer_state_dict": osd,
        }
        torch.save(shard, out / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return shapes


def _check_layout(cfg, ep_size: int, world: int) -> None:
    if ep_size < 1 or cfg.num_experts % ep_size:
        raise ConvertError(f"--ep-size {ep_size} does not divide num_experts={cfg.num_experts}")
    if world < 1 or world % ep_size:
        raise ConvertError(f"--world-size {world} is not a multiple of --ep-size {ep_size}")


def _eve_config(cfg: dict, ep_size: int) -> dict:
    out = {**cfg, "model": {**cfg["model"], "ep_size": ep_size}}
    if isinstance(cfg.get("run"), dict) and isinstance(cfg["run"].get("model"), dict):
        out["run"] = {**cfg["run"], "model": {**cfg["run"]["model"], "ep_size": ep_size}}
    return out


def reshard(
    src: str | Path,
    dst: str | Path,
    ep_size: int,
    world_size: int | None = None,
    strict_optimizer: bool = False,
    overwrite: bool = False,
) -> Path:
    """DeepSpeed checkpoint (ep_size A, data-parallel D) -> a run dir `dst` (``dst/checkpoints/<tag>``,
    ``dst/checkpoints/latest``) that an engine with ep_size `ep_size` on `world_size` ranks (default D)
    resumes from. -> the new tag dir."""
    tag = resolve_tag_dir(src)
    cfg = read_eve_config(tag)
    mcfg = model_config(cfg)
    states = torch_load(tag / MODEL_STATES)
    world = world_size or int(states.get("dp_world_size", 1))
    _check_layout(mcfg, ep_size, world)
    # Every weight is checked against the config before anything is written.
    from eve_ds.convert.ds_checkpoint import consolidated_state_dict

    sd, _ = consolidated_state_dict(tag, mcfg.num_experts)
    check_weights(cfg, sd, str(tag))
    del sd
    with staging_dir(dst, overwrite) as tmp:
        out = tmp / "checkpoints" / tag.name
        out.mkdir(parents=True)
        optimizer = "kept"
        try:
            states["param_shapes"] = reshard_optimizer(
                tag, out, states, mcfg.ep_size, ep_size, world, mcfg.num_experts
            )
        except LayoutError as e:
            if strict_optimizer:
                raise ConvertError(f"optimizer state of {tag} cannot be resharded: {e}") from e
            logger.warning(
                "optimizer state of %s dropped: %s (the resumed run loads model weights only)", tag, e
            )
            optimizer = "dropped"
            for f in out.glob("*optim_states.pt"):
                f.unlink()
        _write_tag(tag, out, states, cfg, ep_size, world, optimizer)
        (tmp / "checkpoints" / "latest").write_text(tag.name)
    logger.info(
        "resharded %s (ep_size %d, world %d) -> %s (ep_size %d, world %d), optimizer state %s",
        tag,
        mcfg.ep_size,
        states["dp_world_size"],
        dst,
        ep_size,
        world,
        optimizer,
    )
    return Path(dst) / "checkpoints" / tag.name


def _write_tag(
    tag: Path, out: Path, states: dict, cfg: dict, ep_size: int, world: int, optimizer: str
) -> None:
    src_world, src_ep = states["dp_world_size"], cfg["model"]["ep_size"]
    for f in expert_files(tag).values():
        shutil.copy2(f, out / f.name)
    module = torch.load(tag / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    torch.save(
        {"module": module, **{k: v for k, v in states.items() if k != "module"}, "dp_world_size": world},
        out / MODEL_STATES,
    )
    for r in range(world):
        f = tag / f"rng_state_rank{r}.pt"
        if f.is_file():
            shutil.copy2(f, out / f.name)
    if (tag / "trainer_state.json").is_file():
        shutil.copy2(tag / "trainer_state.json", out / "trainer_state.json")
    atomic_write_json(out / "eve_config.json", _eve_config(cfg, ep_size))
    atomic_write_json(
        out / RESHARD_INFO,
        {
            "optimizer_state": optimizer,
            "ep_size": ep_size,
            "world_size": world,
            "source": str(tag),
            "source_ep_size": src_ep,
            "source_world_size": src_world,
        },
    )
    step = (
        json.loads((tag / "trainer_state.json").read_text()).get("step")
        if (tag / "trainer_state.json").is_file()
        else None
    )
    atomic_write_json(
        out / "eve_complete.json", {"step": step}
    )  # last: the trainer resumes only complete tags


def resume_options(tag_dir: str | Path, world_size: int | None = None, ep_size: int | None = None) -> dict:
    """Keyword arguments for ``engine.load_checkpoint(dir, tag, **resume_options(tag_dir, world, ep))``.

    The optimizer state is loaded only when it exists and was saved for this layout (data-parallel world
    size and ep_size; DeepSpeed would otherwise refuse it or, for another ep_size, read expert moments into
    the wrong experts). Otherwise the model weights are loaded and the fp32 master weights rebuilt from
    them; the LR schedule and step counters are still restored (they do not depend on the layout).
    """
    tag_dir = Path(tag_dir)
    keep = {"load_optimizer_states": True, "load_lr_scheduler_states": True, "load_module_only": False}
    drop = {"load_optimizer_states": False, "load_lr_scheduler_states": True, "load_module_only": False}
    info_f = tag_dir / RESHARD_INFO
    info = json.loads(info_f.read_text()) if info_f.is_file() else {}
    if info.get("optimizer_state") == "dropped":
        logger.warning(
            "%s: its optimizer state was dropped by resharding; loading model weights only", tag_dir
        )
        return drop
    saved_world = info.get("world_size")
    if saved_world is None and (tag_dir / "trainer_state.json").is_file():
        saved_world = json.loads((tag_dir / "trainer_state.json").read_text()).get("world_size")
    saved_ep = info.get("ep_size")
    if saved_ep is None and (tag_dir / "eve_config.json").is_file():
        saved_ep = json.loads((tag_dir / "eve_config.json").read_text())["model"].get("ep_size")
    for what, saved, now in (("world size", saved_world, world_size), ("ep_size", saved_ep, ep_size)):
        if now is not None and saved is not None and int(saved) != int(now):
            logger.warning(
                "%s was saved with %s %s, this run has %s: optimizer state not loaded (model weights "
                "only); `eve-convert reshard` carries it over",
                tag_dir,
                what,
                saved,
                now,
            )
            return drop
    return keep
