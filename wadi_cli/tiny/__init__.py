"""The embedded tiny text-to-image model: procedural data, architecture, classifier, metrics."""

from wadi_cli.tiny.arch import (
    TINY_CLASSIFIER_PATH,
    TINY_PIPELINE_DIR,
    TINY_STUDENT_PATH,
    build_tiny_components,
    build_tokenizer,
    load_tiny_pipeline,
    make_pipeline,
    save_tiny_pipeline,
    tiny_pipeline_available,
)

__all__ = [
    "TINY_CLASSIFIER_PATH",
    "TINY_PIPELINE_DIR",
    "TINY_STUDENT_PATH",
    "build_tiny_components",
    "build_tokenizer",
    "load_tiny_pipeline",
    "make_pipeline",
    "save_tiny_pipeline",
    "tiny_pipeline_available",
]
