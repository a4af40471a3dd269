"""Secure aggregation on the deployment engine: five SuperNodes (one MovieLens-100K user each) behind a
TLS SuperLink with node authentication, dp = user, SecAgg+ (5 shares, threshold 3), 2 rounds. With
`secagg-audit` each device keeps the update it sent and the server the unmasked sum: prints the largest
difference against the plain sum and the quantisation bound, and the round times. Saves
runs/deploy_secagg.json. Run: `python -m simulations.deploy_secagg`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from shared.deploy.local import run_on_loopback, save_report

REPO = Path(__file__).resolve().parents[1]
DEVICES = 5


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="avrec-secagg-") as tmp:
        root = Path(tmp)
        _, settings = run_on_loopback(root, REPO, DEVICES, 1, {
            "num-rounds": 2, "dp": "user", "trust-model": "central", "secure-aggregation": True, "secagg-audit": True,
            "modalities": "text"})
        cfg = settings.run
        step = 2 * cfg.user_clip_norm / 2**cfg.secagg_quantization_bits
        rounds = []
        for line in (root / "run" / "rounds.jsonl").read_text().splitlines():
            row = json.loads(line)
            r = row["round"]
            secure = load_file(root / "run" / f"secure-sum-round-{r}.safetensors")
            sent = [load_file(p) for p in sorted((root / "data").glob(f"device-*/state/sent-round-{r}.safetensors"))]
            error = max((secure[k] - sum(u[k].double() for u in sent)).abs().max().item() for k in secure)
            rounds.append({"round": r, "seconds": row["seconds"], "aggregated": row["clients_aggregated"],
                           "max_abs_error_vs_plain_sum": error, "bound": len(sent) * step,
                           "user_epsilon": row["user_epsilon"]})
    report = {"supernodes": DEVICES, "num_shares": cfg.secagg_num_shares,
              "reconstruction_threshold": cfg.secagg_reconstruction_threshold, "rounds": rounds}
    return save_report("deploy_secagg", report)


if __name__ == "__main__":
    main()
