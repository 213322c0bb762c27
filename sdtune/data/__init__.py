"""The dataset layer shared by training, synthesis and evaluation."""

from sdtune.data.records import DatasetError, Example, Problem, errors_only

__all__ = ["DatasetError", "Example", "Problem", "errors_only"]
