"""Typed configuration: `params.yaml` is read here and only here.

Every section is a pydantic model that forbids unknown keys, so a typo in
`params.yaml` fails loudly with the dotted key that is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cwtops.core.errors import CwtopsError

DEFAULT_PARAMS = Path("params.yaml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _checked_s3(value: str, for_triton: bool) -> str:
    """An `s3://` location must parse (the endpoint and credentials come from the environment)."""
    if value.startswith("s3://"):
        from cwtops.core.s3 import parse_s3_url

        try:
            parse_s3_url(value, for_triton=for_triton)
        except CwtopsError as error:
            raise ValueError(str(error)) from None
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseConfig(Section):
    seed: int = 42
    model_name: str = Field("cwtops", pattern=NAME_PATTERN)
    raw_dir: Path = Path("data/raw")
    weights: Path = Path("my.txt")
    artifacts_dir: Path = Path("artifacts")
    results_dir: Path = Path("results")


Auto = Literal["auto"]


class ParseConfig(Section):
    # analytic: the modulus of each response with its filter's Hilbert pair's (a complex wavelet's
    # envelope); abs keeps a real filter's swing at twice its frequency, which carries the phase
    magnitude: Literal["analytic", "abs", "square", "none"] = "abs"
    # auto: about 128-256 time steps for the head (cwtops/core/derived.py); or a fixed decimation
    hop: Annotated[int, Field(ge=1, le=64)] | Auto = "auto"
    # mean: each filter's magnitude averaged over every `hop` samples (the response computed at every
    # sample); sample: the magnitude read at every hop-th sample only (cheaper, aliased)
    decimate: Literal["mean", "sample"] = "mean"
    # auto: the generated default bank (what `cwtops init` writes) is refitted to the signal
    # length; a user's own bank is always used as written. file: the file's filters, always.
    bank: Literal["auto", "file"] = "auto"


class BalanceConfig(Section):
    cap_factor: float = Field(3.0, gt=0)
    # the limit never drops below this: small datasets keep every signal (a class of 2 next to
    # one of 300 would otherwise cap every class at 6)
    min_limit: int = Field(300, ge=1)
    samples_per_class: int | None = Field(None, ge=1)
    # auto: a 10% carve-out only when every class has 500+ signals; else train on all of them
    # and keep the checkpoint with the lowest training loss (cwtops/core/derived.py)
    val_fraction: Annotated[float, Field(ge=0, lt=0.5)] | Auto = "auto"
    test_fraction: float = Field(0.2, gt=0, lt=0.5)


class TrainConfig(Section):
    # auto: from the number of training signals (cwtops/core/derived.py); explicit values win
    epochs: Annotated[int, Field(ge=1, le=10_000)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Auto = "auto"
    lr: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(1e-2, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    patience: Annotated[int, Field(ge=1)] | Auto = "auto"
    head: Literal["1d", "2d"] = "1d"  # 1d: convolutions over time, scales as channels; 2d: over (scale, time)
    # ensemble (1-D head): heads on the one front-end, probabilities averaged, one ONNX graph;
    # auto: as many (up to 5) as the training budget leaves room for after a full schedule
    members: Annotated[int, Field(ge=1, le=16)] | Auto = "auto"
    # conv1..conv4 widths and fc1's; auto: narrower heads for small training sets (cwtops/core/derived.py)
    channels: tuple[int, int, int, int] | Auto = "auto"
    # 1d head: the standardised signal as one more input channel beside the scales; auto: for small training sets
    raw_channel: bool | Auto = False
    hidden: Annotated[int, Field(ge=1)] | Auto = "auto"
    # 1d head: conv1..conv4's dilations (kernels 7, 5, 5, 3): four ints, or a list of such lists, the
    # branches each conv's channels are split between; auto: a wide branch whose receptive field is
    # about the T steps the head sees (d x (1, 4, 8, 16)) and a near one, (1, 2, 4, 8) (cwtops/core/derived.py)
    dilations: tuple[int, int, int, int] | list[tuple[int, int, int, int]] | Auto = "auto"
    # 1d head: each member compresses the scales' magnitudes as log1p(g * m) with a learnt gain g per
    # scale (the log's floor learnt per scale); false: log1p(m), the same fixed compression for every scale
    gain: bool = True
    # 1d head: a quantile member beside the convolutional members, a logistic regression on this many quantiles
    # of the standardised signal's absolute steps |x[t + k] - x[t]| (log1p) at each of `quantile_lags` and as
    # many of its values, each feature also read through `quantile_bins` soft thresholds at its training
    # quantiles, fitted by L-BFGS once the members are trained; the model's output mixes its probabilities
    # with the members' mean at `quantile_weight`; 0: off
    quantiles: int = Field(16, ge=0, le=256)
    quantile_weight: float = Field(0.33, gt=0, lt=1)
    quantile_lags: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1, max_length=16)
    quantile_bins: int = Field(8, ge=0, le=64)
    dropout: float = Field(0.1, ge=0, lt=1)
    stem: Literal["pool", "strided"] = "strided"  # 2d head: a stride-2 conv1, or conv1 + 2x2 max-pool (4x the cost)
    # augmentation, on the scalogram: a random shift in time of up to this share of its length
    shift: float = Field(0.1, ge=0, lt=0.5)
    # augmentation: each scalogram stretched or squeezed in time about its centre by a random factor
    # in [1 - warp, 1 + warp] (linear interpolation, edges repeated); 0: off
    warp: float = Field(0.1, ge=0, lt=0.5)
    mixup: float = Field(0.0, ge=0)  # Beta(a, a) mixing of pairs; 0: off
    # weight averaging (without a validation split): the checkpoint is the mean of the weights at the
    # end of each epoch in this last share of the schedule, BatchNorm statistics recomputed on the
    # training split; 0: off (the epoch with the lowest training loss is kept)
    average: float = Field(0.0, ge=0, lt=1)
    # memory: scalograms computed once and held; stream: batches read from the raw
    # shards and transformed per batch (flat memory); auto: memory while they fit 1 GiB per process
    input: Literal["auto", "memory", "stream"] = "auto"
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps in all; null: the schedule
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    num_workers: int = Field(0, ge=0)  # streaming: DataLoader processes reading batches ahead
    threads: int = Field(0, ge=0)

    @field_validator("quantiles")
    @classmethod
    def _quantile_count(cls, value: int) -> int:
        if value == 1:
            raise ValueError("give 0 (off) or at least 2 quantiles (the smallest and the largest value)")
        return value

    @field_validator("quantile_lags")
    @classmethod
    def _distinct_lags(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"give each step lag once, got {value}")
        return value

    @field_validator("channels", "dilations")
    @classmethod
    def _positive(cls, value: tuple | list | str) -> tuple | list | str:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("give four values (conv1..conv4), or for dilations a list of such branches")
        flat = [c for item in value for c in (item if isinstance(item, tuple) else (item,))]
        if any(c < 1 for c in flat):
            raise ValueError("every value must be at least 1")
        return value


TunedKey = Literal["dilations", "raw_channel", "warp", "dropout", "average", "mixup", "lr"]


class TuneConfig(Section):
    """The optional search (tasks/tune.py): Optuna trials over a few train settings, each scored by
    cross-validation on the training split alone; train reads the chosen values."""

    trials: int = Field(0, ge=0, le=500)  # 0: off, train uses params.yaml as written
    folds: int = Field(3, ge=2, le=10)  # stratified folds of the training split; one head trained per fold
    # all trials' training together, as a multiple of train's FLOP budget (cwtops/core/derived.py):
    # it sets the epochs of each fold's head (at most train's own)
    budget: float = Field(0.5, gt=0, le=100)
    timeout: float = Field(600, gt=0)  # seconds; no new trial starts after this (a time box)
    space: tuple[TunedKey, ...] = ("dilations", "raw_channel", "warp", "dropout", "average")
    max_signals: int = Field(2000, ge=10)  # a stratified subsample of a larger training split is searched

    @field_validator("space")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("list one or more distinct train settings to search")
        return value


class EvaluateConfig(Section):
    report_digits: int = Field(4, ge=1, le=10)


class ExportConfig(Section):
    opset: int = Field(18, ge=17, le=23)
    dynamic_length: bool = False


class ParityConfig(Section):
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, gt=0)
    batch_sizes: tuple[int, ...] = (1, 7, 64)
    random_signals: int = Field(64, ge=1)
    max_test_signals: int = Field(10_000, ge=1)  # real test signals compared (the first ones); bounds memory
    # a real test signal whose class differs between PyTorch and ONNX Runtime passes where its two
    # classes' logits are tied within the tolerance (counted as argmax_ties); false: it fails
    allow_ties: bool = True


class MlflowConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(5000, ge=1, le=65535)
    experiment: str = "cwtops"
    backend_store: str = "sqlite:///mlflow/mlflow.db"
    artifacts_destination: str = "mlflow/artifacts"  # a folder, or s3://bucket/prefix (docs/s3.md)

    @field_validator("artifacts_destination")
    @classmethod
    def _s3_destination(cls, value: str) -> str:
        return _checked_s3(value, for_triton=False)


class TritonConfig(Section):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    model_repository: str = "model_repository"  # a folder, or s3://bucket/prefix (docs/s3.md)
    max_batch_size: int = Field(64, ge=1, le=4096)
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = Field(0, ge=0)  # batch what is queued, never wait (BENCHMARKS.md, serving)
    instance_count: int = Field(2, ge=1, le=64)
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    intra_op_threads: int = Field(1, ge=0)
    # TensorRT as ONNX Runtime's execution accelerator on GPU instances (the NGC container has it).
    gpu_accelerator: Literal["none", "tensorrt"] = "none"
    tensorrt_precision: Literal["FP32", "FP16"] = "FP16"
    tensorrt_workspace_bytes: int = Field(1 << 30, ge=1 << 20)

    @model_validator(mode="after")
    def _accelerator_needs_gpu(self) -> "TritonConfig":
        if self.gpu_accelerator != "none" and self.instance_kind != "KIND_GPU":
            raise ValueError(f"gpu_accelerator '{self.gpu_accelerator}' runs on GPU instances: set instance_kind: KIND_GPU "
                             "or gpu_accelerator: none")
        return self

    @field_validator("model_repository")
    @classmethod
    def _s3_repository(cls, value: str) -> str:
        return _checked_s3(value, for_triton=True)


class RolloutConfig(Section):
    promotion: Literal["manual", "auto"] = "manual"
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1"] = "macro_f1"
    margin: float = Field(0.0, ge=0)
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(8787, ge=1, le=65535)


class MonitoringConfig(Section):
    """The production loop: the inference log the serving path writes, shadow scoring, drift."""

    inference_log: str = "inference_log"  # a folder, or s3://bucket/prefix (docs/s3.md)
    sample_rate: float = Field(0.1, ge=0, le=1)  # share of production requests logged; 0: off
    queue_size: int = Field(1024, ge=1)  # requests waiting to be written per model instance; beyond: dropped, counted
    flush_seconds: float = Field(2.0, gt=0)
    min_signals: int = Field(200, ge=10)  # a drift pass judges only this many new logged signals or more
    drift_threshold: float = Field(0.25, gt=0)  # population stability index of any feature above it: drift
    max_signals: int = Field(5000, ge=10)  # newest logged signals a shadow or drift pass reads at most

    @field_validator("inference_log")
    @classmethod
    def _s3_log(cls, value: str) -> str:
        return _checked_s3(value, for_triton=False)


VariantName = Literal["optimized", "int8", "fp16"]
VARIANTS: tuple[VariantName, ...] = ("optimized", "int8", "fp16")


class VariantsConfig(Section):
    """Thresholds and build options (defaults are the measured choice; see BENCHMARKS.md)."""

    variants: tuple[VariantName, ...] = VARIANTS
    max_accuracy_drop: float = Field(0.5, ge=0, le=100)  # percentage points of test accuracy
    min_agreement: float = Field(0.99, ge=0, le=1)  # share of test signals with float32's argmax
    optimization_level: Literal["basic", "extended"] = "extended"
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_signals: int = Field(256, ge=1)
    # Relu too: it fuses into QLinearConv's output, else a DequantizeLinear/QuantizeLinear pair
    # brackets every Relu.
    op_types_to_quantize: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "MaxPool", "Relu")
    quantize_frontend: bool = True  # the 112-filter CWT Conv; its int8 error is below the gate (measured)
    # conv1 (1 input channel, 8 outputs) keeps float activations and int8 weights: its QLinearConv
    # (im2col + an int8 GEMM with K = 9, N = 8, one image at a time) took 3.6 ms of a 13 ms batch of 64,
    # the float Conv on the int8-stored weights 1.25 ms (ONNX Runtime's profile, 2 EPYC cores)
    conv1_float_input: bool = True
    batch_size: int = Field(64, ge=1)
    repeats: int = Field(30, ge=1)
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads for timing; 0: all cores



class Params(Section):
    base: BaseConfig = BaseConfig()
    parse: ParseConfig = ParseConfig()
    balance: BalanceConfig = BalanceConfig()
    tune: TuneConfig = TuneConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    parity: ParityConfig = ParityConfig()
    mlflow: MlflowConfig = MlflowConfig()
    triton: TritonConfig = TritonConfig()
    rollout: RolloutConfig = RolloutConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    variants: VariantsConfig = VariantsConfig()


# Keys that moved out of params.yaml: where they live now.
MOVED = {
    "rollout.retrain_cron": "the nightly retraining schedule is written in prefect.yaml (deployment `nightly`)",
    "rollout.reconcile_seconds": "the reconciler's schedule is written in prefect.yaml (deployment `reconcile`)",
}


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden" and key in MOVED:
            lines.append(f"'{key}' is no longer a param: {MOVED[key]}; remove it from the params file")
        elif item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' (remove it or check its spelling)")
        else:
            lines.append(f"'{key}': {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def params_from_dict(raw: dict, source: str = "<dict>") -> Params:
    """Validate a parsed params mapping; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise CwtopsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        allowed = ", ".join(Params.model_fields)
        raise CwtopsError(f"{source}: invalid params: {_describe(error)}. Sections: {allowed}.") from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate `params.yaml` (safe_load only)."""
    path = Path(path)
    if not path.exists():
        raise CwtopsError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise CwtopsError(f"{path}: not valid YAML: {error}") from None
    return params_from_dict(raw, str(path))


def flatten(params: Params) -> dict[str, str]:
    """`section.key -> value` strings, the form MLflow params and DVC's params_show use."""
    flat: dict[str, str] = {}
    for section, values in params.model_dump(mode="json").items():
        flat |= flatten_section(section, values)
    return flat


def flatten_section(section: str, values: dict) -> dict[str, str]:
    """One section's `section.key -> value` strings."""
    return {f"{section}.{key}": str(value) for key, value in values.items()}
