"""Run configuration: one typed place for every setting of a federated run.

The same flat, kebab-case keys are used by `[tool.flwr.app.config]` in pyproject.toml (Flower's run
config), by the files in `configs/`, and by `avrec simulate --set key=value`. A test checks that the
defaults below and pyproject.toml agree.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from shared.data.signals import SIGNALS, parse_weights
from shared.errors import UserError

DP_MODES = ("none", "record", "user", "both")
# Who adds the user-level noise (record level is always `local`: each device's own DP-SGD):
# central = a trusted server (DP-FedAvg); secure = each device adds a discrete Gaussian share and only the
# modular sum is revealed (distributed DP under secure aggregation).
TRUST_MODELS = ("central", "secure")
# How the server combines the updates it sees in clear (server/aggregate.py): plain mean, mean of updates scaled
# to at most robust-norm-bound, or coordinate-wise trimmed mean / median (Yin et al. 2018)
ROBUST_AGGREGATIONS = ("none", "norm-bound", "trimmed-mean", "median")
# Simulated hostile clients (simulations/attacks.py, in-process engine only)
ATTACKS = ("none", "fake-users", "fedrecattack")


class ConfigError(UserError, ValueError):
    """A setting is unknown, has the wrong type, or is out of range."""


@dataclass(frozen=True)
class RunConfig:
    # Data
    dataset: str = "movielens-100k"  # "movielens-100k" or a directory in avrec's dataset format
    data_root: str = ""  # where ml-100k lives; "" = $AVREC_DATA_DIR or ../shared/data beside the repo
    cache_dir: str = ""  # embedding and dataset cache; "" = $AVREC_CACHE_DIR or ~/.cache/avrec
    max_users: int = 0  # 0 = every user is a client; N = the first N users (smoke runs)
    seed: int = 0
    eval_negatives: int = 99
    drop_short_users: bool = False  # leave out users with fewer than 3 interactions (too few to split) instead of refusing

    # Model
    embedding_dim: int = 64
    # comma-separated content modalities of the item tower, or auto = every modality the catalogue has
    modalities: str = "auto"
    # Learned item-ID embeddings for catalogue items: true, false, or auto = on except under record-level
    # DP, where DP-SGD's noise on the whole (items x dim) table swamped their signal (measured, see README)
    id_embeddings: str = "auto"
    item_bias: bool = True  # a learned score offset per catalogue item
    id_dropout: float = 0.2  # chance per example to drop ID embeddings, so content alone learns to rank
    recent_items: int = 3  # the user vector adds a position-weighted mean of this many latest items (0 = off);
    # under record-level DP only when the device serves (in training it would couple a user's examples)
    private_user_vector: bool = True  # per-user vector kept on the device, never sent
    logit_scale: float = 10.0  # cosine similarity times this is the score

    # Local training (on each device)
    num_negatives: int = 8  # sampled negatives per training example (per example, never in-batch)
    # Behaviour signals (shared/data/signals.py): none = every interaction a click of weight 1; event = the
    # interactions' event column (play/like/skip/dislike) and watch_fraction; rating = 4-5 like, 3 play, 1-2 dislike
    signals: str = "none"
    signal_weights: str = "like=1,play=0.5,skip=0"  # each positive event's example weight in [0, 1] (0 = adds nothing)
    # how many of each example's num-negatives are drawn from the same user's dislikes (0 = off); couples
    # records, so refused under record-level DP
    dislike_negatives: int = 0
    local_epochs: int = 1  # without record-level DP; under it the step count is record-steps
    # Without record-level DP the mini-batch size. Under it the fixed divisor of each step's summed clipped
    # gradients (a nominal expected batch): never the user's own int(n * q), which would leak n.
    batch_size: int = 16
    learning_rate: float = 0.5
    private_learning_rate: float = 0.5  # learning rate of the private user vector
    # L-BFGS iterations fitting the private vector alone to the weights a device holds, before it trains
    # (not under record-level DP) and ranks (client/private_fit.py); 0 = trained jointly only. Without a
    # private vector (private-user-vector = false) there is nothing to fit.
    private_fit_steps: int = 10

    # Federation (server)
    num_rounds: int = 20
    fraction_train: float = 1.0  # fraction of clients sampled per round
    server_optimizer: str = "sgd"  # sgd (x += lr * mean update) or adam (FedAdam)
    server_learning_rate: float = 10.0  # steps by this times the mean update: each item row is updated by few of the clients averaged
    server_lr_decay: float = 1.0  # the server learning rate falls geometrically to this fraction by the last round
    server_momentum: float = 0.0  # sgd with momentum (FedAvgM): averages the DP noise of successive rounds; post-processing
    min_clients: int = 2
    # Train messages kept in flight at once (0 = all): Flower's in-memory link state scans every stored
    # message for every node on each poll, so with 943 stored, polling took the CPU training needed.
    # Measured on 2 cores, seconds per DP round: 66 with 64 in flight, 40 with 8, 47 with 4 (workers
    # starve). With more simulation workers, raise it to a few per worker.
    messages_in_flight: int = 8
    # Log how many devices of a round have answered every this many seconds (0 = only at the round's end):
    # `avrec simulate` sets it on a terminal, so a long round is not silent. Harness output, never sent.
    progress_seconds: float = 0.0
    # Where the server sees updates in clear (no user-level DP): what bounds one client's influence. Under
    # user-level DP the device clips to user-clip-norm and the server rejects longer updates (so only none).
    robust_aggregation: str = "none"  # none | norm-bound | trimmed-mean | median
    robust_norm_bound: float = 10.0  # norm-bound: each update scaled down to at most this L2 norm
    robust_trim_fraction: float = 0.1  # trimmed-mean: this fraction of each coordinate's values cut at each end

    # Privacy
    dp: str = "user"  # none | record | user | both
    noise_multiplier: float = 1.0  # record level (DP-SGD on the device)
    clip_norm: float = 1.0
    delta: float = 1e-5  # record level, per client
    epsilon_budget: float = 20.0  # record level, per client: a client declines a round that would exceed it
    history_noise_multiplier: float = 4.0  # record level: Gaussian noise on the user's history summary
    # Record level: the shape of each round's DP-SGD is fixed, never derived from the user's interaction
    # count n (a rate, step count or divisor from n leaks n: NOTES.md 6). Each step Poisson-samples every
    # interaction with probability record-sample-rate; a round runs record-steps steps.
    record_sample_rate: float = 0.25
    record_steps: int = 4
    # Record level: a device releases its noised history summary in its first round and then every this
    # many rounds (0 = only once), whether or not its history changed, so the ledger's length reveals
    # nothing about the history
    history_refresh_rounds: int = 0
    grad_sample_mode: str = "hooks"  # Opacus per-sample gradients: hooks (fastest measured here for this model) or ghost
    user_noise_multiplier: float = 2.8  # user level: noise std / user-clip-norm of the whole round's sum
    user_clip_norm: float = 1.0
    user_delta: float = 1e-4
    user_epsilon_budget: float = 8.0
    trust_model: str = "secure"  # user level: central | secure (see TRUST_MODELS)
    secure_bits: int = 20  # trust-model = secure: the modular sum is taken mod 2**bits (under secure-aggregation, SecAgg+ needs devices x 2**bits < 2**32)
    # trust-model = secure: a round's sum is decoded only if at least this fraction of the expected devices
    # sent a share; the accountant charges the noise of the shares actually summed (fewer = less noise)
    secure_min_fraction: float = 0.9

    # Outputs
    out: str = ""  # run directory; "" = none. A fresh run refuses one that already holds a run's records
    resume: bool = False  # continue the run in `out` from its last checkpoint (only num-rounds may change)
    state_dir: str = ""  # where simulated devices keep their state; "" = <out>/devices

    # Secure aggregation (Flower SecAgg+, masks from avrec's cryptographic PRG): the server learns only the sum
    # of what the devices send (their clipped updates, or under trust-model secure their noise shares)
    secure_aggregation: bool = False
    secagg_num_shares: int = 5  # shares of each device's mask keys (odd: an even value crashed Flower 1.41)
    secagg_reconstruction_threshold: int = 3  # shares needed to unmask; a round survives shares - threshold dropouts per neighbourhood
    secagg_quantization_bits: int = 22  # each coordinate in [-user-clip-norm, user-clip-norm] -> 2**bits levels
    secagg_audit: bool = False  # for checking SecAgg+: devices keep a copy of each update they send, the server the unmasked sum (both stay local)
    fault_drop_after_key_sharing: int = -1  # fault injection for tests: the simulated client with this partition-id exits after sharing keys
    # On-device media encoders (shared/encoders/)
    image_backbone: str = "efficientnet-lite0"  # a name in shared.encoders.image.BACKBONES (images, video frames)
    audio_encoder: str = "spectral"  # "spectral" (log-mel and MFCC statistics, no weights) or a local transformers model directory
    video_frames: int = 8  # frames sampled uniformly per video (decoded by seeking, never the whole file)
    video_shots: bool = False  # also sample the first frame after each detected shot change (up to video-frames more)
    content_dim: int = 0  # keep this many principal components of each modality's public content (0 = all)
    # text-transcript feature: speech of the audio (or a video's audio track) of items without subtitles,
    # transcribed on the device (pocketsphinx, bundled English models) and embedded like subtitles
    transcripts: bool = False
    # Serving: MMR re-ranking of the lists devices serve, 0 (the model's order) to 1 (spread alone in
    # content space); `avrec simulate` judges the served lists with it (shared/serving/rerank.py)
    diversity: float = 0.0
    # Audit (issue 4)
    server_key_dir: str = ""  # where the server keeps its Ed25519 ledger-signing key; "" = <out>/server
    # User level, only where amplification is not claimed (fraction-train = 1): each client takes part in
    # at most this many rounds (0 = no cap), and at least this many rounds apart (1 = consecutive rounds)
    max_rounds_per_client: int = 0
    min_round_separation: int = 1
    # Hostile clients, simulation harness only (in-process engine; simulations/attacks.py): this fraction of the
    # honest clients' number is added as malicious clients promoting item `attack-target`
    attack: str = "none"  # none | fake-users (fake histories: target + popular items) | fedrecattack (crafted updates)
    attack_fraction: float = 0.0
    attack_target: int = -1  # item index; -1 = an unpopular item chosen from the seed
    attack_norm: float = 0.0  # fedrecattack's update norm; 0 = the largest the server accepts (needs a bound)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                # NaN fails every comparison: a NaN budget is never reached, a NaN noise scale never checked
                raise ConfigError(f"{key(f.name)} = {value}: expected a finite number (NaN and infinity void the checks "
                                  "and guarantees that use it)")
        for name in ("learning_rate", "server_learning_rate", "logit_scale", "epsilon_budget", "user_epsilon_budget",
                     "eval_negatives", "min_clients"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key(name)} = {getattr(self, name)}: expected a value > 0")
        for name in ("private_learning_rate", "private_fit_steps", "seed", "max_users", "recent_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key(name)} = {getattr(self, name)}: expected a value >= 0")
        if self.dp not in DP_MODES:
            raise ConfigError(f"dp = {self.dp!r}: expected one of {', '.join(DP_MODES)}")
        if self.id_embeddings not in ("auto", "true", "false"):
            raise ConfigError(f"id-embeddings = {self.id_embeddings!r}: expected auto, true or false")
        if not 0.0 < self.server_lr_decay <= 1.0:
            raise ConfigError(f"server-lr-decay = {self.server_lr_decay}: expected 0 < value <= 1 (1 = constant)")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"server-momentum = {self.server_momentum}: expected 0 <= value < 1")
        if self.server_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"server-optimizer = {self.server_optimizer!r}: expected sgd or adam")
        if self.trust_model not in TRUST_MODELS:
            raise ConfigError(f"trust-model = {self.trust_model!r}: expected one of {', '.join(TRUST_MODELS)}")
        if not 0.0 <= self.diversity <= 1.0:
            raise ConfigError(f"diversity = {self.diversity}: expected 0 (the model's order) .. 1 (spread alone)")
        if not 8 <= self.secure_bits <= 30:
            raise ConfigError(f"secure-bits = {self.secure_bits}: expected 8 .. 30")
        if not 0.0 < self.secure_min_fraction <= 1.0:
            raise ConfigError(f"secure-min-fraction = {self.secure_min_fraction}: expected 0 < value <= 1")
        self._check_robustness()
        if self.grad_sample_mode not in ("ghost", "hooks"):
            raise ConfigError(f"grad-sample-mode = {self.grad_sample_mode!r}: expected ghost or hooks")
        for name in ("embedding_dim", "num_negatives", "local_epochs", "batch_size", "num_rounds", "video_frames",
                     "record_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key(name)} = {getattr(self, name)}: expected a positive integer")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train = {self.fraction_train}: expected 0 < value <= 1")
        if not 0.0 < self.record_sample_rate <= 1.0:
            raise ConfigError(f"record-sample-rate = {self.record_sample_rate}: expected 0 < value <= 1")
        if self.content_dim < 0:
            raise ConfigError(f"content-dim = {self.content_dim}: expected >= 0 principal components (0 = keep every dimension)")
        if self.history_refresh_rounds < 0:
            raise ConfigError(f"history-refresh-rounds = {self.history_refresh_rounds}: expected >= 0 (0 = release once)")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError(f"id-dropout = {self.id_dropout}: expected 0 <= value < 1")
        for name in ("delta", "user_delta"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{key(name)} = {getattr(self, name)}: expected 0 < delta < 1")
        for name in ("noise_multiplier", "clip_norm", "user_noise_multiplier", "user_clip_norm", "messages_in_flight",
                     "progress_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key(name)} = {getattr(self, name)}: expected a value >= 0")
        if self.max_rounds_per_client < 0 or self.min_round_separation < 1:
            raise ConfigError(
                f"max-rounds-per-client = {self.max_rounds_per_client}, min-round-separation = "
                f"{self.min_round_separation}: expected >= 0 and >= 1"
            )
        if (self.max_rounds_per_client or self.min_round_separation > 1) and self.fraction_train < 1.0:
            # Poisson sampling's amplification assumes every client is eligible every round
            raise ConfigError(
                "max-rounds-per-client and min-round-separation apply only where amplification is not "
                f"claimed (fraction-train = 1), got fraction-train = {self.fraction_train}"
            )
        if self.record_dp and (self.noise_multiplier <= 0 or self.clip_norm <= 0 or self.history_noise_multiplier <= 0):
            raise ConfigError(
                f"dp = {self.dp!r} needs noise-multiplier > 0, clip-norm > 0 and history-noise-multiplier > 0 "
                f"(got {self.noise_multiplier}, {self.clip_norm}, {self.history_noise_multiplier}): without noise "
                "the mechanism gives no guarantee"
            )
        if self.secure_aggregation:
            if not self.user_dp:
                raise ConfigError(
                    f"secure-aggregation = true needs dp = user or both (got dp = {self.dp!r}): the device clips "
                    "its update to user-clip-norm, which also bounds SecAgg+'s quantisation range"
                )
            if self.secagg_num_shares < 3 or self.secagg_num_shares % 2 == 0:
                raise ConfigError(f"secagg-num-shares = {self.secagg_num_shares}: expected an odd number >= 3")
            if not 2 <= self.secagg_reconstruction_threshold <= self.secagg_num_shares:
                raise ConfigError(
                    f"secagg-reconstruction-threshold = {self.secagg_reconstruction_threshold}: expected 2 .. "
                    f"secagg-num-shares ({self.secagg_num_shares})"
                )
            if not 8 <= self.secagg_quantization_bits <= 26:
                raise ConfigError(f"secagg-quantization-bits = {self.secagg_quantization_bits}: expected 8 .. 26")
            if self.fraction_train < 1.0 or self.max_rounds_per_client or self.min_round_separation > 1:
                raise ConfigError(
                    "secure-aggregation = true sends every round to every available device: fraction-train must be 1 "
                    f"and max-rounds-per-client 0, min-round-separation 1 (got {self.fraction_train}, "
                    f"{self.max_rounds_per_client}, {self.min_round_separation})")
            if self.secure_trust and 2 * self.secagg_reconstruction_threshold <= self.secagg_num_shares:
                # Flower 1.41's SecAgg+ has no consistency check: a server that tells some holders a device
                # dropped and others that it stayed collects both its mask seed and its key unless 2t > shares.
                raise ConfigError(
                    f"trust-model = secure needs secagg-reconstruction-threshold > secagg-num-shares / 2 (got "
                    f"{self.secagg_reconstruction_threshold} of {self.secagg_num_shares}): otherwise a server that "
                    "lies about who dropped out can unmask a single device")
        if self.resume and self.secure_aggregation:
            raise ConfigError("resume = true with secure-aggregation = true: Flower's legacy SecAgg+ workflow always "
                              "starts at round 1; start a new run (a new --out) instead")
        if self.signals not in SIGNALS:
            raise ConfigError(f"signals = {self.signals!r}: expected one of {', '.join(SIGNALS)}")
        try:
            parse_weights(self.signal_weights)
        except ValueError as exc:
            raise ConfigError(f"signal-weights = {self.signal_weights!r}: {exc}") from None
        if not 0 <= self.dislike_negatives <= self.num_negatives:
            raise ConfigError(f"dislike-negatives = {self.dislike_negatives}: expected 0 .. num-negatives "
                              f"({self.num_negatives})")
        if self.signals != "none" and self.record_dp and self.grad_sample_mode == "ghost":
            raise ConfigError(f"signals = {self.signals!r} with dp = {self.dp!r} and grad-sample-mode = ghost: a weight "
                              "scales each example's clipped gradient, which ghost clipping never materialises; use "
                              "grad-sample-mode = hooks (the default)")
        if self.dislike_negatives and self.record_dp:
            raise ConfigError(
                f"dislike-negatives = {self.dislike_negatives} with dp = {self.dp!r}: a dislike drawn as another "
                "example's negative couples two records, which record-level DP-SGD's per-example clip cannot bound; "
                "use dp = user or none, or dislike-negatives = 0")
        if self.user_dp and (self.user_noise_multiplier <= 0 or self.user_clip_norm <= 0):
            raise ConfigError(
                f"dp = {self.dp!r} needs user-noise-multiplier > 0 and user-clip-norm > 0 "
                f"(got {self.user_noise_multiplier}, {self.user_clip_norm})"
            )

    def _check_robustness(self) -> None:
        """Robust aggregation and simulated attacks: settings that make no sense are refused."""
        if self.robust_aggregation not in ROBUST_AGGREGATIONS:
            raise ConfigError(f"robust-aggregation = {self.robust_aggregation!r}: expected one of "
                              f"{', '.join(ROBUST_AGGREGATIONS)}")
        if self.robust_norm_bound <= 0:
            raise ConfigError(f"robust-norm-bound = {self.robust_norm_bound}: expected an L2 norm > 0")
        if not 0.0 <= self.robust_trim_fraction < 0.5:
            raise ConfigError(f"robust-trim-fraction = {self.robust_trim_fraction}: expected 0 <= value < 0.5 (cut at "
                              "each end of every coordinate)")
        if self.user_dp and self.robust_aggregation != "none":
            raise ConfigError(
                f"robust-aggregation = {self.robust_aggregation} with dp = {self.dp!r}: under user-level DP the "
                "server may only release the noised sum of updates the device clipped to user-clip-norm (that clip "
                "is the bound; longer updates are rejected): use robust-aggregation = none")
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack = {self.attack!r}: expected one of {', '.join(ATTACKS)}")
        if (self.attack == "none") != (self.attack_fraction == 0.0) or not 0.0 <= self.attack_fraction <= 1.0:
            raise ConfigError(f"attack = {self.attack!r} with attack-fraction = {self.attack_fraction}: an attack needs "
                              "0 < attack-fraction <= 1 (malicious clients per honest one), attack = none needs 0")
        if self.attack_norm < 0:
            raise ConfigError(f"attack-norm = {self.attack_norm}: expected >= 0 (0 = the largest the server accepts)")
        if self.attack == "fedrecattack" and not self.attack_norm and not self.accepted_norm:
            raise ConfigError(
                f"attack = fedrecattack with robust-aggregation = {self.robust_aggregation} and dp = {self.dp!r}: the "
                "server accepts updates of any norm, so attack-norm must say how long the crafted update is")

    @property
    def accepted_norm(self) -> float:
        """The longest update the server accepts whole (0 = any): the device's clip under user-level DP, else
        the norm bound where robust-aggregation = norm-bound."""
        if self.user_dp:
            return self.user_clip_norm
        return self.robust_norm_bound if self.robust_aggregation == "norm-bound" else 0.0

    @property
    def record_dp(self) -> bool:
        return self.dp in ("record", "both")

    @property
    def user_dp(self) -> bool:
        return self.dp in ("user", "both")

    @property
    def secure_trust(self) -> bool:
        """User-level noise added by the devices as shares of a secure sum (trust-model applies to user level
        only: record level is always local)."""
        return self.user_dp and self.trust_model == "secure"

    @property
    def use_id_embeddings(self) -> bool:
        return self.id_embeddings == "true" or (self.id_embeddings == "auto" and not self.record_dp)

    @property
    def fits_private(self) -> bool:
        """Whether devices fit their private vector to the weights they hold (`private-fit-steps`)."""
        return self.private_fit_steps > 0 and self.private_user_vector

    @property
    def train_recent(self) -> bool:
        """Whether training passes the recent items (the device always serves with them)."""
        return self.recent_items > 0 and not self.record_dp

    @property
    def signal_weight_map(self) -> dict[str, float]:
        return parse_weights(self.signal_weights)

    @property
    def modality_list(self) -> list[str]:
        return [m.strip() for m in self.modalities.split(",") if m.strip()]

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower run-config keys (kebab-case)."""
        return {key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def key(field_name: str) -> str:
    return field_name.replace("_", "-")


_FIELDS = {key(f.name): f for f in fields(RunConfig)}


def from_flat(values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a config from kebab-case keys, coercing types; unknown keys are an error."""
    base = base or RunConfig()
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in _FIELDS:
            close = [k for k in _FIELDS if k.split("-")[0] == name.split("-")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown setting {name!r}{hint}")
        field = _FIELDS[name]
        changes[field.name] = _coerce(name, value, type(getattr(base, field.name)))
    return dataclasses.replace(base, **changes)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is str and isinstance(value, bool):
        return "true" if value else "false"  # `id-embeddings = true` in TOML
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
            return kind(text)
        except ValueError:
            pass
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    raise ConfigError(f"{name} = {value!r}: expected {expected}")


def settings_table(table: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    """A config file's settings: flat keys at the top level, or all of them under one [config] table. Any other
    table, or keys beside [config], would be silently ignored: they are errors."""
    if "config" in table and isinstance(table["config"], dict):
        stray = sorted(k for k in table if k != "config")
        if stray:
            raise ConfigError(f"{path}: {', '.join(map(repr, stray))} outside [config]: put every setting under "
                              "[config], or every one at the top level")
        table = table["config"]
    nested = sorted(k for k, v in table.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"{path}: table(s) {', '.join(f'[{k}]' for k in nested)}: settings are flat keys (e.g. "
                          "num-rounds = 5) at the top level or under [config]; see configs/")
    return table


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then a TOML file of flat keys (optionally under [config]), then overrides."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        settings = settings_table(table, path)
        try:
            config = from_flat(settings, config)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if overrides:
        config = from_flat(overrides, config)
    return config
