"""Evaluation: image sets, feature extractors, metrics, and compute_metrics that ties them together."""

from sdtune.evaluation.core import STUDY_CONDITIONS, EvalConfig, cache_features, compute_metrics
from sdtune.evaluation.features import Extractor, extract_features, get_extractor
from sdtune.evaluation.images import ImageItem, ImageSet, as_image_set, load_image_set

__all__ = ["STUDY_CONDITIONS", "EvalConfig", "Extractor", "ImageItem", "ImageSet", "as_image_set", "cache_features",
           "compute_metrics", "extract_features", "get_extractor", "load_image_set"]
