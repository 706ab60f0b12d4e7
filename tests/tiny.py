"""The overrides that make the demo preset a seconds-long run (tiny backbone, 32 px, fp32, a small bootstrap, no
figures),
shared by the tests that run whole centralized or federated runs."""

TINY_RUN: tuple[str, ...] = (
    "model.backbone=tiny",
    "preprocess.size=32",
    "train.batch_size=8",
    "train.precision=fp32",
    "train.channels_last=false",
    "evaluate.bootstrap=20",
    "evaluate.figures=false",
)
