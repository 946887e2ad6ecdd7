"""The training schema: one dataclass per section, filled from a YAML recipe plus ``key=value`` overrides.

``load_train_config("recipe.yaml", ["optim.lr=1e-3"])`` returns a validated ``TrainConfig``; the resolved config is
saved in the run folder and inside every checkpoint so that ``dtx sample`` can rebuild the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

from ..conditioning import MAX_SAMPLES, ConditioningConfig, GuidanceStep
from ..finetune import FinetuneConfig
from ..config import check, check_finite, load_config
from ..layers.blocks import recompute_policy
from ..diffusion.gaussian import MAX_DIFFUSION_STEPS


FLOAT32_MAX = 3.4028234663852886e38  # AdamW's scalars (step size, decay factor) are applied in float32


@dataclass
class ModelConfig:
    """A registered model name plus keyword overrides; input size, channels and classes default to the data's.

    ``init_from`` (a loader option, not a model option) starts a fresh run from another checkpoint's weights: a dtx
    folder, a run or a file; the model family maps the keys and a report of loaded/skipped/new keys is logged.
    """

    name: str = "DiT-S/2"
    options: dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None


@dataclass
class BucketsConfig:
    """Size buckets (``dtx.data.buckets``): the dataset keeps each item's own size, as its nearest bucket."""

    shapes: list[Any] = field(default_factory=list)  # [H, W] image buckets or [F, H, W] clip buckets; the first
    # is the size the model is built for
    max_tokens: int = 0  # tokens of one micro-batch on one rank: a bucket's batch is max_tokens // its tokens per
    # sample (frames x patches); 0: every bucket takes the run's micro-batch


@dataclass
class DataConfig:
    """Dataset from the ``dataset`` registry; ``batch_size`` is the global batch of one optimizer step."""

    name: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    num_workers: int = 0
    vae: Optional[str] = None  # local AutoencoderKL folder: encode pixel data to latents on the fly (frozen)
    buckets: Optional[BucketsConfig] = None  # batches of one shape from items of several sizes


@dataclass
class ObjectiveConfig:
    """A registered objective (``gaussian``: DDPM/IDDPM; ``karras``: EDM preconditioning; ``flow``: flow matching
    on SiT's paths) and its options."""

    kind: str = "gaussian"
    noise_schedule: str = "linear"  # beta schedule from the ``schedule`` registry (gaussian)
    diffusion_steps: int = 1000
    predict_xstart: bool = False
    predict_v: bool = False
    sigma_data: float = 0.5
    sigma_sample: Literal["log-normal", "cosine-interpolated"] = "log-normal"
    image_d: Optional[int] = None  # cosine-interpolated: image size in pixels (None: the data's larger side)
    noise_d_low: int = 32  # cosine-interpolated: the low-resolution end of the shifted schedules
    noise_d_high: Optional[int] = None  # cosine-interpolated: the high end (None: image_d)
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_schedule: str = "karras"  # sigma schedule from the ``schedule`` registry (karras sampling)
    weighting: str = "karras"
    weighting_options: dict[str, float] = field(default_factory=dict)  # e.g. {gamma: 5.0} for min-snr
    # flow (``dtx.diffusion.flow``; flow time t is 1 at the noise):
    path: str = "linear"  # linear (rectified flow), gvp, vp
    prediction: str = "velocity"  # velocity, noise, score
    loss_weight: str = "none"  # none, velocity, likelihood (SiT's; noise and score predictions)
    t_sample: str = "uniform"  # uniform, logit-normal (t_mean, t_std), shift (uniform, then t_shift)
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0  # SD3's time shift s, for the shift draws and the sampling grid
    t_shift_tokens: bool = False  # the shift from the token count instead (Flux's rule)
    train_eps: Optional[float] = None  # the ends kept off, as SiT (None: SiT's defaults for path and prediction)
    sample_eps: Optional[float] = None
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # flow times where guidance acts


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up, a constant lr, then optionally a linear decay over the run's last
    ``decay_steps`` steps down to ``decay_to`` x lr (warmup-stable-decay); ``grad_clip`` 0 disables clipping."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay_steps: int = 0  # 0: no decay; counted back from max_steps (a shorter run decays all the way)
    decay_to: float = 0.0
    grad_clip: float = 0.0


