"""The device's side of serving: its user's history and private state, the global model and the
catalogue, turned into recommendations with explanations and interest tags.

Everything is read and computed on the device; nothing is sent, so serving may use the exact history,
the latest items and the private vector under every privacy mode (as the device's own evaluation does).
A simulated run keeps each device's state under `RUN_DIR/devices/<user id>/`; the same `DeviceRecommender`
serves a deployed device between rounds from its own files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from client.private_fit import fit_private
from shared.config import RunConfig, from_flat
from shared.data.dataset import Dataset, load_dataset
from shared.data.signals import interaction_signals, parse_weights
from shared.features import EncoderSettings, item_content
from shared.model import PRIVATE_KEY, build_model, is_private
from shared.serving.recommender import Catalogue, Recommendation, Recommender
from shared.text.analysis import analyse_catalogue, item_text_for_analysis
from shared.serving.tags import Interests, TagEdits, catalogue_tags, derive_interests

MODEL_FILES = {"global": "global_model.safetensors", "best": "best_model.safetensors"}


class ServingError(ValueError):
    """A run directory, model or user that cannot be served, with what was expected."""


def run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "federated.json"
    if not path.is_file():
        raise ServingError(f"{path} not found: expected a run directory written by `avrec simulate` (or the server)")
    return from_flat(json.loads(path.read_text())["config"])


@dataclass
class UserView:
    """One user as the device holds them: history in time order, behaviour weights, private vector, state."""

    user_id: str
    history: np.ndarray
    weights: np.ndarray
    private: torch.Tensor | None  # None: no saved vector and none fitted (private-fit-steps = 0)
    state_dir: Path
    private_source: str = "none (this device holds no trained state)"


def catalogue_size(weights: dict[str, torch.Tensor], dataset: Dataset) -> int:
    """How many of the dataset's items the global model was trained on: its per-item rows (ID embeddings, offsets).
    Items appended to items.csv after them are new: the item tower ranks them from their content alone."""
    rows = [weights[k].shape[0] for k in ("items.ids.weight", "items.bias.weight") if k in weights]
    n = rows[0] if rows else dataset.n_items
    if n > dataset.n_items:
        raise ServingError(f"the global model was trained on {n} items but {dataset.root / 'items.csv'} lists "
                           f"{dataset.n_items}: expected the training catalogue, new items appended after it")
    return n


class DeviceRecommender:
    """Serves the users of a dataset with one global model; built once per model (item vectors cached). The
    dataset's items.csv is the run's catalogue, optionally with new items appended (`catalogue_size`)."""

    def __init__(self, dataset: Dataset, cfg: RunConfig, weights: dict[str, torch.Tensor], state_root: Path) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self.state_root = state_root
        content = item_content(dataset, cfg.modality_list, cfg.cache_dir or None, EncoderSettings.from_config(cfg))
        model = build_model(content, catalogue_size(weights, dataset), cfg)
        shared = {k: v for k, v in model.state_dict().items() if not is_private(k)}
        missing = sorted(set(shared) - set(weights))
        if missing or any(weights[k].shape != shared[k].shape for k in shared):
            raise ServingError(f"the global model does not fit this run's towers (missing {missing[:3]} or other "
                               f"shapes): it was saved by another configuration or dataset")
        model.load_state_dict({**model.state_dict(), **{k: weights[k] for k in shared}})
        cache = cfg.cache_dir or None
        text = analyse_catalogue(item_text_for_analysis(dataset, cache, cfg.transcripts), cache)
        self.catalogue = Catalogue(list(dataset.item_ids), [str(t) for t in dataset.items["title"]],
                                   catalogue_tags(dataset.items, [t.keywords for t in text]),
                                   [t.sentiment for t in text])
        self.recommender = Recommender(model, self.catalogue)
        # Each interaction's behaviour weight (shared/data/signals.py): what it says about the user's interests
        # (tags) and how much it counts when a private vector is fitted here.
        self.signal_weights = interaction_signals(dataset, cfg.signals, parse_weights(cfg.signal_weights))[0]

    @classmethod
    def from_run(cls, run_dir: str | Path, model: str = "global", dataset: str | Path | None = None
                 ) -> "DeviceRecommender":
        """A simulated run's devices: the run's dataset (or `dataset`: the run's catalogue with new items appended)
        and configuration, `model` = global (the last round's weights, what devices hold) or best (the best
        validation round's)."""
        run_dir = Path(run_dir)
        if model not in MODEL_FILES:
            raise ServingError(f"model = {model!r}: expected one of {', '.join(MODEL_FILES)}")
        path = run_dir / MODEL_FILES[model]
        if not path.is_file():
            raise ServingError(f"{path} not found: expected a run directory written by `avrec simulate`")
        cfg = run_config(run_dir)
        state_root = Path(cfg.state_dir) if cfg.state_dir else run_dir / "devices"
        return cls(load_dataset(dataset or cfg.dataset), cfg, load_file(path), state_root)

    def user(self, user_id: str) -> UserView:
        ds = self.dataset
        try:
            index = ds.user_ids.index(str(user_id))
        except ValueError:
            raise ServingError(f"user {user_id!r} has no interactions in {ds.root / 'interactions.csv'}; expected "
                               f"a user id from its user_id column (e.g. {', '.join(ds.user_ids[:3])})") from None
        mine = (ds.interactions["user"] == index).to_numpy()
        rows = ds.interactions[mine]  # in time order
        state_dir = self.state_root / str(user_id)
        saved = state_dir / "private.safetensors"  # read only: serving never writes the training state
        private = load_file(saved).get(PRIVATE_KEY) if saved.is_file() else None
        history = rows["item"].to_numpy(np.int64)
        weights = self.signal_weights[mine]
        start = None if private is None else private[0]
        fitted = self.fitted_private(history, start, weights)
        source = ("fitted on this device to the served model" + (" from its state" if start is not None else "")
                  if fitted is not start else "from its state" if start is not None else UserView.private_source)
        return UserView(str(user_id), history, weights, fitted, state_dir, source)

    def fitted_private(self, history: np.ndarray, start: torch.Tensor | None = None,
                       weights: np.ndarray | None = None) -> torch.Tensor | None:
        """The private vector to serve with: with `private-fit-steps` fitted to the weights served now (the
        saved vector `start` followed the weights of the device's last round; a new user starts from zero),
        else `start` as saved. `weights`: the training weight of each history item (None = 1 each)."""
        if not self.cfg.fits_private or not len(history):
            return start
        model = self.recommender.model
        begin = torch.zeros(1, model.users.history.out_features) if start is None else start.reshape(1, -1)
        rows = model.history_rows[torch.as_tensor(np.array(history, dtype=np.int64))].sum(0)
        return fit_private(model, history, rows, begin, self.cfg.private_fit_steps, self.cfg.recent_items, weights)[0]

    def interests(self, user: UserView) -> Interests:
        derived = derive_interests(user.history, user.weights, self.catalogue.tags)
        return Interests(derived, TagEdits.load(user.state_dir))

    def recommend(self, user_id: str, k: int = 10, tag_boost: float = 1.0, explain: int = 3, diversity: float = 0.0
                  ) -> tuple[list[Recommendation], Interests, UserView]:
        user = self.user(user_id)
        interests = self.interests(user)
        recs = self.recommender.recommend(user.history, user.private, k, interests, tag_boost, explain,
                                          diversity=diversity)
        return recs, interests, user
