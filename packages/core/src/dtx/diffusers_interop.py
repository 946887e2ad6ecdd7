"""diffusers folders in and out: the layouts diffusers reads and writes, shared by every family's diffusers format.

A diffusers *model folder* is ``config.json`` (with ``_class_name``) plus ``diffusion_pytorch_model.safetensors`` or
shards listed in ``diffusion_pytorch_model.safetensors.index.json``; a *pipeline folder* has ``model_index.json`` and
one subfolder per component (``transformer/``, ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``).
Families (dtx_dit, dtx_gentron) own their key maps and architecture rules; this module owns the folders, the
mapping between dtx's Gaussian objective and diffusers' scheduler configs (both ways), and what a pipeline folder
tells ``dtx sample`` (its VAE, its scheduler's betas and sampler; text encoders are the families' to wire into their
conditioners). Nothing here imports diffusers except to stamp its version.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from .config import reject_env
from .diffusion.gaussian import MAX_DIFFUSION_STEPS
from .errors import CheckpointError, ConfigError, one_line
from .io import atomic_write, atomic_write_text, check_output_path

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
README = "README.md"
TRANSFORMER = "transformer"

#: diffusers' own remapping of the legacy ``Transformer2DModel`` class name (what facebook/DiT-XL-2-256 and the
#: PixArt-alpha repos were saved as) by ``norm_type``
_LEGACY_CLASSES = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}

#: the key of an exported model's ``config.json`` that holds what diffusers' config has no place for: the run's data
#: facts (a pixel-space model's channels and classes, no VAE), objective, conditioning and sampling settings, so that
#: ``dtx sample`` on the folder (or on a dtx folder converted back from it) samples as the run did. diffusers ignores
#: config keys that start with ``_``.
DTX_FACTS = "_dtx"


@dataclass(frozen=True)
class DiffusersSource:
    """A diffusers transformer found on disk: its model folder and config, and the pipeline folder around it."""

    model_dir: Path
    config: dict[str, Any]
    pipeline_dir: Path | None = None
    model_index: dict[str, Any] | None = None

    @property
    def class_name(self) -> str:
        return model_class_name(self.config)

    def component(self, name: str) -> Path | None:
        """A pipeline component's folder (``vae``, ``scheduler``, ``text_encoder``, ``tokenizer``) when present."""
        if self.pipeline_dir is None:
            return None
        folder = self.pipeline_dir / name
        listed = self.model_index is None or self.model_index.get(name) not in (None, [None, None])
        return folder if listed and folder.is_dir() else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a CheckpointError naming the file when it is unreadable or not an object, a
    ConfigError when it reads an environment variable (``${oc.env:VAR}``, refused in every config dtx reads)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(exc).__name__}: {one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    reject_env(data, path)
    return data


def model_class_name(config: Mapping[str, Any]) -> str:
    """The diffusers class a ``config.json`` describes, legacy ``Transformer2DModel`` resolved by its norm type."""
    name = str(config.get("_class_name", ""))
    if name == "Transformer2DModel" and config.get("patch_size") is not None:
        return _LEGACY_CLASSES.get(str(config.get("norm_type")), name)
    return name


def find_model(path: Path, classes: Collection[str]) -> DiffusersSource | None:
    """The diffusers model folder (or pipeline folder's ``transformer/``) at ``path`` whose class is one of
    ``classes``; None for anything else (other files, other classes), so formats can be asked in turn."""
    path = Path(path)
    if not path.is_dir():
        return None
    pipeline_dir = model_index = None
    model_dir = path
    if (path / MODEL_INDEX).is_file() and (path / TRANSFORMER / CONFIG).is_file():
        pipeline_dir, model_index, model_dir = path, read_json(path / MODEL_INDEX), path / TRANSFORMER
    has_weights = (model_dir / WEIGHTS).is_file() or (model_dir / WEIGHTS_INDEX).is_file()
    if not (model_dir / CONFIG).is_file() or not has_weights:
        return None
    config = read_json(model_dir / CONFIG)
    if model_class_name(config) not in classes:
        return None
    return DiffusersSource(model_dir, config, pipeline_dir, model_index)


def config_value(source: DiffusersSource, key: str, default: Any = ...) -> Any:
    """``config.json[key]`` (or ``default``); a missing required key is a CheckpointError naming the file."""
    if key in source.config and source.config[key] is not None:
        return source.config[key]
    if default is ...:
        raise CheckpointError(f"{source.model_dir / CONFIG}: missing {key!r}")
    return default


def config_int(source: DiffusersSource, key: str, default: Any = ...) -> int:
    """``config.json[key]`` (or ``default``) as an integer: a missing required key, a string, a bool or a
    fractional or non-finite number is a CheckpointError naming the file and the key."""
    return json_number(config_value(source, key, default), key, source.model_dir / CONFIG)


def json_number(value: Any, key: str, path: Path, kind: type = int) -> Any:
    """``value`` read from key ``key`` of JSON file ``path`` as an int (an integral float such as ``32.0`` too) or,
    with ``kind=float``, a finite float; anything else is a CheckpointError naming the file and the key."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int and value != int(value):
        ok = False
    if not ok:
        what = "an integer" if kind is int else "a finite number"
        raise CheckpointError(f"{path}: {key} must be {what}, got {value!r}")
    return kind(value)


def stored_facts(source: DiffusersSource) -> dict[str, dict[str, Any]]:
    """The dtx sections an export recorded under ``DTX_FACTS`` in ``config.json`` (empty for other folders); a
    CheckpointError naming the file when they are not JSON objects."""
    facts = source.config.get(DTX_FACTS)
    if facts is None:
        return {}
    if not isinstance(facts, dict) or not all(isinstance(v, dict) for v in facts.values()):
        raise CheckpointError(f"{source.model_dir / CONFIG}: {DTX_FACTS} must map section names to JSON objects")
    return facts


def export_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """What an export records under ``DTX_FACTS``: a run's data facts (without the local VAE path, which the
    pipeline's ``vae/`` replaces) and its objective, conditioning and sampling sections, as plain JSON."""
    out = {k: facts[k] for k in ("data_info", "objective", "conditioning", "sample") if facts.get(k) is not None}
    if "data_info" in out:
        out["data_info"] = {k: v for k, v in dict(out["data_info"]).items() if k != "vae"}
    return json.loads(json.dumps(out, default=list))


def _stored_data_info(source: DiffusersSource, stored: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The data facts an export recorded, checked against the model's own shape facts (``info``)."""
    if not isinstance(stored, dict):
        raise CheckpointError(f"{source.model_dir / CONFIG}: {DTX_FACTS}.data_info must be a JSON object")
    for key in ("channels", "height", "width", "frames", "num_classes"):
        if stored.get(key) != info[key]:
            raise CheckpointError(f"{source.model_dir / CONFIG}: {DTX_FACTS}.data_info.{key} is "
                                  f"{stored.get(key)!r}, but the model's config gives {info[key]!r}")
    return {k: v for k, v in stored.items() if k != "vae"}


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model folder, unsharded or sharded (every shard the index names)."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise CheckpointError(f"{path}: weight file not found")
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc

    if (model_dir / WEIGHTS).is_file():
        return load(model_dir / WEIGHTS)
    index = read_json(model_dir / WEIGHTS_INDEX)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{model_dir / WEIGHTS_INDEX}: no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        state.update(load(_shard_path(model_dir, shard)))
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise CheckpointError(f"{model_dir / WEIGHTS_INDEX}: {missing[0]} is listed in {weight_map[missing[0]]} but "
                              f"not stored there ({len(missing)} such keys)")
    return state


def _shard_path(model_dir: Path, shard: str) -> Path:
    """A shard the index names, which must be a file inside the model folder: an absolute path, ``..`` or a link
    out of the folder would load a file from anywhere."""
    path = model_dir / shard
    inside = not Path(shard).is_absolute() and ".." not in Path(shard).parts
    if not inside or not path.resolve().is_relative_to(model_dir.resolve()):
        raise CheckpointError(f"{model_dir / WEIGHTS_INDEX}: shard {shard!r} is outside the model folder "
                              f"{model_dir}; only files inside it are read")
    return path


def diffusers_version() -> str:
    try:
        import diffusers

        return str(diffusers.__version__)
    except ImportError:  # the folder is still valid; diffusers only reads the field for warnings
        return "0.30.0"


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(dict(data), indent=2, sort_keys=True) + "\n")


def write_model(out: Path, class_name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                readme: str | None = None, facts: Mapping[str, Any] | None = None) -> Path:
    """Write a diffusers model folder (``config.json``, one ``diffusion_pytorch_model.safetensors``, README);
    ``facts`` (a run's sampling facts, see ``export_facts``) go under ``DTX_FACTS`` in ``config.json``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    dtx = {DTX_FACTS: export_facts(facts)} if facts else {}
    write_json(out / CONFIG, {"_class_name": class_name, "_diffusers_version": diffusers_version(), **config, **dtx})
    if readme:
        atomic_write_text(out / README, readme)
    return out


def copy_component(src: Path, dst: Path) -> Path:
    """Copy a diffusers component folder (a VAE, a text encoder, a tokenizer) file by file, atomically."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
        atomic_write(dst / path.relative_to(src), lambda tmp, p=path: shutil.copyfile(p, tmp))
    return dst


def write_pipeline(out: Path, pipeline_class: str, components: Mapping[str, tuple[str, str] | None],
                   scheduler: tuple[str, Mapping[str, Any]] | None = None, extra: Mapping[str, Any] | None = None,
                   readme: str | None = None) -> Path:
    """Write ``model_index.json`` (components as ``[library, class]``), ``scheduler/scheduler_config.json`` and a
    README around component folders the caller has written or copied."""
    out = Path(out)
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": diffusers_version()}
    index.update({k: list(v) if v is not None else [None, None] for k, v in components.items()})
    if scheduler is not None:
        cls, cfg = scheduler
        index["scheduler"] = ["diffusers", cls]
        write_json(out / "scheduler" / SCHEDULER_CONFIG,
                   {"_class_name": cls, "_diffusers_version": diffusers_version(), **cfg})
    index.update(extra or {})
    write_json(out / MODEL_INDEX, index)
    if readme:
        atomic_write_text(out / README, readme)
    return out


def component_class(model_dir: Path) -> tuple[str, str]:
    """``(library, class)`` of a component folder from its ``config.json`` (transformers configs name
    ``architectures``), for ``model_index.json``."""
    cfg = read_json(model_dir / CONFIG)
    if "_class_name" in cfg:
        return "diffusers", str(cfg["_class_name"])
    archs = cfg.get("architectures") or []
    if archs:
        return "transformers", str(archs[0])
    raise CheckpointError(f"{model_dir / CONFIG}: neither a diffusers (_class_name) nor a transformers "
                          f"(architectures) config")


# -- schedulers: dtx's Gaussian objective <-> diffusers scheduler configs ---------------------------------------------

_PREDICTIONS = {"epsilon": (False, False), "sample": (True, False), "v_prediction": (False, True)}


def scheduler_config(objective: Mapping[str, Any], why_not: str = "", example: str = "") -> tuple[str, dict[str, Any]]:
    """``(class, config)`` of the diffusers scheduler that samples a model trained with ``objective`` (a dtx
    ``objective`` section): DDIMScheduler with the same betas and prediction type for the Gaussian objective.

    Sigma-space (``karras``) models are refused: diffusers' EDM schedulers give the network ``c_noise =
    ln(sigma)/4`` as its timestep, while dtx feeds timestep-conditioned transformers the DDPM index of each sigma;
    ``why_not`` lets the family add what its own layout cannot hold, ``example`` a command that trains an
    exportable variant (the refusal says what to do).
    """
    kind = str(objective.get("kind", "gaussian"))
    if kind == "karras":
        raise ConfigError("this model was trained in sigma space (objective.kind karras, EDM preconditioning); "
                          "diffusers' EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) pass "
                          "c_noise = ln(sigma)/4 to the network as its timestep, but dtx conditions this "
                          "timestep model on the DDPM index of each sigma (log-sigma interpolation on DiT's linear "
                          "schedule), which no diffusers scheduler computes, so a diffusers pipeline would sample "
                          "it with the wrong noise level" + (f"; {why_not}" if why_not else "")
                          + ". To export, train with the DDPM objective and a DDPM sampler (objective.kind=gaussian "
                          "sample.sampler=ddim) and convert that run" + (f": {example}" if example else ""))
    if kind != "gaussian":
        raise ConfigError(f"objective.kind {kind!r} has no diffusers scheduler (only gaussian)")
    steps = int(objective.get("diffusion_steps", 1000))
    schedule = str(objective.get("noise_schedule", "linear"))
    if schedule == "linear":
        scale = 1000 / steps
        betas = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    elif schedule in ("cosine", "squaredcos_cap_v2"):
        betas = {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise ConfigError(f"objective.noise_schedule {schedule!r} has no diffusers beta_schedule (linear, cosine)")
    if objective.get("predict_xstart"):
        prediction = "sample"
    elif objective.get("predict_v"):
        prediction = "v_prediction"
    else:
        prediction = "epsilon"
    return "DDIMScheduler", {"num_train_timesteps": steps, **betas, "prediction_type": prediction,
                             "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                             "timestep_spacing": "leading"}


def objective_from_scheduler(path: Path) -> dict[str, Any]:
    """The dtx ``objective`` section equivalent to a diffusers ``scheduler_config.json`` (beta schedules only)."""
    cfg = read_json(path)
    steps = json_number(cfg.get("num_train_timesteps", 1000), "num_train_timesteps", path)
    if not 1 <= steps <= MAX_DIFFUSION_STEPS:
        raise CheckpointError(f"{path}: num_train_timesteps must be in [1, {MAX_DIFFUSION_STEPS}], got {steps}")
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{path}: trained_betas are not supported (use a named beta_schedule)")
    schedule = cfg.get("beta_schedule", "linear")
    if schedule == "linear":
        scale = 1000 / steps
        start = json_number(cfg.get("beta_start", 1e-4), "beta_start", path, float)
        end = json_number(cfg.get("beta_end", 0.02), "beta_end", path, float)
        if abs(start - scale * 1e-4) > 1e-9 or abs(end - scale * 0.02) > 1e-9:
            raise CheckpointError(f"{path}: linear betas {start}..{end} over {steps} steps are not DiT's "
                                  f"{scale * 1e-4:g}..{scale * 0.02:g}")
        name = "linear"
    elif schedule == "squaredcos_cap_v2":
        name = "cosine"
    else:
        raise CheckpointError(f"{path}: beta_schedule {schedule!r} is not supported (linear, squaredcos_cap_v2)")
    prediction = str(cfg.get("prediction_type", "epsilon"))
    if prediction not in _PREDICTIONS:
        raise CheckpointError(f"{path}: prediction_type {prediction!r} is not supported ({', '.join(_PREDICTIONS)})")
    xstart, v = _PREDICTIONS[prediction]
    return {"kind": "gaussian", "noise_schedule": name, "diffusion_steps": steps, "predict_xstart": xstart,
            "predict_v": v}


#: diffusers scheduler class -> (dtx sampler, the scheduler-config keys that are that sampler's options)
_SCHEDULER_SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DDIMScheduler": ("ddim", ()),
    "DDPMScheduler": ("ddpm", ()),
    "DPMSolverMultistepScheduler": ("dpm-solver", ("solver_order", "algorithm_type")),
}


def scheduler_sampling(source: DiffusersSource) -> dict[str, Any]:
    """The ``sample`` settings (``sampler``, ``sampler_options``) matching a pipeline's scheduler class, so ``dtx
    sample PIPELINE`` steps as the pipeline does (DPM-Solver++ for PixArt, DDIM for Latte); empty without a
    scheduler or for a class dtx has no sampler for (the family's default sampler then applies)."""
    scheduler = source.component("scheduler")
    if scheduler is None or not (scheduler / SCHEDULER_CONFIG).is_file():
        return {}
    cfg = read_json(scheduler / SCHEDULER_CONFIG)
    known = _SCHEDULER_SAMPLERS.get(str(cfg.get("_class_name", "")))
    if known is None:
        return {}
    sampler, keys = known
    out = {"sampler": sampler, "sampler_options": {k: cfg[k] for k in keys if cfg.get(k) is not None}}
    if sampler in ("ddim", "ddpm") and cfg.get("timestep_spacing", "leading") == "leading":
        out["timestep_spacing"] = "leading"  # the scheduler's default: t = 0, T/N, 2T/N, ... (DiT's: even sections)
    return out


def latent_facts(source: DiffusersSource, channels: int, size: tuple[int, int], frames: int | None = None,
                 num_classes: int = 0, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``data_info`` of a diffusers transformer: latents, with the pipeline's VAE (folder, scale, downsample)
    when there is one, so ``dtx sample PIPELINE`` decodes without ``--vae``."""
    info: dict[str, Any] = {"channels": channels, "height": size[0], "width": size[1], "frames": frames,
                            "num_classes": num_classes, "is_latent": True, "fields": list(fields)}
    vae = source.component("vae")
    stored = stored_facts(source).get("data_info")
    if vae is None and stored is not None:  # a dtx export: its own data facts (a pixel-space model needs no VAE)
        return _stored_data_info(source, stored, info)
    if vae is not None:
        cfg = read_json(vae / CONFIG)
        info.update(vae=str(vae), latent_scale=json_number(cfg.get("scaling_factor", 0.18215), "scaling_factor",
                                                           vae / CONFIG, float),
                    latent_shift=json_number(cfg.get("shift_factor") or 0.0, "shift_factor", vae / CONFIG, float),
                    vae_downsample=2 ** (len(cfg.get("block_out_channels") or [0]) - 1))
    return info


def sampling_config(source: DiffusersSource, data_info: dict[str, Any], sample: Mapping[str, Any] | None = None,
                    conditioning: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stored config ``dtx sample`` reads for a diffusers folder: data facts, the objective of the pipeline's
    scheduler (without one: the objective a dtx export recorded, else DDPM linear), the family's conditioning and
    sampling defaults, overridden by the sections a dtx export recorded (``DTX_FACTS``)."""
    stored = stored_facts(source)
    scheduler = source.component("scheduler")
    objective = (objective_from_scheduler(scheduler / SCHEDULER_CONFIG)
                 if scheduler is not None and (scheduler / SCHEDULER_CONFIG).is_file()
                 else dict(stored.get("objective") or {"kind": "gaussian"}))
    sample = {**(sample or {}), **stored.get("sample", {})}
    conditioning = stored.get("conditioning") or conditioning
    cfg: dict[str, Any] = {"data_info": data_info, "objective": objective}
    if sample:
        cfg["sample"] = dict(sample)
    if conditioning:
        cfg["conditioning"] = dict(conditioning)
    return cfg


def check_output_folder(out: Path) -> Path:
    """``out`` may be new or empty; anything already there is refused, so an export never mixes with old files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} exists and is not an empty folder")
    check_output_path(out, "output", folder=True)
    return out