@dataclass
class EMAConfig:
    """``constant``: fixed decay (DiT 0.9999); ``warmup``: 1 - (1 + step)^-power capped at ``max_decay``."""

    kind: Literal["constant", "warmup"] = "constant"
    decay: float = 0.9999
    power: float = 0.6667
    max_decay: float = 0.9999


TIMESTEP_SPACINGS = ("sections", "leading")


@dataclass
class SampleConfig:
    """Sampling defaults for the periodic grids (``every`` steps, 0 = only at the end) and for ``dtx sample``.

    ``cfg`` is classic guidance over every conditioner with a null condition; ``guidance_scales`` (registered
    conditioner name -> scale, e.g. ``{motion: 1.2}``: GenTron's motion-free guidance) puts terms of their own
    before it; ``guidance`` lists nested terms instead (each switches on more conditioners), overriding both.
    """

    every: int = 0
    sampler: str = "ddim"
    sampler_options: dict[str, Any] = field(default_factory=dict)  # e.g. {eta: 0.0, solver_type: heun}
    steps: int = 50
    cfg: float = 1.0
    guide_channels: Optional[int] = None
    guidance: list[GuidanceStep] = field(default_factory=list)
    guidance_scales: dict[str, float] = field(default_factory=dict)
    n_per_class: int = 4  # samples per subject (class or prompt); the total for unconditional models
    classes: list[int] = field(default_factory=list)  # empty: the first (up to) ten classes
    prompts: list[str] = field(default_factory=list)
    negative_prompt: Optional[str] = None
    fps: float = 8.0  # videos
    cache: Optional[str] = None  # a registered step cache (first-block, teacache) skipping block work between steps
    cache_options: dict[str, Any] = field(default_factory=dict)  # e.g. {threshold: 0.1}
    # Gaussian samplers: which training timesteps `steps` steps visit: sections (DiT) or leading (diffusers' DDIM)
    timestep_spacing: str = "sections"

    def validate(self, prefix: str = "sample.") -> None:
        """Ranges of the sampling settings, errors naming ``prefix`` + the key."""
        check(self.steps >= 1, prefix + "steps", "must be >= 1")
        check(self.every >= 0, prefix + "every", "must be >= 0")
        check(1 <= self.n_per_class <= MAX_SAMPLES, prefix + "n_per_class",
              f"must be in [1, {MAX_SAMPLES}], got {self.n_per_class}")
        check(self.fps > 0, prefix + "fps", "must be > 0")
        check(self.guide_channels is None or self.guide_channels >= 1, prefix + "guide_channels",
              f"must be >= 1 (or null for all channels), got {self.guide_channels}")
        check(all(c >= 0 for c in self.classes), prefix + "classes", f"class ids must be >= 0, got {list(self.classes)}")
        check(self.timestep_spacing in TIMESTEP_SPACINGS, prefix + "timestep_spacing",
              f"must be one of {', '.join(TIMESTEP_SPACINGS)}, got {self.timestep_spacing!r}")


def resolve_sample(stored: SampleConfig, overrides: dict[str, Any]) -> SampleConfig:
    """The sampling settings of one request: a run's ``sample`` section with ``overrides`` (``{key: value}``, as
    ``dtx sample``'s flags give them) merged in the way ``dtx train`` merges ``key=value`` overrides, then checked.

    Two rules keep the result meaning what was asked: a new ``cfg`` without new ``guidance`` drops the stored nested
    terms (which would override it), and a new ``sampler`` keeps none of the stored sampler's options."""
    import dataclasses

    base = dataclasses.asdict(stored)
    if "cfg" in overrides and "guidance" not in overrides:
        base["guidance"] = []
    if overrides.get("sampler", stored.sampler) != stored.sampler:
        base["sampler_options"] = {}
    merged = load_config(SampleConfig, base, overrides)
    check_finite(merged, "sample")
    merged.validate()
    return merged


