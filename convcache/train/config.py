"""Configuration of the train stage's long runs, importable without TensorFlow or scikit-learn (the CLI
builds it, validated, before anything heavy starts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convcache.augment import AugmentPolicy
from convcache.backbone import weights
from convcache.errors import ConvcacheError
from convcache.protocol import BOOK_BATCH_SIZE, BOOK_DROPOUT, BOOK_EPOCHS, BOOK_LEARNING_RATE, BOOK_UNITS


@dataclass
class ReferenceConfig:
    """What `convcache reference` runs; validated when constructed (before TensorFlow starts).
    Defaults are the book's schedule: 30 epochs, batch 20, RMSprop 2e-5."""

    data: str
    weights: str = "hed"
    output: str = "reference"
    epochs: int = BOOK_EPOCHS
    augment: bool = True
    input_size: int = 150
    batch_size: int = BOOK_BATCH_SIZE
    seed: int = 0
    fine_tune: str | None = None
    fine_tune_epochs: int = 2
    policy: str | AugmentPolicy = "keras3"
    learning_rate: float = BOOK_LEARNING_RATE
    layer: str | None = None
    pooling: str | None = None
    patience: int | None = None
    dropout: float = BOOK_DROPOUT
    progress: bool = True
    unfreeze: str | None = None  # "all": no frozen layer (the consequence of not freezing; not cacheable)
    preprocess: str = "caffe"  # as the extractor it is compared with: caffe or rescale (the book's x/255)
    standardize: bool = False  # standardise the features before the head, as DenseHead(standardize=True)
    units: int = BOOK_UNITS
    augment_seed: int | None = None  # the copies' seed, as `extract --seed` (None: `seed`)

    def __post_init__(self):
        if self.weights not in weights.NAMED_SOURCES and not Path(self.weights).is_file():
            raise ConvcacheError(f"unknown weights source {self.weights!r}: not one of "
                                 f"{', '.join(weights.NAMED_SOURCES)} and not an existing weights file")
        if self.fine_tune not in (None, "block5"):
            raise ConvcacheError(f"fine-tune {self.fine_tune}: only block5 is supported")
        if self.fine_tune and self.layer not in (None, "block5_pool"):
            raise ConvcacheError(f"fine-tuning block5 with the layer {self.layer}: the cut model has no block5 to "
                                 "fine-tune")
        if min(self.epochs, self.batch_size, self.fine_tune_epochs, self.units) < 1 or self.seed < 0:
            raise ConvcacheError("epochs, batch size, fine-tune epochs and units must be >= 1, the seed >= 0")
        if self.augment_seed is not None and self.augment_seed < 0:
            raise ConvcacheError("the augmentation seed must be >= 0")
        if not 0 <= self.dropout < 1 or not self.learning_rate > 0 or (self.patience is not None and self.patience < 1):
            raise ConvcacheError("dropout must be in [0, 1), the learning rate > 0 and patience >= 1")
        if self.unfreeze not in (None, "all") or (self.unfreeze and self.fine_tune):
            raise ConvcacheError("unfreeze takes 'all' and excludes fine-tuning")
        if self.preprocess not in ("caffe", "rescale"):
            raise ConvcacheError(f"preprocess {self.preprocess!r}: choose caffe or rescale")
        self.policy = AugmentPolicy.parse(self.policy) if isinstance(self.policy, (str, dict)) else self.policy
        if self.augment_seed is None:
            self.augment_seed = self.seed
