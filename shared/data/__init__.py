"""Data layer: generic dataset format, MovieLens-100K importer, splits, synthetic data."""

from .dataset import Dataset, DatasetError, load_dataset
from .movielens import (
    ML100K_SHA256,
    ML100K_URL,
    default_data_root,
    import_ml100k,
    locate_or_download_ml100k,
    movielens_100k,
)
from .split import Split, UserSplit, leave_one_out, user_negatives
from .synthetic import write_planted_dataset

__all__ = [
    "Dataset",
    "DatasetError",
    "load_dataset",
    "ML100K_SHA256",
    "ML100K_URL",
    "default_data_root",
    "import_ml100k",
    "locate_or_download_ml100k",
    "movielens_100k",
    "Split",
    "UserSplit",
    "leave_one_out",
    "user_negatives",
    "write_planted_dataset",
]