@dataclass
class ParallelConfig:
    """How the workers share the work beyond data parallelism."""

    context: int = 1  # ranks splitting each sample's tokens (context parallelism); data parallel = workers / context


@dataclass
class TrainConfig:
    """Everything one training run needs; ``out``, ``max_steps`` and ``seed`` are also set by ``dtx train`` flags."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    out: str = "runs/default"
    max_steps: int = 1000
    max_minutes: float = 0.0  # safety net: stop after this much training time, with a warning (0 = no limit)
    seed: int = 0
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast on CUDA; on CPU as cpu_bf16 says
    cpu_bf16: Union[bool, str] = "auto"  # with precision bf16, autocast on CPU too; auto: where it has native bf16
    tf32: bool = True
    recompute: Union[int, str] = "none"  # recompute activations in the backward: none, all, every-K (or K) blocks
    compile: Optional[bool] = None  # torch.compile the model (eager fallback); null: on CUDA only
    log_every: int = 20
    ckpt_every: int = 500
    keep_last: int = 3
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops

    #: keys of earlier versions and the key that replaced each (refused in recipes, translated in stored configs)
    renamed_keys: ClassVar[dict[str, str]] = {"activation_checkpointing": "recompute", "checkpoint_every": "recompute"}

    def validate(self) -> None:
        """Types come from the schema; here: every float finite, ranges, and rules between fields. Rules that need
        the data or the model (labels vs ``num_classes``, ``sample.classes``) are in ``training.checks``."""
        check_finite(self)
        check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.max_minutes >= 0, "max_minutes", "must be >= 0")
        check(isinstance(self.cpu_bf16, bool) or self.cpu_bf16 == "auto", "cpu_bf16",
              f"must be true, false or auto, got {self.cpu_bf16!r}")
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        check(self.parallel.context >= 1, "parallel.context", f"must be >= 1, got {self.parallel.context}")
        if self.data.buckets is not None:
            check(bool(self.data.buckets.shapes), "data.buckets.shapes", "give at least one [H, W] or [F, H, W]")
            check(self.data.buckets.max_tokens >= 0, "data.buckets.max_tokens",
                  f"must be >= 0, got {self.data.buckets.max_tokens}")
        check(self.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        check(self.data.batch_size % self.grad_accum == 0, "data.batch_size",
              f"{self.data.batch_size} is not divisible by grad_accum={self.grad_accum}")
        check(self.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.data.num_workers}")
        check(self.optim.lr > 0, "optim.lr", "must be > 0")
        check(len(self.optim.betas) == 2, "optim.betas", "needs two values")
        check(all(0.0 <= b < 1.0 for b in self.optim.betas), "optim.betas",
              f"both must be in [0, 1), got {list(self.optim.betas)}")
        check(self.optim.lr <= FLOAT32_MAX * (1 - self.optim.betas[0]), "optim.lr",
              f"{self.optim.lr:g} / (1 - betas[0]) overflows float32 in AdamW's first update")
        check(0 < self.optim.eps <= FLOAT32_MAX, "optim.eps", f"must be in (0, {FLOAT32_MAX:.4g}], got {self.optim.eps}")
        check(self.optim.lr * self.optim.weight_decay <= FLOAT32_MAX, "optim.weight_decay",
              "lr x weight_decay overflows float32")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.optim.weight_decay}")
        check(self.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.optim.warmup_steps}")
        check(self.optim.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {self.optim.decay_steps}")
        check(0.0 <= self.optim.decay_to <= 1.0, "optim.decay_to", f"must be in [0, 1], got {self.optim.decay_to}")
        check(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        check(0.0 <= self.ema.decay < 1.0, "ema.decay", "must be in [0, 1)")
        check(0.0 <= self.ema.max_decay < 1.0, "ema.max_decay", "must be in [0, 1)")
        check(self.ema.power > 0, "ema.power", "must be > 0")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.ckpt_every >= 1, "ckpt_every", "must be >= 1")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.milestone_every >= 0, "milestone_every", "must be >= 0 (0 keeps no milestones)")
        check(self.max_nonfinite >= 1, "max_nonfinite", "must be >= 1")
        recompute_policy(self.recompute, "recompute")
        self.sample.validate()
        o = self.objective
        check(1 <= o.diffusion_steps <= MAX_DIFFUSION_STEPS, "objective.diffusion_steps",
              f"must be in [1, {MAX_DIFFUSION_STEPS}], got {o.diffusion_steps}")
        check(o.sigma_min > 0 and o.sigma_max > o.sigma_min, "objective.sigma_max", "needs 0 < sigma_min < sigma_max")
        check(o.sigma_data > 0, "objective.sigma_data", f"must be > 0, got {o.sigma_data}")
        check(o.p_std > 0, "objective.p_std", f"must be > 0, got {o.p_std}")
        check(o.rho > 0, "objective.rho", f"must be > 0, got {o.rho}")
        check(o.noise_d_low >= 1, "objective.noise_d_low", "must be >= 1")
        check(o.image_d is None or o.image_d >= 1, "objective.image_d", "must be >= 1 (or null)")
        check(o.noise_d_high is None or o.noise_d_high >= 1, "objective.noise_d_high", "must be >= 1 (or null)")
        self._validate_flow()
        self.finetune.validate()
        check(not (self.model.init_from and self.finetune.source), "finetune.from",
              "set either model.init_from (grow a model from another's weights) or finetune.from, not both")

    def _validate_flow(self) -> None:
        from ..diffusion.flow import LOSS_WEIGHTS, PATHS, PREDICTIONS

        o = self.objective
        for key, value, allowed in (("path", o.path, PATHS), ("prediction", o.prediction, PREDICTIONS),
                                    ("loss_weight", o.loss_weight, LOSS_WEIGHTS),
                                    ("t_sample", o.t_sample, ("uniform", "logit-normal", "shift"))):
            check(value in allowed, f"objective.{key}", f"must be one of {', '.join(allowed)}, got {value!r}")
        check(o.t_std > 0, "objective.t_std", f"must be > 0, got {o.t_std}")
        check(0 < o.t_shift < 1e3, "objective.t_shift", f"must be in (0, 1000), got {o.t_shift}")
        for key in ("train_eps", "sample_eps"):
            eps = getattr(o, key)
            check(eps is None or 0 <= eps < 0.5, f"objective.{key}", f"must be in [0, 0.5) (or null), got {eps}")
        gi = o.guidance_interval
        check(len(gi) == 2 and 0 <= gi[0] <= gi[1] <= 1, "objective.guidance_interval",
              f"must be [low, high] with 0 <= low <= high <= 1, got {list(gi)}")
        check(o.kind != "flow" or o.prediction != "velocity" or o.loss_weight == "none", "objective.loss_weight",
              f"{o.loss_weight!r} applies to noise and score predictions; a velocity model's loss is unweighted")


def load_train_config(*sources: Any) -> TrainConfig:
    """Validated ``TrainConfig`` from YAML paths, dicts and dotlists (later sources win)."""
    return load_config(TrainConfig, *sources)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain-container form of a config (for checkpoints and ``config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_from_dict(d: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """The config a run or checkpoint stored (earlier versions' renamed keys translated), with ``overrides``."""
    return load_train_config(upgrade_stored(d), list(overrides))


def upgrade_stored(d: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the keys of earlier versions in today's form: ``activation_checkpointing`` and
    ``checkpoint_every`` become ``recompute``."""
    if not any(k in d for k in TrainConfig.renamed_keys):
        return d
    d = dict(d)
    on, every = d.pop("activation_checkpointing", False), d.pop("checkpoint_every", 1)
    d.setdefault("recompute", int(every) if on else "none")
    return d
