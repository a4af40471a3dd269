"""Slice a dataset into per-device directories, each in avrec's dataset format.

`device-<k>/interactions.csv` holds only the interactions of the users assigned to device k;
`items.csv` and `features/` are copied whole into every device directory (the catalogue is public and
item indices must agree everywhere). `catalogue/` gets the catalogue alone: what the server needs to
build the model, without any interaction.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from shared.config import ConfigError
from shared.data.dataset import load_dataset


@dataclass(frozen=True)
class Partition:
    devices: list[Path]
    catalogue: Path
    users: list[list[str]]  # user ids per device


def _copy_catalogue(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "items.csv", target / "items.csv")
    if (source / "features").is_dir():
        shutil.copytree(source / "features", target / "features", dirs_exist_ok=True)


def partition(
    dataset_dir: str | Path,
    out: str | Path,
    devices: int,
    users_per_device: int,
    first_user: int = 0,
) -> Partition:
    """Give devices 0..devices-1 consecutive blocks of `users_per_device` users (in user-id order,
    starting at the `first_user`-th). Media files referenced by items.csv are not copied: point a
    deployment at a dataset whose media sit with each device, or use precomputed features/."""
    if devices < 1 or users_per_device < 1 or first_user < 0:
        raise ConfigError(
            f"devices = {devices}, users-per-device = {users_per_device}, first-user = {first_user}: "
            "expected positive counts and a non-negative first user"
        )
    source = Path(dataset_dir)
    dataset = load_dataset(source)  # validates the source before anything is written
    needed = first_user + devices * users_per_device
    if needed > dataset.n_users:
        raise ConfigError(
            f"{devices} devices x {users_per_device} users from user {first_user} need {needed} users; "
            f"{source} has {dataset.n_users}"
        )
    raw = pd.read_csv(source / "interactions.csv", dtype=str, keep_default_na=False)
    out = Path(out)
    _copy_catalogue(source, out / "catalogue")
    paths, users = [], []
    for k in range(devices):
        start = first_user + k * users_per_device
        ids = dataset.user_ids[start : start + users_per_device]
        target = out / f"device-{k}"
        _copy_catalogue(source, target)
        raw[raw["user_id"].isin(ids)].to_csv(target / "interactions.csv", index=False)
        paths.append(target)
        users.append(list(ids))
    return Partition(paths, out / "catalogue", users)
