"""Configuration of the train stage's long runs, importable without TensorFlow or scikit-learn (the CLI
builds it, validated, before anything heavy starts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convcache.augment import AugmentPolicy
from convcache.backbone import weights
from convcache.errors import ConvcacheError


@dataclass
class ReferenceConfig:
    """What `convcache reference` runs; validated when constructed (before TensorFlow starts).
    Defaults are the book's schedule: 30 epochs, batch 20, RMSprop 2e-5."""

    data: str
    weights: str = "hed"
    output: str = "reference"
    epochs: int = 30
    augment: bool = True
    input_size: int = 150
    batch_size: int = 20
    seed: int = 0
    fine_tune: str | None = None
    fine_tune_epochs: int = 2
    policy: str = "keras3"
    learning_rate: float = 2e-5
    layer: str | None = None
    pooling: str | None = None
    patience: int | None = None
    dropout: float = 0.5
    progress: bool = True
    unfreeze: str | None = None  # "all": no frozen layer (the consequence of not freezing; not cacheable)
    preprocess: str = "caffe"  # as the extractor it is compared with: caffe or rescale (the book's x/255)
    standardize: bool = False  # standardise the features before the head, as DenseHead(standardize=True)

    def __post_init__(self):
        if self.weights not in weights.NAMED_SOURCES and not Path(self.weights).is_file():
            raise ConvcacheError(f"unknown weights source {self.weights!r}: not one of "
                                 f"{', '.join(weights.NAMED_SOURCES)} and not an existing weights file")
        if self.fine_tune not in (None, "block5"):
            raise ConvcacheError(f"--fine-tune {self.fine_tune}: only block5 is supported")
        if self.fine_tune and self.layer not in (None, "block5_pool"):
            raise ConvcacheError(f"--fine-tune block5 with --layer {self.layer}: the cut model has no block5 to "
                                 "fine-tune")
        if min(self.epochs, self.batch_size, self.fine_tune_epochs) < 1 or self.seed < 0:
            raise ConvcacheError("--epochs, --batch-size and --fine-tune-epochs must be >= 1, --seed >= 0")
        if not 0 <= self.dropout < 1 or not self.learning_rate > 0 or (self.patience is not None and self.patience < 1):
            raise ConvcacheError("--dropout must be in [0, 1), --learning-rate > 0, --patience >= 1")
        if self.unfreeze not in (None, "all") or (self.unfreeze and self.fine_tune):
            raise ConvcacheError("--unfreeze takes 'all' and excludes --fine-tune")
        if self.preprocess not in ("caffe", "rescale"):
            raise ConvcacheError(f"preprocess {self.preprocess!r}: choose caffe or rescale")
        self.policy_obj = AugmentPolicy.parse(self.policy)

    def run(self) -> dict:
        from convcache.train.reference import run_reference

        return run_reference(self.data, self.weights, self.output, self.epochs, self.augment, self.input_size,
                             self.batch_size, self.seed, self.fine_tune, self.fine_tune_epochs, self.policy_obj,
                             self.learning_rate, self.layer, self.pooling, self.patience, self.dropout,
                             progress=self.progress, unfreeze=self.unfreeze, preprocess=self.preprocess,
                             standardize=self.standardize)
